"""Issue 18 A: the engine's decode step returns one layer's hidden state (a static option: its own
program, the plain decode program untouched, no recompiles in steady state), and a trained length
head runs in the serving loop on those hidden states.

References are cache-free forwards of the tiny model truncated to the chosen layer with a unit
final-norm gain: at every position they give the residual after that layer, RMS-normalised,
exactly the vector the length data records (`serve/length/data.py`)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from jaxsys.sampling import SamplingParams, batch_arrays

from length_helpers import fixed_head
from serve_helpers import greedy_reference, serving_llm, tiny_model

# Compile-heavy (about 3 minutes on 2 cores), over the CI budget; run with `make test-all`.
pytestmark = pytest.mark.slow

ENGINE = dict(page_size=4, num_pages=64, max_decode_batch=4, max_prefill_batch=4, prefill_chunk=16)
PROMPTS = [[5, 17, 3, 99, 42], [7, 1, 2, 3, 4, 5, 6, 8, 9], [100, 101, 3]]
REF_T = 64


@functools.lru_cache(maxsize=None)
def _jit_forward():
    import jax

    from jaxsys.models import decoder

    return jax.jit(decoder.forward, static_argnames=("cfg", "return_hidden"))


def _layer_reference(model, seq: list[int], layer: int) -> np.ndarray:
    """[T, D]: the residual after `layer` layers, RMS-normalised, at every position of `seq`."""
    import jax
    import jax.numpy as jnp

    cfg = model.config
    ids = np.zeros((1, REF_T), np.int32)
    ids[0, :len(seq)] = seq
    truncated = {**model.params, "layers": jax.tree.map(lambda a: a[:layer], model.params["layers"]),
                 "final_norm": jnp.ones_like(model.params["final_norm"])}
    _, _, h = _jit_forward()(truncated, ids, cfg=cfg.replace(num_layers=layer), return_hidden=True)
    return np.asarray(h[0, :len(seq)])


def _engine(model, **kw):
    from jaxsys.serve.engine.engine import Engine, EngineConfig

    return Engine(model.config, model.params, EngineConfig(shared_attention=False, **{**ENGINE, **kw}))


def _prefill(engine, prompts):
    """Prefill `prompts` into pages 1 + 8 i ... of the engine's cache; returns (first tokens, tables)."""
    B, P = 4, 8
    tokens = np.zeros((B, 16), np.int32)
    positions = np.full((B, 16), -1, np.int32)
    table = np.zeros((B, P), np.int32)
    lens = np.zeros(B, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
        positions[i, :len(p)] = np.arange(len(p))
        table[i] = 1 + P * i + np.arange(P)
        lens[i] = len(p)
    sampling = batch_arrays([SamplingParams()] * len(prompts), B)
    nxt = engine.prefill(tokens, positions, table, lens, np.maximum(lens - 1, 0), sampling)
    return nxt, table, sampling


@pytest.mark.parametrize("layer", [1, 2])
def test_decode_hidden_matches_cache_free_forward(layer):
    """Greedy decode steps through `decode_with_hidden`: the tokens are the reference's and every
    row's hidden state is the truncated cache-free forward's at that position (fp32, 1e-4)."""
    from jaxsys.serve.length.serving import rms_normalise

    model = tiny_model(3)
    engine = _engine(model)
    nxt, table, sampling = _prefill(engine, PROMPTS)
    seqs = [list(p) + [int(nxt[i])] for i, p in enumerate(PROMPTS)]
    hidden = [[] for _ in PROMPTS]
    for _ in range(4):
        tokens = np.zeros(4, np.int32)
        positions = np.full(4, -1, np.int32)
        lens = np.zeros(4, np.int32)
        for i, s in enumerate(seqs):
            tokens[i], positions[i], lens[i] = s[-1], len(s) - 1, len(s)
        nxt, h_BxD = engine.decode_with_hidden(layer, tokens, positions, table, lens, sampling)
        assert h_BxD.shape == (4, model.config.hidden_size) and h_BxD.dtype == np.float32
        for i, s in enumerate(seqs):
            hidden[i].append((len(s) - 1, h_BxD[i]))
            s.append(int(nxt[i]))
    ref_tokens = greedy_reference(model, PROMPTS, 5)
    for i, s in enumerate(seqs):
        assert s[len(PROMPTS[i]):] == ref_tokens[i]
        ref = _layer_reference(model, s, layer)
        for pos, h in hidden[i]:
            np.testing.assert_allclose(rms_normalise(h[None], model.config.rms_norm_eps)[0], ref[pos],
                                       rtol=1e-4, atol=1e-4)


def test_off_path_is_the_plain_step_and_nothing_recompiles():
    """The engine's decode program is the step function every other path runs (`make_step_fns`),
    whatever hidden steps ran before; after one round over the shapes, interleaving plain and hidden
    steps compiles nothing, and the two programs differ only by the hidden output."""
    import jax

    from jaxsys.generation import make_step_fns

    model = tiny_model(3)
    engine = _engine(model)
    nxt, table, sampling = _prefill(engine, PROMPTS)
    tokens = np.zeros(4, np.int32)
    positions = np.full(4, -1, np.int32)
    lens = np.zeros(4, np.int32)
    for i, p in enumerate(PROMPTS):
        tokens[i], positions[i], lens[i] = nxt[i], len(p), len(p) + 1

    def run(hidden: bool):
        nonlocal tokens, positions, lens
        if hidden:
            out, _ = engine.decode_with_hidden(1, tokens, positions, table, lens, sampling)
        else:
            out = engine.decode(tokens, positions, table, lens, sampling)
        tokens = out.astype(np.int32)
        live = positions >= 0
        positions = np.where(live, positions + 1, -1).astype(np.int32)
        lens = np.where(live, lens + 1, 0).astype(np.int32)

    run(False)
    run(True)
    compiled = engine.compile_count
    for hidden in (False, True, True, False, True, False):
        run(hidden)
    assert engine.compile_count == compiled

    args = (engine.params, engine.cache, tokens, positions, table, lens, *sampling, None)
    plain = jax.jit(make_step_fns(model.config, engine._decode_attention)[1], donate_argnums=1)
    assert engine._decode_jit.lower(*args).as_text() == plain.lower(*args).as_text()
    plain_out = jax.eval_shape(engine._decode_jit, *args)
    hidden_out = jax.eval_shape(engine._hidden_decode_jits[1], *args)
    assert jax.tree.structure(hidden_out[:2]) == jax.tree.structure(plain_out)
    assert hidden_out[2].shape == (4, model.config.hidden_size)


@pytest.mark.parametrize("inputs,layer", [("hidden_layer", 1), ("hidden_final", None)])
def test_tracker_predicts_from_the_engine_hidden_states(tmp_path, inputs, layer):
    """Shared-prefix serving with a tracker every 3 steps: every prediction is the head applied to
    the reference hidden state at that request's position (smoothed across re-predictions in
    order), the tokens are unchanged, and a second run of the workload compiles nothing."""
    from jaxsys.serve.length.serving import LengthTracker

    from serve_helpers import drive

    model = tiny_model(3)
    head = fixed_head(model, tmp_path, inputs, layer)
    llm = serving_llm(model, True, **ENGINE)
    tracker = LengthTracker(head, every=3)
    tracker.attach(llm.scheduler)
    sp = SamplingParams(max_tokens=10)
    seen: dict[str, dict[int, float]] = {}
    reqs = []

    def record(_):
        for r in reqs:
            p = tracker.prediction(r.request_id)
            if p is not None:
                seen.setdefault(r.request_id, {})[p.g] = p.remaining

    for p in PROMPTS:
        reqs.append(llm.submit(p, sp, on_output=lambda _: None))
    drive(llm.scheduler, on_step=record)
    assert [r.out_tokens for r in reqs] == greedy_reference(model, PROMPTS, 10)
    assert tracker.hidden_steps >= 3 and tracker.stats()["active"]

    for r in reqs:
        preds = seen[r.request_id]
        ref = _layer_reference(model, r.prompt_ids + r.out_tokens, layer or model.config.num_layers)
        if inputs == "hidden_final":
            ref = ref * np.asarray(model.params["final_norm"])[None, :]
        state = None
        for g in sorted(preds):
            h = ref[r.prompt_len - 1 + g][None]
            state = head.smooth(state, h)
            want = head.predict_hidden(state, np.array([g]))[0]
            np.testing.assert_allclose(preds[g], want, rtol=1e-4, atol=1e-3)
        assert len(preds) >= 2

    compiled = llm.engine.compile_count
    again = [llm.submit(p, sp, on_output=lambda _: None) for p in PROMPTS]
    drive(llm.scheduler)
    assert [r.out_tokens for r in again] == [r.out_tokens for r in reqs]
    assert llm.engine.compile_count == compiled


def test_untrained_predictor_falls_back_with_a_warning():
    from jaxsys.serve.length.predictor import LengthPredictor
    from jaxsys.serve.length.serving import LengthTracker

    model = tiny_model(3)
    llm = serving_llm(model, False, **ENGINE)
    with pytest.warns(RuntimeWarning, match="balancing on current load"):
        tracker = LengthTracker(LengthPredictor("ours_layer", "hidden_layer", True, 16), every=2)
    tracker.attach(llm.scheduler)
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=6))
    assert out[0].token_ids == greedy_reference(model, [PROMPTS[0]], 6)[0]
    assert tracker.hidden_steps == 0 and tracker.prediction(out[0].request_id) is None
    assert not any("decode_hidden" in str(k[0]) for k in llm.engine._executables)
