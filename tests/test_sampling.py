"""Token sampling (greedy, temperature, top-k, top-p, per-request seeds) and stop strings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsys import sampling
from jaxsys.sampling import SamplingParams, StopMatcher, batch_arrays, sample

V = 64
_sample = jax.jit(sample)


def _logits(B, seed=0, scale=3.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal((B, V)), jnp.float32)


def _run(logits, *, temperature=0.0, top_k=0, top_p=1.0, seeds=None, steps=None):
    B = logits.shape[0]
    full = lambda v, dt: jnp.full((B,), v, dt)  # noqa: E731
    seeds = jnp.arange(B, dtype=jnp.int32) if seeds is None else jnp.asarray(seeds, jnp.int32)
    steps = jnp.zeros(B, jnp.int32) if steps is None else jnp.asarray(steps, jnp.int32)
    return np.asarray(_sample(logits, full(temperature, jnp.float32), full(top_k, jnp.int32),
                              full(top_p, jnp.float32), seeds, steps))


def test_greedy_is_argmax():
    logits = _logits(32)
    np.testing.assert_array_equal(_run(logits), np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature):
    logits = _logits(32, seed=1)
    np.testing.assert_array_equal(_run(logits, temperature=temperature, top_k=1), np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_tiny_top_p_is_greedy(temperature):
    logits = _logits(32, seed=2)
    np.testing.assert_array_equal(_run(logits, temperature=temperature, top_p=1e-6), np.argmax(np.asarray(logits), -1))


def test_sampled_tokens_come_from_the_top_k_set():
    B, k = 512, 5
    row = _logits(1, seed=3, scale=1.0)  # flat-ish: without the cut, the tail would be sampled often
    logits = jnp.broadcast_to(row, (B, V))
    toks = _run(logits, temperature=1.5, top_k=k, seeds=np.arange(B))
    top = set(np.argsort(-np.asarray(row[0]))[:k].tolist())
    assert set(toks.tolist()) <= top
    assert len(set(toks.tolist())) == k  # and all k are reachable
    # without top-k the same seeds leave the set
    assert not set(_run(logits, temperature=1.5, seeds=np.arange(B)).tolist()) <= top


def test_sampled_tokens_come_from_the_nucleus():
    B = 512
    row = np.full(V, -10.0, np.float32)
    row[[7, 11, 30]] = [2.0, 1.5, 1.0]  # ~0.50/0.30/0.18 of the mass, the rest ~0.02 in total
    logits = jnp.broadcast_to(jnp.asarray(row), (B, V))
    toks = set(_run(logits, temperature=1.0, top_p=0.75, seeds=np.arange(B)).tolist())
    assert toks == {7, 11}  # mass before 30 is 0.80 >= 0.75: cut; before 11 is 0.50 < 0.75: kept


def test_temperature_sampling_follows_the_softmax():
    """4000 independent draws of a 4-token distribution: frequencies within 4 standard errors."""
    B = 4000
    row = np.full(V, -1e9, np.float32)
    row[:4] = [0.0, 1.0, 2.0, 3.0]
    logits = jnp.broadcast_to(jnp.asarray(row), (B, V))
    for temperature in (1.0, 2.0):
        toks = _run(logits, temperature=temperature, seeds=np.arange(B))
        want = np.exp(row[:4] / temperature) / np.sum(np.exp(row[:4] / temperature))
        freq = np.bincount(toks, minlength=V)[:4] / B
        assert np.bincount(toks, minlength=V)[4:].sum() == 0
        se = np.sqrt(want * (1 - want) / B)
        assert np.all(np.abs(freq - want) <= 4 * se), (temperature, freq, want)


def test_same_seed_and_step_same_token_in_any_batch():
    """A request's draw depends only on its (seed, step) and logits, not on its row or batch."""
    row = _logits(1, seed=4, scale=0.5)[0]  # flat: many tokens are likely, so a wrong key shows
    seed, step = 1234, 17
    alone = _run(row[None], temperature=1.0, seeds=[seed], steps=[step])[0]
    for B, pos in ((4, 2), (32, 0), (32, 31)):
        others = _logits(B, seed=5 + B, scale=0.5)
        logits = others.at[pos].set(row)
        seeds = np.arange(100, 100 + B)
        steps = np.arange(B) * 3
        seeds[pos], steps[pos] = seed, step
        got = _run(logits, temperature=1.0, seeds=seeds, steps=steps)
        assert got[pos] == alone
    # ...and different seeds or steps do draw differently
    draws = {int(_run(row[None], temperature=1.0, seeds=[s], steps=[step])[0]) for s in range(40)}
    draws |= {int(_run(row[None], temperature=1.0, seeds=[seed], steps=[t])[0]) for t in range(40)}
    assert len(draws) > 5


def test_mixed_batch_greedy_rows_stay_greedy():
    logits = _logits(32, seed=6, scale=0.5)
    temp = jnp.asarray([0.0, 1.0] * 16, jnp.float32)
    toks = np.asarray(_sample(logits, temp, jnp.zeros(32, jnp.int32), jnp.ones(32, jnp.float32),
                              jnp.arange(32, dtype=jnp.int32), jnp.zeros(32, jnp.int32)))
    np.testing.assert_array_equal(toks[::2], np.argmax(np.asarray(logits), -1)[::2])


def test_batch_arrays_pads_with_greedy_rows():
    ps = [SamplingParams(temperature=0.5, top_k=3, top_p=0.9, seed=7), SamplingParams()]
    temp, top_k, top_p, seed = batch_arrays(ps, 4)
    np.testing.assert_array_equal(temp, np.array([0.5, 0, 0, 0], np.float32))
    np.testing.assert_array_equal(top_k, [3, 0, 0, 0])
    np.testing.assert_allclose(top_p, [0.9, 1, 1, 1])
    np.testing.assert_array_equal(seed, [7, 0, 0, 0])
    assert temp.dtype == np.float32 and top_k.dtype == np.int32 and seed.dtype == np.int32


# ---------------------------------------------------------------------- SamplingParams

@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"top_k": -1}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"stop": ("ok", "")}, "stop"),
    ({"stop": tuple(f"s{i}" for i in range(sampling.MAX_STOP_STRINGS + 1))}, "stop strings"),
])
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_stop_normalization():
    p = SamplingParams(stop="END")
    assert p.stop == ("END",) and p.temperature == 0.0 and p.top_p == 1.0
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    SamplingParams(stop=tuple(f"s{i}" for i in range(sampling.MAX_STOP_STRINGS)))  # the limit itself is fine
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0


# ---------------------------------------------------------------------- StopMatcher

def _feed(stops, pieces):
    m = StopMatcher(stops)
    out, seen = [], ""
    stopped = False
    for piece in pieces:
        emitted, stopped = m.push(piece)
        out.append(emitted)
        seen += piece
        if stopped:
            break
        # emits everything except a tail that could still begin a stop string
        hold = max([k for s in stops for k in range(1, len(s)) if seen.endswith(s[:k])], default=0)
        assert "".join(out) == seen[:len(seen) - hold]
    tail = "" if stopped else m.flush()
    return "".join(out) + tail, stopped


def test_stop_across_piece_boundaries():
    assert _feed(["<END>"], ["Hello <E", "N", "D> ignored"]) == ("Hello ", True)
    assert _feed(["\n\n"], ["a\n", "\nb"]) == ("a", True)
    assert _feed(["stop"], ["no st", "opping"]) == ("no ", True)
    assert _feed(["xyz"], ["xy", "z"]) == ("", True)


def test_partial_match_that_fails_is_released():
    m = StopMatcher(["<END>"])
    assert m.push("a <EN") == ("a ", False)  # "<EN" held back
    assert m.push("X") == ("<ENX", False)  # no longer a stop prefix
    assert m.flush() == ""


def test_flush_returns_held_text_when_no_stop():
    m = StopMatcher(["STOP"])
    assert m.push("the end ST") == ("the end ", False)
    assert m.flush() == "ST"
    assert m.text == "the end ST"


def test_after_stop_nothing_more():
    m = StopMatcher(["!"])
    assert m.push("hi! there") == ("hi", True)
    assert m.push("more") == ("", True)
    assert m.text == "hi"


def test_several_stop_strings_earliest_wins():
    assert _feed(["END", "\n"], ["one\ntwo END"]) == ("one", True)
    assert _feed(["END", "\n"], ["one END\n"]) == ("one ", True)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text("ab\n", max_size=30), st.text("ab\n", min_size=1, max_size=4), st.data())
def test_stop_matcher_never_leaks(text, stop, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    out, stopped = _feed([stop], pieces)
    idx = text.find(stop)
    assert out == (text[:idx] if idx >= 0 else text)
    assert stopped == (idx >= 0)
    assert stop not in out
