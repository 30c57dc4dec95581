"""Speculative decoding inside the serving engine (`jaxsys.serve.engine.verify`), tiny random models.

Greedy: the tokens are those of the cache-free reference and of the engine without speculation,
for every draft (n-gram lookup, early-exit self-draft, a separate draft model), with continuous
batching, admissions mid-run, EOS and max_tokens cutting a draft short. After every step, each
KV page is in exactly one place (rollback of rejected tokens allocates and frees nothing). Steady
state across the compiled gamma set compiles nothing. Sampling: a request samples the same tokens
in any batch, and on a 5-token vocabulary the sequences the engine samples speculatively follow
the target's exact law (and the same test rejects the draft's law). With the experts of an MoE
offloaded to host memory, the engine serves the same tokens, speculating with n-gram drafts.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from jaxsys.sampling import SamplingParams
from jaxsys.serve.scheduler.request import State
from jaxsys.serve.scheduler.scheduler import new_request
from jaxsys.serve.speculative import DraftError, early_exit_draft, ngram_propose
from jaxsys.serve.speculative.config import SpeculativeConfig
from jaxsys.serve.speculative.drafts import ngram_propose_host

from serve_helpers import check_idle, drive, greedy_reference, reset, step, tiny_model

MAIN = dict(page_size=4, num_pages=128, max_decode_batch=8, max_prefill_batch=4, prefill_chunk=8,
            shared_attention=False)
GAMMAS = (2, 3)
DRAFTS = ("ngram", "self", "model")


def _llm(model, speculate=None, engine=MAIN, **kw):
    from jaxsys.serve.engine.engine import EngineConfig
    from jaxsys.serve.llm import ServingLLM

    return ServingLLM(model, config=EngineConfig(**engine), speculate=speculate, **kw)


def _early_exit_model(model, layers: int):
    from jaxsys.models import LoadedModel

    params, cfg = early_exit_draft(model.params, model.config, layers)
    return LoadedModel(name="early-exit", config=cfg, params=params, tokenizer=None, path=Path("early-exit"))


def _spec(draft: str) -> SpeculativeConfig:
    return SpeculativeConfig(draft=draft, gamma=GAMMAS[-1], gammas=GAMMAS, draft_layers=1, window=16)


def _spec_llm(model, draft: str, engine=MAIN):
    extra = {"draft_model": _early_exit_model(model, 1)} if draft == "model" else {}
    return _llm(model, _spec(draft), engine, **extra)


# CI runs the early-exit draft's greedy, max_tokens and EOS tests and the cheap checks (under a
# minute on 2 cores); the other drafts and the compile-heavy tests are slow (`make test-all`).
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


@pytest.fixture(scope="module", params=[d if d == "self" else pytest.param(d, marks=SLOW) for d in DRAFTS])
def llm(request, model):
    llm = _spec_llm(model, request.param)
    yield llm
    llm.shutdown()


@pytest.fixture
def sched(llm):
    check_idle(llm.scheduler)
    yield llm.scheduler
    try:
        check_idle(llm.scheduler)
    except AssertionError:
        reset(llm.scheduler)
        raise


def submit(sched, prompt, max_tokens=8, **kw):
    return sched.submit(new_request(prompt, SamplingParams(max_tokens=max_tokens, **kw)))


def prompts_of(seed: int) -> tuple[list[list[int]], list[int]]:
    """Random prompts and prompts that repeat themselves (where n-gram lookup proposes), 3..24 tokens."""
    rng = np.random.default_rng(seed)
    rand = [[int(t) for t in rng.integers(0, 128, n)] for n in (3, 9, 17, 24)]
    loop = [[5, 6, 7, 8] * 3 + [5, 6], [40, 41] * 6, [int(t) for t in rng.integers(0, 128, 5)] * 3]
    return rand + loop, [12, 1, 7, 12, 12, 2, 12]


# ------------------------------------------------------------------------------ greedy: same tokens

@pytest.fixture(scope="module")
def plain_outputs(model):
    """The engine without speculation on `prompts_of(0)`, and the cache-free reference's tokens."""
    prompts, max_tokens = prompts_of(0)
    plain = [o.token_ids for o in _llm(model).generate(prompts, [SamplingParams(max_tokens=m) for m in max_tokens])]
    return plain, greedy_reference(model, prompts, max_tokens)


def test_greedy_equals_reference_and_plain_engine(llm, sched, plain_outputs):
    prompts, max_tokens = prompts_of(0)
    plain, ref = plain_outputs
    assert plain == ref
    st = sched.stats
    before = (st.spec_proposed, st.spec_accepted, st.decode_tokens)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m) for m in max_tokens])
    assert [o.token_ids for o in outs] == ref
    assert all(o.finish_reason == "length" for o in outs)
    proposed, accepted = st.spec_proposed - before[0], st.spec_accepted - before[1]
    assert proposed > 0 and 0 < accepted <= proposed, (proposed, accepted)
    # every token after the first came from a verify step of a request, accepted drafts + 1 per step
    row_steps = st.decode_tokens - before[2]
    assert row_steps + accepted == sum(m - 1 for m in max_tokens)


@SLOW
def test_continuous_batching_with_admissions_mid_run(llm, sched, model):
    prompts, _ = prompts_of(1)
    first, later = prompts[:3], prompts[3:]
    ref = greedy_reference(model, first + later, 10)
    a = [submit(sched, p, 10) for p in first]
    pages = {}

    def watch(_):  # rollback never touches a running request's pages (all reserved at admission)
        for r in sched.running:
            pages.setdefault(id(r), list(r.pages))
            assert r.pages == pages[id(r)]
            assert r.num_computed == r.total_len - 1

    while not all(r.state is State.RUNNING for r in a):
        step(sched, on_step=watch)
    step(sched, on_step=watch)
    assert all(0 < len(r.out_tokens) < 10 for r in a)
    b = [submit(sched, p, 10) for p in later]
    overlap = []

    def watch_overlap(i):
        watch(i)
        running = set(map(id, sched.running))
        overlap.append(any(id(r) in running for r in a) and any(id(r) in running for r in b))

    drive(sched, on_step=watch_overlap)  # checks the page accounting after every step
    assert any(overlap), "new requests never verified alongside the running ones"
    assert [r.out_tokens for r in a + b] == ref


def test_max_tokens_caps_the_draft(llm, sched, model):
    """Budgets of 1..4 tokens with gamma 3: a row never emits past max_tokens (its draft shrinks)."""
    prompt = [5, 6, 7, 8] * 4
    ref = greedy_reference(model, [prompt], 4)[0]
    for m in (1, 2, 3, 4):
        r = submit(sched, prompt, m)
        drive(sched)
        assert r.out_tokens == ref[:m] and r.finish_reason == "length"


def test_eos_ends_the_request_where_plain_decoding_would():
    """EOS emitted by a verify step (possibly among accepted drafts) ends the request right there."""
    base = tiny_model(0)
    prompt = [5, 6, 7, 8] * 4
    toks = greedy_reference(base, [prompt], 10)[0]
    k = next(i for i in range(3, 10) if toks[i] not in toks[:i])
    model = tiny_model(0, eos_token_ids=(toks[k],))
    llm = _spec_llm(model, "self")
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=10))
    assert out.token_ids == toks[:k] and out.finish_reason == "stop"
    check_idle(llm.scheduler)


# ------------------------------------------------------------------------------ compiles, gamma set

@SLOW
def test_zero_recompiles_across_the_gamma_set(llm, sched, model):
    rng = np.random.default_rng(3)

    def workload():  # batch sizes 1..8 of short prompts (4 pages) and of long ones (8 pages)
        for n in (1, 2, 3, 5, 8):
            for lo, hi, m in ((3, 8, 4), (20, 24, 8)):
                for _ in range(n):
                    submit(sched, [int(t) for t in rng.integers(0, 128, int(rng.integers(lo, hi + 1)))], m)
                drive(sched)

    for g in GAMMAS:  # warm-up: every bucket at every gamma of the set
        llm.set_gamma(g)
        workload()
    compiled = llm.engine.compile_count
    assert compiled == llm.engine.num_executables
    for g in (GAMMAS[0], GAMMAS[-1]):
        llm.set_gamma(g)
        workload()
    assert llm.engine.compile_count == compiled, "steady-state speculative serving recompiled"
    with pytest.raises(DraftError, match="compiled set"):
        llm.set_gamma(5)
    assert llm.verifier.gamma == GAMMAS[-1]  # the refused gamma left the last one in place


# ------------------------------------------------------------------------------ sampling

@SLOW
def test_seeded_sampling_is_independent_of_the_batch(llm, sched):
    prompt, other = [9, 4, 9, 4, 9, 4, 1], [int(t) for t in np.random.default_rng(4).integers(0, 128, 11)]
    hot = dict(temperature=1.0, seed=1234)
    alone = submit(sched, prompt, 10, **hot)
    drive(sched)
    assert len(alone.out_tokens) == 10
    batch = [submit(sched, other, 10), submit(sched, other, 10, temperature=0.7, seed=7, top_k=5),
             submit(sched, prompt, 10, temperature=1.0, seed=99, top_p=0.8)]
    step(sched, 2)
    mixed = submit(sched, prompt, 10, **hot)
    drive(sched)
    assert mixed.out_tokens == alone.out_tokens
    assert all(r.finish_reason == "length" for r in batch)


V = 5


def _law(params, cfg, prompt, n_tok, temperature):
    """P(x_1..x_n | prompt) of a model by enumerating every continuation (cache-free forwards)."""
    import jax.numpy as jnp

    from jaxsys.models import decoder
    from jaxsys.serve.speculative import probs_from_logits

    seqs = np.array(list(itertools.product(range(V), repeat=n_tok)), np.int32)
    ids = jnp.asarray(np.concatenate([np.tile(np.asarray(prompt, np.int32), (len(seqs), 1)), seqs], axis=1))
    logits = decoder.forward(params, ids, cfg=cfg)[0][:, len(prompt) - 1:len(prompt) - 1 + n_tok]
    rows = len(seqs)
    probs = probs_from_logits(logits, jnp.full((rows,), temperature, jnp.float32), jnp.zeros((rows,), jnp.int32),
                              jnp.ones((rows,), jnp.float32))
    per = np.take_along_axis(np.asarray(probs), seqs[..., None], axis=-1)[..., 0]
    return {tuple(int(t) for t in q): float(np.prod(r)) for q, r in zip(seqs, per)}


def _chi2_pvalue(samples, law) -> float:
    from scipy import stats

    n = len(samples)
    counts = {k: 0 for k in law}
    for row in samples:
        counts[tuple(row)] += 1
    big = [k for k in law if law[k] * n >= 5]
    rest = [k for k in law if k not in big]
    obs = [counts[k] for k in big] + ([sum(counts[k] for k in rest)] if rest else [])
    exp = np.array([law[k] for k in big] + ([sum(law[k] for k in rest)] if rest else []), np.float64)
    return float(stats.chisquare(obs, np.sum(obs) * exp / exp.sum()).pvalue)


@SLOW
@pytest.mark.parametrize("draft", ["self", "ngram"])
def test_sampled_sequences_follow_the_target_law(draft):
    import jax

    from jaxsys.models import LoadedModel, decoder
    from jaxsys.models.config import ModelConfig

    cfg = ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2, num_kv_heads=1,
                      head_dim=8, max_position_embeddings=64)
    params = decoder.init_params(cfg, jax.random.key(0), std=0.6)
    model = LoadedModel(name="v5", config=cfg, params=params, tokenizer=None, path=Path("v5"))
    engine = dict(page_size=4, num_pages=1024, max_decode_batch=256, max_prefill_batch=64, prefill_chunk=8,
                  shared_attention=False)
    llm = _llm(model, SpeculativeConfig(draft=draft, gamma=2, gammas=(2,), draft_layers=1), engine)
    # 3 tokens: the first comes from prefill, then drafts of <= 1 and 2 tokens are verified
    prompt, n_tok, temperature, rows = [1, 3, 2, 1, 3], 3, 1.0, 5000
    outs = llm.generate([prompt] * rows, [SamplingParams(max_tokens=n_tok, temperature=temperature, seed=s + 1,
                                                         ignore_eos=True) for s in range(rows)])
    samples = np.array([o.token_ids for o in outs])
    st = llm.scheduler.stats
    assert 0 < st.spec_accepted < st.spec_proposed  # both branches (accept, reject) ran
    assert _chi2_pvalue(samples, _law(params, cfg, prompt, n_tok, temperature)) > 1e-3
    if draft == "self":  # the test has the power to fail: the draft's own law is rejected
        dparams, dcfg = early_exit_draft(params, cfg, 1)
        assert _chi2_pvalue(samples, _law(dparams, dcfg, prompt, n_tok, temperature)) < 1e-6
    check_idle(llm.scheduler)


# ------------------------------------------------------------------------------ errors, drafts

def test_clear_errors(model):
    with pytest.raises(DraftError, match="vocabulary"):
        _llm(model, "model", draft_model=tiny_model(0, vocab_size=96))
    with pytest.raises(DraftError, match="unknown draft"):
        _llm(model, "medusa")
    with pytest.raises(DraftError, match="need speculate"):
        _llm(model, None, gamma=4)
    with pytest.raises(DraftError, match="draft_model"):
        _llm(model, "model")
    with pytest.raises(DraftError, match="num_layers"):
        _llm(model, SpeculativeConfig(draft="self", draft_layers=2))  # the target has 2 layers
    with pytest.raises(DraftError, match="compiled set"):
        SpeculativeConfig(gamma=3, gammas=(1, 2))
    with pytest.raises(DraftError, match="does not speculate"):
        _llm(model).set_gamma(2)


def test_host_ngram_proposals_equal_the_jittable_ones():
    rng = np.random.default_rng(5)
    S, gamma = 24, 4
    ctx = rng.integers(0, 4, (64, S)).astype(np.int32)  # a 4-token alphabet: plenty of repeats
    lens = rng.integers(1, S + 1, 64).astype(np.int32)
    toks, draft_len = (np.asarray(a) for a in ngram_propose(ctx, lens, gamma, max_ngram=3))
    for b in range(64):
        host = ngram_propose_host(ctx[b, :lens[b]], gamma, max_ngram=3)
        assert list(host) == list(toks[b, :draft_len[b]]), b
    assert (draft_len > 0).any() and (draft_len == 0).any()


def test_serve_cli_refuses_bad_speculation_before_loading(capsys):
    from jaxsys.serve import cli

    assert cli.main(["--gamma", "3"]) == 2
    assert "need --speculate" in capsys.readouterr().err
    assert cli.main(["--speculate", "self", "--gamma", "0"]) == 2
    assert "gamma" in capsys.readouterr().err
    assert cli.main(["--speculate", "model"]) == 2
    assert "draft_model" in capsys.readouterr().err
    assert "--speculate" in cli.build_parser().format_help()


# ------------------------------------------------------------------------------ experts offloaded

def _tiny_moe():
    """A unit-scale random Mixtral-style model (4 experts, top-2), as `serve_helpers.tiny_params`."""
    import jax

    from jaxsys.models import LoadedModel, ModelConfig, init_params

    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=256, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=16, model_type="mixtral")
    p = init_params(cfg, jax.random.key(0), std=1.0)
    D = cfg.hidden_size
    lay = dict(p["layers"])
    for k in ("wq", "wk", "wv", "router", "we_gate", "we_up"):
        lay[k] = lay[k] / np.sqrt(D)
    lay["wo"] = lay["wo"] / np.sqrt(cfg.num_heads * cfg.head_dim)
    lay["we_down"] = lay["we_down"] / np.sqrt(cfg.moe_intermediate_size)
    params = dict(p, layers=lay, lm_head=p["lm_head"] / np.sqrt(D))
    return LoadedModel(name="tiny-moe", config=cfg, params=params, tokenizer=None, path=Path("tiny-moe"))


@SLOW
def test_offloaded_experts_serve_the_same_tokens_and_speculate():
    from jaxsys.serve.moe_offload.store import ExpertCacheError

    moe = _tiny_moe()
    prompts, max_tokens = prompts_of(2)
    ref = greedy_reference(moe, prompts, max_tokens)
    for speculate in (None, "ngram"):
        llm = _llm(moe, speculate, offload_experts=True, expert_cache=2)
        outs = llm.generate(prompts, [SamplingParams(max_tokens=m) for m in max_tokens])
        assert [o.token_ids for o in outs] == ref, speculate
        check_idle(llm.scheduler)
        counters = llm.engine.runner.counters()
        assert counters.misses > 0 and counters.bytes_moved > 0  # experts really came from the host
        if speculate:
            assert llm.scheduler.stats.spec_accepted > 0
    with pytest.raises(ExpertCacheError, match="top-k"):
        _llm(moe, offload_experts=True, expert_cache=1)
    with pytest.raises(DraftError, match="ngram"):
        _llm(moe, "self", offload_experts=True)
    with pytest.raises(ExpertCacheError, match="dense"):
        _llm(tiny_model(0), offload_experts=True)
