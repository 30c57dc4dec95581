"""One result type for both ways to generate.

`jaxsys.generate` (the reference loop) and the serving engine (`ServingLLM.generate`) return
`jaxsys.GenerationResult`s with the same fields, and for the same greedy requests the same tokens
and finish reasons, both checked against the plain causal forward without a KV cache
(`serve_helpers.greedy_reference`); an EOS token ends a request in both the same way.
"""

from __future__ import annotations

import dataclasses

import pytest

import jaxsys
from jaxsys.sampling import SamplingParams

from serve_helpers import greedy_reference, serving_llm, tiny_model

ENGINE = dict(page_size=4, num_pages=64, max_decode_batch=4, max_prefill_batch=4, prefill_chunk=16)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 8, 20, 21], [5, 6, 7]]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def eos_model():
    """The tiny model with an EOS token that the greedy continuation of PROMPTS[1] produces
    third, so that request stops early and the others run to max_tokens."""
    free_running = greedy_reference(tiny_model(0), PROMPTS, MAX_TOKENS)
    eos = free_running[1][2]
    return tiny_model(0, eos_token_ids=(eos,))


@pytest.fixture(scope="module")
def expected(eos_model):
    return greedy_reference(eos_model, PROMPTS, MAX_TOKENS, eos=eos_model.config.eos_token_ids)


@pytest.fixture(scope="module")
def from_reference_loop(eos_model):
    return jaxsys.generate(eos_model, PROMPTS, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def engine_run(eos_model):
    llm = serving_llm(eos_model, False, **ENGINE)
    stats = llm.scheduler.stats
    results = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS))
    return results, stats, llm.scheduler.radix.hit_tokens


def _comparable(result) -> dict:
    """A result's fields without the ones that differ by construction (ids, timings)."""
    fields = dataclasses.asdict(result)
    for name in ("request_id", "ttft_s", "tpot_s"):
        fields.pop(name)
    return fields


def test_reference_loop_matches_the_causal_forward(from_reference_loop, expected):
    assert [r.token_ids for r in from_reference_loop] == expected
    assert [r.finish_reason for r in from_reference_loop] == [
        "length" if len(t) == MAX_TOKENS else "stop" for t in expected]
    assert "stop" in {r.finish_reason for r in from_reference_loop}, "the EOS should end one request"
    assert [r.prompt_ids for r in from_reference_loop] == PROMPTS


def test_engine_returns_the_reference_loops_results(from_reference_loop, engine_run):
    from_engine, _, _ = engine_run
    assert all(type(r) is jaxsys.GenerationResult for r in from_engine + from_reference_loop)
    assert [_comparable(r) for r in from_engine] == [_comparable(r) for r in from_reference_loop]


@pytest.mark.parametrize("way", ["reference_loop", "engine"])
def test_timings(way, from_reference_loop, engine_run):
    results = from_reference_loop if way == "reference_loop" else engine_run[0]
    for r in results:
        assert r.ttft_s > 0
        # one interval per token after the first; an EOS that ends a request adds its own
        assert len(r.tpot_s) in (len(r.token_ids) - 1, len(r.token_ids))
        assert all(t >= 0 for t in r.tpot_s)
        assert r.decode_tokens_per_s > 0 or len(r.token_ids) <= 1


def test_engine_phase_counters(engine_run):
    """The scheduler's prefill/decode counters: prompt tokens computed (the rest came from the
    prefix cache) and one decode row per token after a request's first (plus an EOS step)."""
    results, stats, hit_tokens = engine_run
    assert stats.prefill_tokens == sum(map(len, PROMPTS)) - hit_tokens
    assert hit_tokens > 0, "PROMPTS[0] and PROMPTS[1] share two whole pages"
    eos_steps = sum(r.finish_reason == "stop" for r in results)
    assert stats.decode_tokens == sum(len(r.token_ids) - 1 for r in results) + eos_steps
    assert stats.prefill_s > 0 and stats.decode_s > 0
