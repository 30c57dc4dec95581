"""Recovery strategies, the performance model and the simulated cluster.

The strategies run on 4 virtual CPU devices (2 pipelines x 2 stages, 4 layers, 4 micro-batches):
device 1 fails at the start of step 2; each strategy recovers and the run continues. Every
strategy's losses, parameter checksums and final state are bitwise those of the failure-free run
(global batch, gradient scale and per-example dropout keys kept)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from jaxsys.models import decoder
from jaxsys.models.config import ModelConfig
from jaxsys.train.config import OptimConfig
from jaxsys.train.data import SyntheticSource
from jaxsys.train.elastic.compile import ExecutableCache
from jaxsys.train.pipeline.partition import StagePartition
from jaxsys.train.pipeline.runtime import PipelineLayout, PipelineRun, PipelineSetup
from jaxsys.train.pipeline.schedule import WorkPlan, compile_schedule
from jaxsys.train.recovery import model as pm
from jaxsys.train.recovery import simulate as sim
from jaxsys.train.recovery import strategies as rs

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=8)
M, T, STEPS, FAIL_AT, FAILED = 4, 8, 4, 2, 1
SETUP = PipelineSetup(model=CFG, optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), num_micro=M,
                      micro_size=1, seq_len=T, dropout=0.1, chunk=256)
GRID = PipelineLayout.grid(dp=2, pp=2, num_micro=M, num_layers=4, schedule="1f1b")


def batches():
    src = SyntheticSource(vocab_size=CFG.vocab_size, seq_len=T, seed=0)
    return [np.stack([src.sample(s * M + i) for i in range(M)]) for s in range(STEPS)]


_CACHE = ExecutableCache()


def new_run():
    run = PipelineRun(SETUP, jax.devices()[:4], GRID, cache=_CACHE)
    run.init_state(jax.device_get(decoder.init_params(CFG, jax.random.key(0))))
    return run


def metrics_of(m):
    return float(m["loss"]), tuple(int(c) for c in m["param_checksum"])


@pytest.fixture(scope="module")
def failure_free():
    run = new_run()
    out = [metrics_of(run.step(s, b, 1e-2)) for s, b in enumerate(batches())]
    return out, run.flat_host()


# ----------------------------------------------------------------------------- plans (pure)
def test_reroute_and_redundant_plans():
    plan = WorkPlan.grid(2, 2, 4)  # pipeline 0: devices 0, 1; pipeline 1: devices 2, 3
    rr = rs.reroute_plan(plan, [1])
    assert all(row[1] == 3 for row in rr.device_of)  # stage 1's only live replica
    assert [row[0] for row in rr.device_of] == [row[0] for row in plan.device_of]
    rd = rs.redundant_plan(plan, [1])
    assert [row[1] for row in rd.device_of] == [0, 0, 3, 3]  # the previous stage of the same pipeline
    rd0 = rs.redundant_plan(plan, [2])
    assert [row[0] for row in rd0.device_of] == [0, 0, 3, 3]  # first stage: the next one
    with pytest.raises(rs.RecoveryError, match="every data-parallel replica"):
        rs.reroute_plan(plan, [1, 3])
    with pytest.raises(rs.RecoveryError, match="neighbouring"):
        rs.redundant_plan(plan, [0, 1])
    with pytest.raises(rs.RecoveryError, match="no neighbouring stage"):
        rs.redundant_plan(WorkPlan.grid(4, 1, 4), [0])
    for p in (rr.renumbered([0, 2, 3]), rd.renumbered([0, 2, 3])):
        compile_schedule(p, "1f1b")  # a valid schedule on the survivors


# ----------------------------------------------------------------------------- strategies (devices)
def _continue(run, start):
    return [metrics_of(run.step(s, b, 1e-2)) for s, b in list(enumerate(batches()))[start:]]


@pytest.mark.parametrize("strategy", ["reroute", "redundant", "replan"])
def test_in_memory_strategy_is_bitwise_the_failure_free_run(failure_free, strategy):
    ref, ref_flat = failure_free
    run = new_run()
    before = [metrics_of(run.step(s, b, 1e-2)) for s, b in list(enumerate(batches()))[:FAIL_AT]]
    snap = rs.snapshot(run, FAIL_AT)
    layout = PipelineLayout.grid(dp=1, pp=3, num_micro=M, partition=StagePartition((2, 1, 1))) \
        if strategy == "replan" else None
    rep = rs.recover_in_memory(run, snap, [FAILED], strategy, layout=layout)
    assert rep.devices_after == 3 and rep.elements_moved > 0
    assert FAILED not in [d.id for d in run.devices]
    after = _continue(run, FAIL_AT)
    assert before + after == ref
    np.testing.assert_array_equal(run.flat_host().view(np.uint32), ref_flat.view(np.uint32))


def test_checkpoint_restart_is_bitwise_the_failure_free_run(failure_free, tmp_path):
    ref, ref_flat = failure_free
    run = new_run()
    got = {}
    for s, b in list(enumerate(batches()))[:FAIL_AT]:
        if s == 1:
            rs.save_checkpoint(run, tmp_path, s)
        got[s] = metrics_of(run.step(s, b, 1e-2))
    layout = PipelineLayout.grid(dp=1, pp=3, num_micro=M, partition=StagePartition((1, 2, 1)), schedule="gpipe")
    rep = rs.recover_from_checkpoint(run, [FAILED], tmp_path, layout=layout, step=FAIL_AT)
    assert rep.lost_steps == 1
    for s, b in list(enumerate(batches()))[FAIL_AT - rep.lost_steps:]:
        got[s] = metrics_of(run.step(s, b, 1e-2))
    assert [got[s] for s in range(STEPS)] == ref
    np.testing.assert_array_equal(run.flat_host().view(np.uint32), ref_flat.view(np.uint32))


def test_unknown_failed_device_is_rejected():
    run = new_run()
    with pytest.raises(rs.RecoveryError, match="not in this run"):
        rs.recover_in_memory(run, rs.snapshot(run, 0), [7], "reroute")


# ----------------------------------------------------------------------------- the model (pure)
@pytest.fixture(scope="module")
def cluster():
    c = pm.load_cluster("h100_32")
    return c, pm.Costs.for_cluster(c, bwd_ratio=3.0), pm.Hardware.of(c)


def test_model_step_time_is_the_pipeline_formula(cluster):
    c, costs, hw = cluster
    lay = pm.Layout(dp=1, pp=4, tp=1, partition=(8, 8, 8, 8))
    t = pm.stage_times(lay, costs, hw)
    comm = 2 * hw.transfer(costs.act_bytes, same_node=True)
    n = c.model.num_micro
    expect = (n - 1) * max(x + comm for x in t) + sum(x + comm for x in t)
    assert pm.estimate(lay, costs, hw, n).step_s == pytest.approx(expect)
    # a 1F1B stage keeps pp - s micro-batches, GPipe all of them
    g = dataclasses_replace(lay, schedule="gpipe")
    assert pm.memory(g, costs, n) > pm.memory(lay, costs, n)


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_model_degraded_plans_and_choice(cluster):
    c, costs, hw = cluster
    rp = pm.RecoveryParams.of(c)
    lay = pm.Layout(dp=4, pp=4, tp=2, partition=(8, 8, 8, 8))
    base = pm.estimate(lay, costs, hw, c.model.num_micro).step_s
    opts = {o.strategy: o for o in pm.options(lay, [(0, 1)], 30, costs, hw, rp, num_layers=32,
                                              num_micro=c.model.num_micro, since_checkpoint_s=900.0)}
    assert set(opts) == set(pm.STRATEGIES)
    assert opts["reroute"].step_s >= base and opts["redundant"].step_s >= base
    assert opts["checkpoint"].recovery_s > opts["replan"].recovery_s > opts["reroute"].recovery_s
    best = pm.choose(list(opts.values()), 10_000)
    assert best.time_to_finish(10_000) == min(o.time_to_finish(10_000) for o in opts.values())
    # a stage that lost every replica cannot be rerouted around
    dead = [(d, 1) for d in range(4)]
    o = {o.strategy: o for o in pm.options(lay, dead, 24, costs, hw, rp, num_layers=32,
                                           num_micro=c.model.num_micro, since_checkpoint_s=0.0)}
    assert not o["reroute"].feasible and math.isinf(o["reroute"].time_to_finish(1))


def test_model_rejects_layouts_that_do_not_fit(cluster):
    c, costs, hw = cluster
    small = pm.Hardware(hw.devices_per_node, hw.intra_bw, hw.inter_bw, hw.latency, memory=8 * 2**30)
    est = pm.estimate(pm.Layout(1, 1, 1, (32,)), costs, small, c.model.num_micro)
    assert not est.feasible and "GiB" in est.why
    assert pm.search_layouts(2, costs, small, 32, c.model.num_micro) is None


def test_unknown_cluster_names_the_packaged_ones():
    with pytest.raises(FileNotFoundError, match="h100_32"):
        pm.load_cluster("tpu_pod")


# ----------------------------------------------------------------------------- simulation (pure)
def test_simulation(cluster):
    c, costs, _ = cluster
    quiet = sim.simulate(c, costs, [], "ours", trace_name="none")
    assert quiet.steps == pytest.approx(c.run.hours * 3600 / quiet.failure_free_step_s)
    trace = sim.make_trace(c, kind="bursty", seed=3)
    assert trace == sim.make_trace(c, kind="bursty", seed=3)
    assert any(e.kind == "fail" for e in trace)
    res = {p: sim.simulate(c, costs, trace, p, trace_name="bursty") for p in sim.POLICIES}
    for r in res.values():
        assert 0 < r.steps < quiet.steps
    assert all(r.strategy == "checkpoint" for r in res["checkpoint"].recoveries)
    # no policy's post-recovery steps beat the best layout of the devices still alive
    for r in res.values():
        assert r.post_recovery_ratio() <= r.post_recovery_ceiling() + 1e-12
    assert res["replan"].post_recovery_ratio() == pytest.approx(res["replan"].post_recovery_ceiling())
    with pytest.raises(ValueError, match="unknown policy"):
        sim.simulate(c, costs, trace, "oracle")


def test_choice_on_a_run_maps_cells_and_layouts():
    """The model's choice for a real run: a grid maps to (dp, pp), the failed device to its cell;
    with free transfers and a long remaining run re-planning wins, with a short one rerouting."""
    run = new_run()
    costs, hw, rp = _toy_model()
    assert rs.model_layout(run.layout) == pm.Layout(2, 2, 1, (2, 2), "1f1b")
    short, none = rs.choose(run, [FAILED], costs, hw, rp, remaining_steps=1, since_checkpoint_s=0.0)
    assert short.strategy in ("reroute", "redundant") and none is None
    long_, layout = rs.choose(run, [FAILED], costs, hw, rp, remaining_steps=1e7, since_checkpoint_s=0.0)
    assert long_.strategy == "replan" and len(layout.plan.used_devices()) <= 3 == layout.plan.num_devices


def _toy_model():
    costs = pm.Costs(layer_fwd=1e-3, layer_bwd=2e-3, head_fwd=0.0, head_bwd=1e-3, embed_fwd=1e-4, embed_bwd=1e-4,
                     act_bytes=1024, layer_work_bytes=8192, layer_params=9280, edge_params=4128, param_bytes=4,
                     state_bytes_per_param=16)
    hw = pm.Hardware(devices_per_node=8, intra_bw=5e9, inter_bw=5e9, latency=5e-5, memory=2**34)
    rp = pm.RecoveryParams(detect_s=0.0, restart_s=10.0, checkpoint_every_s=60.0, checkpoint_read_bw=1e9,
                           compile_s=5.0, retarget_s=0.0)
    return costs, hw, rp


def test_choice_on_a_degraded_layout_and_without_memory():
    """After a reroute the layout is no grid: a second failure is weighed between the strategies
    that move to a new layout (on the survivors, idle devices allowed). A model whose devices hold
    nothing finds no strategy and says why."""
    costs, hw, rp = _toy_model()
    wide = PipelineLayout.grid(dp=1, pp=2, num_micro=M, num_layers=4, num_devices=3)
    assert rs.grid_shape(wide) == (1, 2) and wide.plan.num_devices == 3
    run = new_run()
    rs.recover_in_memory(run, rs.snapshot(run, 0), [FAILED], "reroute")
    assert rs.grid_shape(run.layout) is None
    best, layout = rs.choose(run, [2], costs, hw, rp, remaining_steps=1e7, since_checkpoint_s=0.0)
    assert best.strategy == "replan" and layout.plan.num_devices == 2
    nothing = pm.Hardware(devices_per_node=8, intra_bw=5e9, inter_bw=5e9, latency=5e-5, memory=1.0)
    with pytest.raises(rs.RecoveryError, match="no layout of 3 devices fits"):
        rs.choose(new_run(), [FAILED], costs, nothing, rp, remaining_steps=10, since_checkpoint_s=0.0)
