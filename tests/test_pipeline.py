"""Pipeline parallelism on 8 virtual CPU devices: schedules, partitions, the unit executables
against the decoder, and the pipelined step bitwise equal to the one-device run for every layout
(data x stage, uneven partitions, GPipe and 1F1B)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.models import decoder
from jaxsys.models.config import ModelConfig
from jaxsys.train import objective
from jaxsys.train.config import OptimConfig
from jaxsys.train.data import SyntheticSource
from jaxsys.train.elastic.compile import ExecutableCache
from jaxsys.train.pipeline.partition import PartitionError, StageMap, StagePartition
from jaxsys.train.pipeline.runtime import PipelineLayout, PipelineRun, PipelineSetup
from jaxsys.train.pipeline.schedule import BWD, FWD, IDLE, ScheduleError, WorkPlan, compile_schedule
from jaxsys.train.pipeline.units import UnitPrograms

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=8)
M, B_MICRO, T = 8, 1, 8
SETUP = PipelineSetup(model=CFG, optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), num_micro=M,
                      micro_size=B_MICRO, seq_len=T, dropout=0.1, chunk=256)
STEPS = 2


def batches(n: int) -> list[np.ndarray]:
    src = SyntheticSource(vocab_size=CFG.vocab_size, seq_len=T, seed=0)
    return [np.stack([src.sample(s * M * B_MICRO + i) for i in range(M * B_MICRO)]) for s in range(n)]


def params():
    return jax.device_get(decoder.init_params(CFG, jax.random.key(0)))


# ----------------------------------------------------------------------------- schedules (pure)
def check_schedule(t):
    """Every op once, at most one op per device and round, data dependencies respected."""
    plan, last = t.plan, t.num_stages - 1
    when = {}
    for d in range(t.num_devices):
        for r in range(t.num_rounds):
            if t.op[d, r] != IDLE:
                key = (int(t.op[d, r]), int(t.micro[d, r]), int(t.stage[d, r]))
                assert key not in when
                when[key] = r
                assert plan.device_of[key[1]][key[2]] == d
    for m in range(plan.num_micro):
        for s in range(t.num_stages):
            if s < last:
                assert when[(FWD, m, s)] < when[(BWD, m, s)]
                nxt = (FWD, m, s + 1) if s + 1 < last else (BWD, m, s + 1)
                assert when[(FWD, m, s)] < when[nxt]
                assert when[(BWD, m, s + 1)] < when[(BWD, m, s)]
    assert len(when) == plan.num_micro * (2 * t.num_stages - 1)


@pytest.mark.parametrize("dp,pp,m", [(1, 1, 4), (1, 4, 8), (2, 2, 8), (2, 3, 6), (1, 2, 3)])
def test_schedules_are_valid(dp, pp, m):
    for kind in ("gpipe", "1f1b"):
        t = compile_schedule(WorkPlan.grid(dp, pp, m), kind)
        check_schedule(t)
        if kind == "gpipe":  # every forward of a device before any of its backwards
            for d in range(t.num_devices):
                ops = [o for o in t.op[d] if o != IDLE]
                if FWD in ops:
                    assert max(i for i, o in enumerate(ops) if o == FWD) < min(i for i, o in enumerate(ops) if o == BWD)


def test_1f1b_keeps_fewer_micro_batches_than_gpipe():
    plan = WorkPlan.grid(1, 4, 16)
    g, f = compile_schedule(plan, "gpipe"), compile_schedule(plan, "1f1b")
    assert f.peak_in_flight().tolist() == [4, 3, 2, 0]  # pp - s, the 1F1B bound
    assert g.peak_in_flight().tolist() == [16, 16, 16, 0]
    assert 0.0 < g.bubble_fraction() < 1.0 and 0.0 < f.bubble_fraction() < 1.0


def test_bad_plans_are_rejected():
    with pytest.raises(ScheduleError, match="cannot feed"):
        WorkPlan.grid(4, 2, 3)
    with pytest.raises(ScheduleError, match="unknown schedule"):
        compile_schedule(WorkPlan.grid(1, 2, 4), "zero-bubble")
    with pytest.raises(ScheduleError, match="still have work"):
        WorkPlan.grid(2, 2, 4).renumbered([0, 1, 2])


# ----------------------------------------------------------------------------- partitions (pure)
def test_partitions():
    assert StagePartition.balanced(5, 2).layers == (3, 2)
    assert StagePartition.by_cost([1, 1, 1, 1, 1, 1], 3, first_extra=1.0).layers == (1, 2, 3)
    with pytest.raises(PartitionError):
        StagePartition((2, 0))
    with pytest.raises(PartitionError, match="layers"):
        StageMap.make(CFG, StagePartition((1, 2)))
    with pytest.raises(PartitionError, match="tied"):
        StageMap.make(CFG.replace(tie_word_embeddings=True), StagePartition((2, 2)))
    smap = StageMap.make(CFG, StagePartition((1, 3)))
    every = np.sort(np.concatenate([smap.positions(s) for s in range(2)]))
    np.testing.assert_array_equal(every, np.arange(smap.flat.num_params))  # each element in one stage


# ----------------------------------------------------------------------------- units vs the decoder
def test_units_match_the_decoder():
    """One micro-batch through the unit executables: loss against objective.lm_loss_sum, every
    gradient against jax.grad of the whole model (fp32, 1e-5: the units round differently)."""
    p = params()
    units = UnitPrograms.shared(CFG, micro_size=2, seq_len=T, dropout=0.1, seed=0)
    dev = jax.devices()[0]
    smap = StageMap.make(CFG, StagePartition((4,)))
    flat = smap.flat.flatten_np(p)
    tok = np.stack([SyntheticSource(vocab_size=64, seq_len=T, seed=1).sample(i) for i in range(2)])
    ex = np.array([3, 4], np.int32)
    keys = units.get("keys", dev)(np.int32(5), ex)
    x = units.get("embed_forward", dev)(flat[smap.embed_positions], tok)
    saved = []
    for l in range(4):
        saved.append(x)
        x = units.get("layer_forward", dev)(flat[smap.layer_positions[l]][None], x, np.int32(l), keys)
    loss, g_head, ct = units.get("head_backward", dev)(flat[smap.head_positions], x, tok)
    g = np.zeros_like(flat)
    g[smap.head_positions] = np.asarray(g_head)
    for l in reversed(range(4)):
        gl, ct = units.get("layer_backward", dev)(flat[smap.layer_positions[l]][None], saved[l], ct, np.int32(l), keys)
        g[smap.layer_positions[l]] = np.asarray(gl)[0]
    g[smap.embed_positions] = np.asarray(units.get("embed_backward", dev)(tok, ct))
    keys_ref = objective.example_keys(jax.random.key(0), jnp.int32(5), jnp.asarray(ex))
    ref_loss, ref_g = jax.value_and_grad(
        lambda q: objective.lm_loss_sum(q, jnp.asarray(tok), keys_ref, cfg=CFG, dropout=0.1))(p)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    np.testing.assert_allclose(g, smap.flat.flatten_np(jax.device_get(ref_g)), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the pipelined step
_CACHE = ExecutableCache()


def train(n_devices: int, layout: PipelineLayout, steps: int = STEPS):
    run = PipelineRun(SETUP, jax.devices()[:n_devices], layout, cache=_CACHE)
    run.init_state(params())
    out = [run.step(s, b, 1e-2) for s, b in enumerate(batches(steps))]
    return [(float(m["loss"]), tuple(int(c) for c in m["param_checksum"])) for m in out], run


@pytest.fixture(scope="module")
def reference():
    """The one-device run: all layers in one stage, every micro-batch on device 0."""
    return train(1, PipelineLayout.grid(dp=1, pp=1, num_micro=M, num_layers=4))


LAYOUTS = {
    "dp2_pp2_1f1b": (4, PipelineLayout.grid(dp=2, pp=2, num_micro=M, num_layers=4, schedule="1f1b")),
    "dp1_pp4_gpipe": (4, PipelineLayout.grid(dp=1, pp=4, num_micro=M, num_layers=4, schedule="gpipe")),
    "dp2_pp3_uneven": (6, PipelineLayout.grid(dp=2, pp=3, num_micro=M, partition=StagePartition((1, 2, 1)))),
    "dp4_pp2_3plus1": (8, PipelineLayout.grid(dp=4, pp=2, num_micro=M, partition=StagePartition((3, 1)))),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_pipeline_is_bitwise_the_one_device_run(reference, name):
    n, layout = LAYOUTS[name]
    ref_metrics, ref_run = reference
    metrics, run = train(n, layout)
    assert metrics == ref_metrics
    np.testing.assert_array_equal(run.flat_host().view(np.uint32), ref_run.flat_host().view(np.uint32))


def test_loss_decreases_and_memory_report(reference):
    _, layout = LAYOUTS["dp2_pp2_1f1b"]
    metrics, run = train(4, layout, steps=6)
    assert metrics[-1][0] < metrics[0][0]
    rep = run.memory_report()
    assert [d["stages"] for d in rep["per_device"]] == [[0], [1], [0], [1]]
    assert rep["per_device"][0]["micro_batches_in_flight"] == 2
    assert 0.0 < rep["bubble_fraction_slots"] < 1.0
