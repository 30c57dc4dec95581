"""Speculative decoding's engine-independent parts: the exact acceptance rule, the drafts, and the
cache-free reference loop. The central check is statistical: on a tiny-vocabulary model, sequences
sampled speculatively follow the target's own distribution (computed exactly by enumeration), while
the draft's distribution is rejected by the same test, so the test can fail."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxsys import sampling as jsampling
from jaxsys.models import decoder
from jaxsys.models.config import ModelConfig
from jaxsys.serve.speculative import (DraftError, check_draft_vocab, early_exit_draft, expected_tokens_per_step,
                                      ngram_propose, probs_from_logits, verify_draft)
from jaxsys.serve.speculative.reference import (Sampling, acceptance_along, generate_plain,
                                                generate_speculative)

V = 5
TINY = ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2,
                   num_kv_heads=1, head_dim=8, max_position_embeddings=64)


@functools.lru_cache(maxsize=None)
def _model(seed: int, num_layers: int = 3):
    cfg = TINY.replace(num_layers=num_layers)
    return cfg, decoder.init_params(cfg, jax.random.key(seed), std=0.6)


def _chisquare(observed, probs) -> float:
    """Pearson's test of counts against probabilities (renormalized in float64 over the cells given)."""
    probs = np.asarray(probs, np.float64)
    observed = np.asarray(observed, np.float64)
    return float(stats.chisquare(observed, observed.sum() * probs / probs.sum()).pvalue)


def _logits_fn(params, cfg):
    def fn(tokens_BxS):
        return decoder.forward(params, tokens_BxS, cfg=cfg)[0]
    return fn


# ---------------------------------------------------------------------- the acceptance rule

def test_verify_draft_greedy_accepts_the_argmax_prefix():
    p_idx = jnp.array([[1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 0]])  # target argmax at 4 positions
    p = jax.nn.one_hot(p_idx, V)
    draft = jnp.array([[1, 2, 0], [1, 2, 3], [1, 0, 0]])
    n, nxt = verify_draft(jax.random.key(0), draft, jax.nn.one_hot(draft, V), p)
    np.testing.assert_array_equal(n, [2, 3, 0])
    np.testing.assert_array_equal(nxt, [3, 4, 0])  # the correction, the bonus token, the correction


def test_verify_draft_respects_draft_len():
    p = jax.nn.one_hot(jnp.array([[1, 2, 3, 4]]), V)
    draft = jnp.array([[1, 2, 3]])
    n, nxt = verify_draft(jax.random.key(0), draft, jax.nn.one_hot(draft, V), p, jnp.array([1]))
    assert int(n[0]) == 1 and int(nxt[0]) == 2  # proposals past draft_len are not verified
    n, nxt = verify_draft(jax.random.key(0), draft, jax.nn.one_hot(draft, V), p, jnp.array([0]))
    assert int(n[0]) == 0 and int(nxt[0]) == 1  # an empty draft is plain sampling from p_0


def test_verify_draft_single_position_matches_the_rule():
    """One proposal x from q: accepted w.p. min(1, p/q); otherwise the residual. So the emitted first
    token has law p, checked against the closed form over many keys."""
    p = jnp.array([0.5, 0.2, 0.1, 0.1, 0.1])
    q = jnp.array([0.1, 0.6, 0.1, 0.1, 0.1])
    n_rows = 40000
    keys = jax.random.split(jax.random.key(3), n_rows)
    x = jax.vmap(lambda k: jax.random.categorical(k, jnp.log(q)))(keys).astype(jnp.int32)
    pp = jnp.broadcast_to(p, (n_rows, 2, V))
    qq = jnp.broadcast_to(q, (n_rows, 1, V))
    n, nxt = verify_draft(jax.random.key(4), x[:, None], qq, pp)
    first = np.where(np.asarray(n) == 1, np.asarray(x), np.asarray(nxt))
    accept_rate = float(np.mean(np.asarray(n)))
    assert abs(accept_rate - float(jnp.sum(jnp.minimum(p, q)))) < 0.01
    counts = np.bincount(first, minlength=V)
    assert _chisquare(counts, p) > 1e-3


def test_expected_tokens_per_step():
    assert expected_tokens_per_step(0.0, 4) == 1.0
    assert expected_tokens_per_step(1.0, 4) == 5.0
    assert expected_tokens_per_step(0.5, 2) == pytest.approx(1.75)
    with pytest.raises(ValueError, match="acceptance"):
        expected_tokens_per_step(1.5, 2)


def test_probs_from_logits_is_what_sampling_draws():
    """p must be the law of `jaxsys.sampling.sample` (temperature, top-k, top-p), or speculative
    sampling would follow another distribution than plain sampling."""
    logits = jnp.array([2.0, 1.5, 1.0, 0.2, -1.0])
    rows = 20000
    for temp, top_k, top_p in [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8)]:
        probs = np.asarray(probs_from_logits(logits[None, None], jnp.array([temp]), jnp.array([top_k]),
                                             jnp.array([top_p])))[0, 0]
        drawn = jsampling.sample(jnp.broadcast_to(logits, (rows, V)), jnp.full((rows,), temp),
                                 jnp.full((rows,), top_k, jnp.int32), jnp.full((rows,), top_p),
                                 jnp.arange(rows, dtype=jnp.int32), jnp.zeros((rows,), jnp.int32))
        counts = np.bincount(np.asarray(drawn), minlength=V)
        assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(probs > 0)), (temp, top_k, top_p)
        support = probs > 0
        assert _chisquare(counts[support], probs[support]) > 1e-3, (temp, top_k, top_p)
    greedy = probs_from_logits(logits[None, None], jnp.array([0.0]), jnp.array([0]), jnp.array([1.0]))
    np.testing.assert_array_equal(greedy[0, 0], jax.nn.one_hot(0, V))


# ---------------------------------------------------------------------- drafts

def test_ngram_propose_takes_the_latest_longest_match():
    #            0  1  2  3  4  5  6  7  8  9
    ctx = jnp.array([[7, 1, 2, 9, 4, 1, 2, 5, 6, 1, 2, 0, 0],   # suffix "1 2": latest earlier match at 5
                     [3, 4, 5, 3, 4, 8, 0, 0, 0, 0, 0, 0, 0],   # suffix "4 8": no match; "8": none
                     [1, 2, 3, 1, 2, 3, 1, 2, 0, 0, 0, 0, 0]])  # suffix "3 1 2" at 2 -> "3 1 2"
    lens = jnp.array([11, 6, 8])
    tok, n = ngram_propose(ctx, lens, 3, max_ngram=3)
    np.testing.assert_array_equal(n, [3, 0, 3])
    np.testing.assert_array_equal(tok[0], [5, 6, 1])
    np.testing.assert_array_equal(tok[2], [3, 1, 2])
    tok, n = ngram_propose(ctx[:1], jnp.array([10]), 4, max_ngram=2)  # suffix "6 1" never occurred; "1" at 5
    assert int(n[0]) == 4 and list(np.asarray(tok[0])) == [2, 5, 6, 1]
    tok, n = ngram_propose(ctx[:1], jnp.array([8]), 4, max_ngram=1)  # suffix "5": none earlier
    assert int(n[0]) == 0
    tok, n = ngram_propose(jnp.array([[4, 6, 4, 0]]), jnp.array([3]), 4)  # proposal cut at the context end
    assert int(n[0]) == 2 and list(np.asarray(tok[0])) == [6, 4, 0, 0]
    with pytest.raises(DraftError, match="gamma"):
        ngram_propose(ctx, lens, 0)


def test_early_exit_draft_is_the_truncated_target():
    cfg, params = _model(0)
    dparams, dcfg = early_exit_draft(params, cfg, 2)
    assert dcfg.num_layers == 2 and dparams["embed"] is params["embed"]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 6)), jnp.int32)
    ref_params = {**params, "layers": {k: v[:2] for k, v in params["layers"].items()}}
    np.testing.assert_array_equal(decoder.forward(dparams, ids, cfg=dcfg)[0],
                                  decoder.forward(ref_params, ids, cfg=cfg.replace(num_layers=2))[0])
    for bad in (0, 3):
        with pytest.raises(DraftError, match="num_layers"):
            early_exit_draft(params, cfg, bad)


def test_draft_vocabulary_must_match():
    with pytest.raises(DraftError, match="vocabulary"):
        check_draft_vocab(TINY, TINY.replace(vocab_size=V + 1))
    check_draft_vocab(TINY, TINY.replace(num_layers=1))


# ---------------------------------------------------------------------- the reference loop

def _prompt(batch: int):
    prompt = np.tile(np.array([[1, 3, 2, 1, 3]], np.int32), (batch, 1))
    return prompt, np.full((batch,), prompt.shape[1], np.int32)


def _exact_law(params, cfg, prompt, n_tok: int, s: Sampling) -> dict[tuple[int, ...], float]:
    """P(x_1..x_n | prompt) under the target, by enumerating every continuation."""
    seqs = np.array(list(itertools.product(range(V), repeat=n_tok)), np.int32)
    ids = jnp.asarray(np.concatenate([np.tile(prompt[:1], (len(seqs), 1)), seqs], axis=1))
    logits = decoder.forward(params, ids, cfg=cfg)[0]
    P = prompt.shape[1]
    rows = len(seqs)
    probs = probs_from_logits(logits[:, P - 1:P - 1 + n_tok], jnp.full((rows,), s.temperature_B[0]),
                              jnp.full((rows,), s.top_k_B[0]), jnp.full((rows,), s.top_p_B[0]))
    per = np.take_along_axis(np.asarray(probs), seqs[..., None], axis=-1)[..., 0]
    return {tuple(q): float(np.prod(r)) for q, r in zip(seqs, per)}


def _chi2_pvalue(samples: np.ndarray, law: dict[tuple[int, ...], float]) -> float:
    n = len(samples)
    keys = sorted(law)
    counts = {k: 0 for k in keys}
    for row in map(tuple, samples):
        counts[row] = counts.get(row, 0) + 1
    assert set(counts) == set(keys), "a sample outside the target's support"
    big = [k for k in keys if law[k] * n >= 5]
    obs = [counts[k] for k in big] + [sum(counts[k] for k in keys if k not in big)]
    exp = [law[k] * n for k in big] + [n * sum(law[k] for k in keys if k not in big)]
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return _chisquare(obs, exp)


# the two other cases in CI; this one (55 s on 2 cores) with the slow tests
@pytest.mark.parametrize("draft_kind,temperature,top_k", [pytest.param("model", 1.0, 0, marks=pytest.mark.slow),
                                                         ("model", 0.8, 3), ("ngram", 1.0, 0)])
def test_speculative_sampling_follows_the_target_distribution(draft_kind, temperature, top_k):
    cfg, params = _model(0)
    dcfg, dparams = _model(1, num_layers=1)  # an unrelated draft: q far from p, many rejections
    rows, n_tok, gamma = 24000, 3, 3
    prompt, lens = _prompt(rows)
    s = Sampling.uniform(rows, temperature, top_k)
    draft_fn = _logits_fn(dparams, dcfg) if draft_kind == "model" else None
    out, st = generate_speculative(jax.random.key(7), _logits_fn(params, cfg), prompt, lens, n_tok, gamma, s,
                                   draft_fn=draft_fn, max_ngram=2)
    assert 0.0 < st.acceptance < 1.0, st  # both branches (accept, reject) are exercised
    law = _exact_law(params, cfg, prompt, n_tok, s)
    assert _chi2_pvalue(out, law) > 1e-3
    if draft_kind == "model":  # the same test rejects the draft's own law: it has the power to fail
        draft_out = generate_plain(jax.random.key(8), _logits_fn(dparams, dcfg), prompt, lens, n_tok, s)
        assert _chi2_pvalue(draft_out, law) < 1e-6


@pytest.mark.parametrize("draft_kind", ["model", "ngram"])
def test_greedy_speculative_equals_greedy(draft_kind):
    cfg, params = _model(0)
    dparams, dcfg = early_exit_draft(params, cfg, 1)
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, V, (4, 7)).astype(np.int32)
    lens = np.array([7, 5, 6, 7], np.int32)
    s = Sampling.uniform(4)
    ref = generate_plain(jax.random.key(0), _logits_fn(params, cfg), prompt, lens, 12, s)
    for gamma in (1, 3):
        out, st = generate_speculative(jax.random.key(1), _logits_fn(params, cfg), prompt, lens, 12, gamma, s,
                                       draft_fn=_logits_fn(dparams, dcfg) if draft_kind == "model" else None)
        np.testing.assert_array_equal(out, ref)
        assert st.tokens_per_step >= 1.0


def test_acceptance_along_a_sequence():
    cfg, params = _model(0)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, V, (3, 8)), jnp.int32)
    p = decoder.forward(params, ids, cfg=cfg)[0]
    same = acceptance_along(p, p, jnp.ones((3, 8), bool), 1.0)
    assert float(same["sampled"]) == pytest.approx(1.0, abs=1e-5) and float(same["greedy"]) == 1.0
    dparams, dcfg = early_exit_draft(params, cfg, 1)
    q = decoder.forward(dparams, ids, cfg=dcfg)[0]
    other = acceptance_along(p, q, jnp.ones((3, 8), bool), 1.0)
    pv, qv = jax.nn.softmax(p, -1), jax.nn.softmax(q, -1)
    assert float(other["sampled"]) == pytest.approx(float(jnp.mean(jnp.sum(jnp.minimum(pv, qv), -1))), abs=1e-5)
