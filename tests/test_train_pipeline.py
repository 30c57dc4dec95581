"""The pipelined trainer (`jaxsys train lm` with `pipeline.enabled`) on 8 virtual CPU devices.

The model is configs/train/tiny_pipeline.yaml (4 layers) on 8 micro-batches of one sequence.
Claims tested here:

* every layout (2 pipelines x 4 stages 1F1B; 2 x 3 GPipe with an uneven partition and two idle
  devices) gives, bit for bit, the losses, parameter checksums and parameters of the one-stage run
  (8 data-parallel copies of the whole model);
* against the elastic trainer (the canonical step, which differentiates the whole model in one
  program) the losses and parameters agree within the fp32 model tolerance, not bitwise (see
  `test_pipelined_trainer_against_the_elastic_trainer`);
* layout, bubble fraction and per-stage memory are printed and recorded; checkpoints resume onto
  another layout bitwise;
* a device lost mid-run, with every recovery strategy (and the model's choice), a second failure
  on the recovered layout, and two ring neighbours at once (checkpoint fallback) continue bitwise
  as the failure-free run; bad schedules and layouts are rejected before training; when no layout
  of the survivors fits in memory the state is saved and the run stops with a clear message.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from jaxsys.train.checkpoint import CheckpointManager
from jaxsys.train.cli import main
from jaxsys.train.config import load_config
from jaxsys.train.elastic.compile import ExecutableCache
from jaxsys.train.elastic.planner import UnrecoverableError
from jaxsys.train.pipeline.program import PipelineStep
from jaxsys.train.pipeline.schedule import WorkPlan, compile_schedule
from jaxsys.train.recovery import calibrate
from jaxsys.train.recovery import model as pm
from jaxsys.train.trainer import Trainer

BASE = ["steps=4", "data.seq_len=16", "data.global_batch=8", "data.micro_batches=8", "progress=false"]
_CACHE = ExecutableCache()


def trainer(*overrides: str) -> Trainer:
    cfg = load_config("tiny_pipeline", BASE + list(overrides))
    return Trainer(cfg, program=PipelineStep(cfg, cache=_CACHE))


def train(*overrides: str):
    tr = trainer(*overrides)
    try:
        res = tr.run()
    finally:
        tr.close()
    return tr, res


def committed(res) -> dict[int, tuple[float, str]]:
    """step -> (loss, parameter checksum) of each step's last commit (a checkpoint restart runs
    some steps twice)."""
    return {r.step: (r.loss, r.param_checksum) for r in res.records}


def bits(tree) -> list[np.ndarray]:
    return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


def assert_same_params(a, b) -> None:
    for x, y in zip(bits(a), bits(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def one_stage():
    """The same program without pipelining: one stage, 8 data-parallel copies of the model."""
    tr, res = train("pipeline.stages=1", "pipeline.pipelines=8")
    return res, tr.params()


@pytest.fixture(scope="module")
def grid():
    """The config's layout, 2 pipelines x 4 stages (1F1B), without failures."""
    tr, res = train()
    return res, tr.params()


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("layout", [(), ("pipeline.stages=3", "pipeline.partition=[2,1,1]",
                                         "pipeline.schedule=gpipe")], ids=["2x4_1f1b", "2x3_gpipe_uneven"])
def test_pipelined_trainer_is_bitwise_the_one_stage_run(one_stage, grid, layout):
    if layout:
        tr, res = train(*layout)
        params = tr.params()
    else:
        res, params = grid
    assert committed(res) == committed(one_stage[0])
    assert_same_params(params, one_stage[1])
    assert res.losses[-1] < res.losses[0]


def test_pipelined_trainer_against_the_elastic_trainer(grid):
    """Not bitwise, by construction: the elastic step computes each micro-batch's gradient with
    `jax.value_and_grad` of the whole model in one XLA program; the pipeline runs every layer as
    its own unit executable (so that the bits cannot depend on the partition), and XLA fuses, and
    so rounds, the same math differently in the two programs (jaxsys.train.pipeline.units). The
    reduction over micro-batches, the gradient norm and AdamW are the same fixed-order code. The
    difference stays within the fp32 model tolerance."""
    cfg = load_config("tiny_pipeline", BASE + ["pipeline.enabled=false", "elastic.enabled=true",
                                               "elastic.precompile=none"])
    el = Trainer(cfg)
    res = el.run()
    el.close()
    np.testing.assert_allclose(res.losses, grid[0].losses, rtol=0, atol=1e-4)
    for a, b in zip(jax.tree.leaves(el.params()), jax.tree.leaves(grid[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- what is reported
def test_cli_trains_reports_the_layout_and_recovers(grid, tmp_path, capsys):
    """`jaxsys train lm` end to end: the layout, bubble fraction and stage memory printed and in
    the metrics, device 1 lost during step 1, the run bitwise the failure-free one."""
    m = tmp_path / "m.jsonl"
    assert main(["--config", "tiny_pipeline", *BASE, "--fail", "1@1", "--metrics-out", str(m)]) == 0
    err = capsys.readouterr().err
    assert "pipelined trainer" in err and "bubble fraction" in err
    assert "stage 3 (layers 3-3, devices 3,7)" in err and "lost device 1" in err
    lines = [json.loads(x) for x in m.read_text().splitlines()]
    assert {x["step"]: (x["loss"], x["param_checksum"]) for x in lines} == committed(grid[0])
    expect = compile_schedule(WorkPlan.grid(2, 4, 8), "1f1b").bubble_fraction()
    assert lines[0]["bubble_fraction"] == round(expect, 6) and 0 < expect < 1
    layout = lines[0]["events"][0]
    assert layout["event"] == "pipeline_layout" and [s["devices"] for s in layout["stages"]] == [[0, 4], [1, 5],
                                                                                                  [2, 6], [3, 7]]
    assert all(s["param_bytes"] > 0 and s["kept_activation_bytes"] > 0 for s in layout["stages"])
    assert [x["devices"] for x in lines] == [8, 7, 7, 7]
    fail = [e for x in lines for e in x.get("events", []) if e["event"] == "fail"]
    assert len(fail) == 1 and fail[0]["step"] == 1 and fail[0]["chosen_by"].startswith("model")


def test_checkpoint_resumes_onto_another_layout(grid, tmp_path):
    d = tmp_path / "ck"
    train("steps=2", f"checkpoint.dir={d}")
    tr, res = train(f"checkpoint.dir={d}", "checkpoint.resume=true", "pipeline.stages=2", "pipeline.pipelines=4")
    assert res.start_step == 2
    assert committed(res) == {s: v for s, v in committed(grid[0]).items() if s >= 2}
    assert_same_params(tr.params(), grid[1])


# ----------------------------------------------------------------------------- recovery
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["auto", "reroute", "redundant", "replan", "checkpoint"])
def test_recovery_in_the_trainer_is_bitwise_the_failure_free_run(grid, strategy, tmp_path):
    """Device 1 (stage 1 of pipeline 0) lost during step 3; the checkpoint restart goes back to
    the checkpoint of step 2 and runs step 2 again."""
    tr, res = train("recovery.fail=1@3", f"recovery.strategy={strategy}", f"checkpoint.dir={tmp_path}",
                    "checkpoint.every=2")
    assert committed(res) == committed(grid[0])
    assert_same_params(tr.params(), grid[1])
    (rep,) = tr.program.recoveries
    assert rep.strategy == strategy or strategy == "auto"
    assert rep.lost_steps == (1 if rep.strategy == "checkpoint" else 0)
    assert res.records[-1].num_devices == 7


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["reroute", "auto"])
def test_second_failure_on_the_recovered_layout(grid, strategy):
    """Device 1 lost at step 1; then, on the recovered layout, device 5 (the other copy of stage 1,
    which a reroute gave all of stage 1's work) at step 2. Rerouting cannot cover the second loss
    (no copy of stage 1 is left): a fixed reroute re-plans instead, the model weighs the strategies that
    move to a new layout; either way the run stays bitwise."""
    tr, res = train("recovery.fail=1@1,5@2", f"recovery.strategy={strategy}")
    assert committed(res) == committed(grid[0])
    assert_same_params(tr.params(), grid[1])
    first, second = tr.program.recoveries
    assert second.devices_after == 6 and res.records[-1].num_devices == 6
    if strategy == "reroute":
        fail = [e for e in res.events if e["event"] == "fail"]
        assert first.strategy == "reroute" and second.strategy == "replan"
        assert "reroute impossible" in fail[1]["chosen_by"]


@pytest.mark.slow
def test_rejoin_restores_the_grid(grid):
    """Device 1 lost during step 1 (re-planned over 7), back from step 3: the configured grid again."""
    tr, res = train("recovery.fail=1@1", "recovery.join=1@3", "recovery.strategy=replan")
    assert committed(res) == committed(grid[0])
    assert [r.num_devices for r in res.records] == [8, 7, 7, 8]
    assert tr.program.run.layout == tr.program.initial_layout
    assert [e["event"] for e in res.events if e["event"] in ("fail", "join")] == ["fail", "join"]


def test_ring_neighbours_lost_together_fall_back_to_the_checkpoint(grid, tmp_path):
    """Devices 2 and 3 at once: device 3 held the only replica of device 2's shard, so no in-memory
    strategy can rebuild the state; the last checkpoint is restored instead."""
    tr, res = train("recovery.fail=2@3,3@3", f"checkpoint.dir={tmp_path}", "checkpoint.every=2")
    assert committed(res) == committed(grid[0])
    (rep,) = tr.program.recoveries
    assert rep.strategy == "checkpoint" and rep.lost_steps == 1 and rep.devices_after == 6


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,match", [
    (["--fail", "9@1"], "device 9 does not exist"),
    (["--join", "3@1"], "already in service"),
    (["--fail", "1@7"], "outside the run"),
    (["--fail", "2@1,3@1"], "set checkpoint.dir"),
    (["pipeline.stages=5"], "the model has 4 layers"),
    (["pipeline.stages=3", "pipeline.pipelines=3"], "need 9 devices"),
    (["pipeline.partition=[2,2]"], "pipeline.stages is 4"),
    (["elastic.enabled=true"], "set elastic.enabled=false"),
    (["pipeline.enabled=false", "recovery.fail=1@1"], "belong to the pipelined trainer"),
    (["model.tie_word_embeddings=true"], "tied embeddings"),
])
def test_bad_input_is_rejected_before_training(args, match, capsys):
    assert main(["--config", "tiny_pipeline", "--steps", "4", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert match in err and "compiled" not in err


@pytest.mark.slow
def test_no_feasible_layout_saves_the_state_and_stops(grid, tmp_path):
    """A memory limit that the 8-device grid meets and no option over 7 survivors does: the
    failure stops the run with a message (no hang), the pre-step state is saved as a checkpoint,
    and resuming from it on 8 devices continues the failure-free run bitwise."""
    probe = trainer()
    probe.setup()
    prog = probe.program
    costs = calibrate.unit_costs(prog.run.units, prog.setup, prog.devices[0], repeats=1)
    free = pm.Hardware(8, 1e9, 1e9, 0.0, memory=math.inf)
    lay = pm.Layout(2, 4, 1, (1, 1, 1, 1), "1f1b")
    fits = pm.estimate(lay, costs, free, 8).memory_bytes
    others = [pm.estimate(x, costs, free, 8).memory_bytes for x in pm.candidate_layouts(7, 4, costs, free, fixed_tp=1)
              if x.dp <= 8]
    others += [pm.estimate(lay, costs, free, 8, pm.Degraded(s, ((0, 1),))).memory_bytes
               for s in ("reroute", "redundant")]
    assert fits < min(others)
    limit_gib = (fits + min(others)) / 2 / 2**30
    d = tmp_path / "ck"
    tr = trainer("recovery.fail=1@2", f"recovery.device_memory_gib={limit_gib:.12f}", f"checkpoint.dir={d}")
    with pytest.raises(UnrecoverableError, match="no layout of 7 devices fits"):
        tr.run()
    tr.close()
    with CheckpointManager(d, read_only=True) as mgr:
        assert mgr.latest_step() == 2
    tr2, res = train(f"checkpoint.dir={d}", "checkpoint.resume=true")
    assert committed(res) == {s: v for s, v in committed(grid[0]).items() if s >= 2}
    assert_same_params(tr2.params(), grid[1])
