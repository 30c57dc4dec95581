"""Tensor parallelism in the serving engine: heads (and MLP, vocabulary) on the `tensor` mesh axis,
on the 8 virtual CPU devices, give the same greedy tokens as one device.

* a tiny model with 8 query and 8 KV heads on tensor=8: every head on its own device, checked
  against the one-device no-cache reference (which the one-device engine matches in
  test_serve_scheduler.py), with the parameters and the KV cache verifiably partitioned;
* the real SmolLM2-135M (9 query heads, 3 KV heads) on tensor=3.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxsys.sampling import SamplingParams
from jaxsys.sharding import make_mesh

from helpers import smollm2_path
from serve_helpers import check_idle, greedy_reference, tiny_model

TP_TINY = dict(num_heads=8, num_kv_heads=8, head_dim=8)
ENGINE = dict(page_size=4, num_pages=64, max_decode_batch=4, max_prefill_batch=4, prefill_chunk=16)


def _llm(model, mesh, shared_attention=False, **engine_kw):
    from jaxsys.serve.engine.engine import EngineConfig
    from jaxsys.serve.llm import ServingLLM

    return ServingLLM(model, config=EngineConfig(shared_attention=shared_attention, **engine_kw), mesh=mesh)


def _kv_heads_axis() -> int:
    from jaxsys.models.kv_cache import CACHE_LOGICAL_AXES
    from jaxsys.sharding import axes

    return CACHE_LOGICAL_AXES.index(axes.KV_HEADS)


def _tensor_axis_size(arr: jax.Array, dim: int) -> int:
    """How many ways `arr` is split along `dim` (1 = replicated along it)."""
    shard = arr.sharding.shard_shape(arr.shape)
    return arr.shape[dim] // shard[dim]


@pytest.mark.parametrize("shared_attention", [False, True], ids=["plain", "shared"])
def test_tiny_model_tensor8_matches_one_device(shared_attention):
    assert jax.device_count() >= 8
    model = tiny_model(1, **TP_TINY)
    mesh = make_mesh({"tensor": 8}, devices=jax.devices()[:8])
    tp = _llm(model, mesh, shared_attention, **ENGINE)

    p = tp.engine.params["layers"]
    for name, head_dim in (("wq", 2), ("wk", 2), ("wv", 2), ("wo", 1)):
        assert "tensor" in tuple(p[name].sharding.spec), f"{name}: {p[name].sharding.spec}"
        assert _tensor_axis_size(p[name], head_dim) == 8, name
        assert len(p[name].sharding.device_set) == 8
    assert _tensor_axis_size(p["w_gate"], 2) == 8 and _tensor_axis_size(p["w_down"], 1) == 8
    assert _tensor_axis_size(tp.engine.cache.k, _kv_heads_axis()) == 8  # one KV head per device

    # a shared first page (the others wait for it, then reuse it) and one unrelated prompt; one
    # prefill chunk each and <= 16 tokens in all, so few buckets compile
    rng = np.random.default_rng(0)
    system = [int(t) for t in rng.integers(0, 128, 6)]
    prompts = [system + [int(t) for t in rng.integers(0, 128, n)] for n in (1, 3, 4)]
    prompts.append([int(t) for t in rng.integers(0, 128, 5)])
    ref = greedy_reference(model, prompts, 6)  # one device, no cache
    outs = tp.generate(prompts, SamplingParams(max_tokens=6))
    assert [o.token_ids for o in outs] == ref
    assert tp.scheduler.radix.hit_tokens == 2 * 4  # two requests reused the first one's page
    check_idle(tp.scheduler)
    # the cache stayed sharded through the donated steps
    assert _tensor_axis_size(tp.engine.cache.k, _kv_heads_axis()) == 8


@pytest.mark.slow  # 90 s on 2 cores (CI budget); the tiny-model tensor=8 tests stay in CI
def test_smollm2_tensor3_matches_one_device():
    smollm2_path()  # skips when the wheel is absent
    from jaxsys.models import load_model

    model = load_model("smollm2-135m-instruct")
    assert (model.config.num_heads, model.config.num_kv_heads) == (9, 3)
    engine_kw = dict(page_size=16, num_pages=32, max_decode_batch=2, max_prefill_batch=2, prefill_chunk=64)
    mesh = make_mesh({"tensor": 3}, devices=jax.devices()[:3])
    tp = _llm(model, mesh, **engine_kw)
    wq = tp.engine.params["layers"]["wq"]
    assert "tensor" in tuple(wq.sharding.spec) and _tensor_axis_size(wq, 2) == 3
    assert _tensor_axis_size(tp.engine.cache.k, _kv_heads_axis()) == 3

    prompts = ["What is the capital of France?", "Write the word 'blue' in French."]
    sp = SamplingParams(max_tokens=8)
    outs_tp = tp.generate(prompts, sp, chat=True)
    one = _llm(model, None, **engine_kw)
    outs_one = one.generate(prompts, sp, chat=True)
    assert [o.token_ids for o in outs_tp] == [o.token_ids for o in outs_one]
    assert all(len(o.token_ids) > 0 for o in outs_tp)
    assert "Paris" in outs_tp[0].text
    check_idle(tp.scheduler)
