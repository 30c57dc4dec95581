"""The four recovery strategies, as new work plans and as state transformations of a running
`jaxsys.train.pipeline.PipelineRun`.

A failure of devices F during step s leaves the pre-step snapshot (`jaxsys.train.elastic.snapshot`:
every shard of the flat state on its device, a replica of shard k on device k+1) on the
survivors. Every strategy continues with the same M micro-batches of the same examples, the same
reduction order and the same per-example dropout keys, so step s and every later step are bitwise
those of the run without the failure (tests/test_recovery.py):

* `reroute`   (ReCycle-like): the failed device's (micro-batch, stage) work goes to that stage's
              data-parallel peers (balanced by load); the other stages of those micro-batches stay
              on their pipeline, and activations cross between pipelines at the rerouted stage.
* `redundant` (Bamboo-like): a neighbouring stage of the same pipeline (the previous one, or the
              next for the first stage) also runs the failed stage's layers for that pipeline.
* `replan`    (Oobleck-like): a new dp x pp layout and layer partition over the survivors.
* `checkpoint`: restore the last Orbax checkpoint onto a layout over the survivors and re-run the
              steps since it (the baseline: steps are lost, nothing is kept in memory).

The in-memory strategies move the state with the elastic transfer planner (`planner.plan_transfers`:
the survivors' shards plus the lost shards' replicas, re-cut for the survivors) and run the new
plan's programs; `RecoveryReport` says where the time went.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.train.elastic.compile import ExecutableCache
from jaxsys.train.elastic.planner import UnrecoverableError, check_plan, plan_transfers
from jaxsys.train.elastic.snapshot import Snapshot, take_snapshot
from jaxsys.train.elastic.transfer import execute_plan
from jaxsys.train.pipeline.runtime import PipelineLayout, PipelineRun
from jaxsys.train.pipeline.schedule import ScheduleError, WorkPlan

if TYPE_CHECKING:
    from jaxsys.train.checkpoint import CheckpointManager

STRATEGIES: tuple[str, ...] = ("reroute", "redundant", "replan", "checkpoint")


class RecoveryError(RuntimeError):
    """A strategy that cannot cover this failure (e.g. rerouting when a stage lost every replica)."""


# ----------------------------------------------------------------------------- plans
def reroute_plan(plan: WorkPlan, failed: Sequence[int]) -> WorkPlan:
    """`plan` with every (micro-batch, stage) of a failed device given to a live device that already
    computes that stage (the least loaded first, then the lowest index)."""
    dead = set(failed)
    load = {}
    for row in plan.device_of:
        for d in row:
            load[d] = load.get(d, 0) + 1
    peers = {s: sorted({row[s] for row in plan.device_of} - dead) for s in range(plan.num_stages)}
    rows = [list(r) for r in plan.device_of]
    for m, row in enumerate(rows):
        for s, d in enumerate(row):
            if d in dead:
                if not peers[s]:
                    raise RecoveryError(f"stage {s} lost every data-parallel replica: nothing to reroute to")
                best = min(peers[s], key=lambda p: (load[p], p))
                row[s] = best
                load[best] += 1
    return WorkPlan(plan.num_devices, tuple(tuple(r) for r in rows))


def redundant_plan(plan: WorkPlan, failed: Sequence[int]) -> WorkPlan:
    """`plan` with each failed device's work taken by the device of the previous stage of the same
    micro-batch (the next stage for the first stage)."""
    dead = set(failed)
    if plan.num_stages == 1:
        raise RecoveryError("a one-stage pipeline has no neighbouring stage to compute redundantly")
    rows = [list(r) for r in plan.device_of]
    for m, row in enumerate(rows):
        orig = plan.device_of[m]
        for s, d in enumerate(orig):
            if d in dead:
                nb = orig[s - 1] if s > 0 else orig[s + 1]
                if nb in dead:
                    raise RecoveryError(f"stage {s} and its neighbouring stage of micro-batch {m} both failed")
                row[s] = nb
    return WorkPlan(plan.num_devices, tuple(tuple(r) for r in rows))


def survivors_of(num_devices: int, failed: Sequence[int]) -> list[int]:
    return [i for i in range(num_devices) if i not in set(failed)]


# ----------------------------------------------------------------------------- execution
@dataclasses.dataclass
class RecoveryReport:
    strategy: str
    step: int
    failed: list[int]
    devices_after: int
    layout: str
    plan_s: float = 0.0
    transfer_s: float = 0.0
    compile_s: float = 0.0
    restore_s: float = 0.0
    elements_moved: int = 0
    lost_steps: int = 0

    @property
    def total_s(self) -> float:
        return self.plan_s + self.transfer_s + self.compile_s + self.restore_s

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_s": self.total_s}

    def summary(self) -> str:
        lost = f"; lost steps {self.lost_steps}" if self.strategy == "checkpoint" else ""
        return (f"step {self.step}: lost device{'s' if len(self.failed) != 1 else ''} "
                f"{','.join(map(str, self.failed))} -> {self.strategy}: {self.layout}; recovered in "
                f"{self.total_s:.3f} s (plan {self.plan_s:.4f}, transfer {self.transfer_s:.3f}, compile "
                f"{self.compile_s:.3f}, restore {self.restore_s:.3f}){lost}")


def snapshot(run: PipelineRun, step: int, cache: ExecutableCache | None = None) -> Snapshot:
    """The state at the start of `step` plus a replica of every shard on the next device."""
    cache = run.cache if cache is None else cache
    return take_snapshot(cache, step, run.count, run.flat_layout, run.devices, run.flat, "device")


def _move_state(run: PipelineRun, snap: Snapshot, failed: Sequence[int], new_devices: list[jax.Device]) -> int:
    lost_ids = [run.devices[i].id for i in failed]
    plan = plan_transfers(snap.layout, [d.id for d in new_devices], lost_ids, use_replicas=True)
    check_plan(plan)
    primary, replica = snap.shard_buffers(lost_ids)
    run.flat = execute_plan(run.cache, plan, primary, replica, new_devices, "device")
    run.count = snap.count
    return plan.network_elements()


def recover_in_memory(run: PipelineRun, snap: Snapshot, failed: Sequence[int], strategy: str, *,
                      layout: PipelineLayout | None = None) -> RecoveryReport:
    """Continue `run` after losing `failed` (indices into run.devices) with `strategy` (reroute,
    redundant or replan; replan needs the new `layout` over the survivors, e.g. from the model's
    search). The run then re-executes step `snap.step`."""
    if strategy not in ("reroute", "redundant", "replan"):
        raise ValueError(f"not an in-memory strategy: {strategy!r}")
    bad = sorted(set(failed) - set(range(len(run.devices))))
    if bad:
        raise RecoveryError(f"failed devices {bad} are not in this run (0..{len(run.devices) - 1})")
    t0 = time.perf_counter()
    keep = survivors_of(len(run.devices), failed)
    new_devices = [run.devices[i] for i in keep]
    old = run.layout
    if strategy == "replan":
        if layout is None:
            raise ValueError("replan needs the new layout")
        new_layout = layout
    else:
        try:
            plan = reroute_plan(old.plan, failed) if strategy == "reroute" else redundant_plan(old.plan, failed)
            plan = plan.renumbered(keep)
        except ScheduleError as e:
            raise RecoveryError(str(e)) from None
        new_layout = PipelineLayout(old.partition, plan, old.schedule)
    plan_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    moved = _move_state(run, snap, failed, new_devices)
    jax.block_until_ready(run.flat)
    transfer_s = time.perf_counter() - t1
    flat, count = run.flat, run.count
    t2 = time.perf_counter()
    run.set_layout(new_devices, new_layout)
    run.flat, run.count = flat, count
    run.precompile()
    compile_s = time.perf_counter() - t2
    return RecoveryReport(strategy, snap.step, list(failed), len(new_devices), describe(new_layout), plan_s,
                          transfer_s, compile_s, 0.0, moved)


def describe(layout: PipelineLayout) -> str:
    """One line: the grid (or that a recovery moved work off it), devices, layers per stage, schedule."""
    plan = layout.plan
    used = len(plan.used_devices())
    shape = grid_shape(layout)
    what = (f"{shape[0]} pipeline{'s' if shape[0] != 1 else ''} x {shape[1]} stages" if shape
            else f"{plan.num_stages} stages, work moved off the failed devices")
    idle = plan.num_devices - used
    return (f"{what} on {used} devices{f' (+{idle} idle)' if idle else ''}, layers per stage "
            f"{layout.partition}, {layout.schedule}")


# ----------------------------------------------------------------------------- checkpoints
def state_tree(run: PipelineRun) -> dict[str, Any]:
    """{"params", "mu", "nu", "count"}: the checkpoint form of the flat state (host arrays)."""
    host = run.flat_host()
    spec = run.flat_spec
    return {"params": spec.unflatten_np(host[0]), "mu": spec.unflatten_np(host[1]),
            "nu": spec.unflatten_np(host[2]), "count": np.asarray(run.count, np.int32)}


def save_checkpoint(run: PipelineRun, directory: str | Path, step: int) -> None:
    """Write the state at the start of `step` with Orbax (synchronously)."""
    from jaxsys.train.checkpoint import CheckpointManager

    with CheckpointManager(directory, async_save=False) as mgr:
        mgr.save(step, state_tree(run), {"device_ids": [d.id for d in run.devices]})


def snapshot_host(snap: Snapshot, lost_ids: Sequence[int], num_params: int) -> np.ndarray:
    """[3, P] host copy of a snapshot's state without the devices `lost_ids` (each shard from its
    primary, else from its replica); UnrecoverableError when both copies of a shard are lost."""
    primary, replica = snap.shard_buffers(lost_ids)
    parts = []
    for k in range(snap.n):
        buf = primary.get(k, replica.get(k))
        if buf is None:
            raise UnrecoverableError(f"both copies of shard {k} were on lost devices")
        parts.append(np.asarray(jax.device_get(buf)))
    return np.concatenate(parts, axis=1)[:, :num_params]


def recover_from_checkpoint(run: PipelineRun, failed: Sequence[int], source: "str | Path | CheckpointManager", *,
                            layout: PipelineLayout, step: int) -> RecoveryReport:
    """Restore the latest checkpoint of `source` (a directory, or the run's open
    `CheckpointManager`) onto `layout` over the survivors. Returns the report;
    `report.lost_steps` steps (from the checkpoint's step to `step`) must be re-run."""
    from jaxsys.train.checkpoint import CheckpointManager

    t0 = time.perf_counter()
    keep = survivors_of(len(run.devices), failed)
    new_devices = [run.devices[i] for i in keep]
    host_dev = jax.sharding.SingleDeviceSharding(new_devices[0])
    spec = run.flat_spec
    tree_of = lambda: jax.tree.unflatten(spec.treedef, [  # noqa: E731
        jax.ShapeDtypeStruct(s, jnp.float32, sharding=host_dev) for s in spec.shapes])
    abstract = {"params": tree_of(), "mu": tree_of(), "nu": tree_of(),
                "count": jax.ShapeDtypeStruct((), jnp.int32, sharding=host_dev)}
    if isinstance(source, CheckpointManager):
        source.wait()
        tree, meta = source.restore(abstract)
    else:
        with CheckpointManager(source, read_only=True) as mgr:
            tree, meta = mgr.restore(abstract)
    host = np.stack([spec.flatten_np(jax.device_get(tree[k])) for k in ("params", "mu", "nu")])
    restore_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    run.set_layout(new_devices, layout)
    run.load_flat_host(host, count=int(jax.device_get(tree["count"])))
    run.precompile()
    compile_s = time.perf_counter() - t1
    ck_step = int(meta["step"])
    return RecoveryReport("checkpoint", step, list(failed), len(new_devices), describe(layout), 0.0, 0.0,
                          compile_s, restore_s, 0, lost_steps=step - ck_step)


# ----------------------------------------------------------------------------- the choice
def grid_shape(layout: PipelineLayout) -> tuple[int, int] | None:
    """(dp, pp) when the layout's work is a failure-free grid on its first dp*pp devices (any
    further devices idle), else None (a layout that a recovery degraded)."""
    plan, pp = layout.plan, layout.partition.num_stages
    used = len(plan.used_devices())
    if used % pp or plan.num_micro < used // pp:
        return None
    dp = used // pp
    return (dp, pp) if WorkPlan.grid(dp, pp, plan.num_micro).device_of == plan.device_of else None


def model_layout(layout: PipelineLayout):
    """The performance model's view of a failure-free grid layout (tp = 1)."""
    from jaxsys.train.recovery.model import Layout

    shape = grid_shape(layout)
    if shape is None:
        raise RecoveryError("the model's choice needs a failure-free dp x pp grid layout (after a first "
                            "recovery the layout is degraded; re-plan to a grid first)")
    return Layout(shape[0], shape[1], 1, layout.partition.layers, layout.schedule)


def choose(run: PipelineRun, failed: Sequence[int], costs, hw, rp, *, remaining_steps: float,
           since_checkpoint_s: float):
    """The strategy with the least expected time to finish for losing `failed` (indices into
    run.devices), with the layout that re-planning and checkpoint restart would move to.

    On a grid every strategy is a candidate. On a layout that an earlier recovery degraded
    (rerouted or redundant work, which the model does not describe) only the strategies that move
    to a new layout are. Returns (`model.Option`, `PipelineLayout` over the survivors for
    replan/checkpoint, else None); raises RecoveryError, with every strategy's reason, when no
    strategy can finish (e.g. no layout of the survivors fits in memory)."""
    from jaxsys.train.recovery import model as pm

    survivors = len(run.devices) - len(set(failed))
    num_layers, num_micro = run.setup.model.num_layers, run.setup.num_micro
    if grid_shape(run.layout) is not None:
        lay = model_layout(run.layout)
        cells = [(i // lay.pp, i % lay.pp) for i in failed if i < lay.dp * lay.pp]
        opts = pm.options(lay, cells, survivors, costs, hw, rp, num_layers=num_layers, num_micro=num_micro,
                          since_checkpoint_s=since_checkpoint_s)
    else:
        part = run.layout.partition
        lay = pm.Layout(1, part.num_stages, 1, part.layers, run.layout.schedule)
        opts = pm.relayout_options(lay, survivors, costs, hw, rp, num_layers=num_layers, num_micro=num_micro,
                                   since_checkpoint_s=since_checkpoint_s)
    best = pm.choose(opts, remaining_steps)
    if math.isinf(best.time_to_finish(remaining_steps)):
        reasons = "; ".join(f"{o.strategy}: {o.why or _unbounded(o)}" for o in opts)
        raise RecoveryError(f"no strategy can continue on {survivors} devices: {reasons}")
    new = None
    if best.strategy in ("replan", "checkpoint"):
        new = pipeline_layout(best.layout, num_micro=num_micro, num_devices=survivors)
    return best, new


def _unbounded(opt) -> str:
    return "no checkpoint to restart from" if opt.strategy == "checkpoint" else "unbounded expected time"


def pipeline_layout(layout, *, num_micro: int, num_devices: int) -> PipelineLayout:
    """The model's `Layout` (tp 1) as a `PipelineLayout` on `num_devices` devices (the first dp*pp
    compute, the others hold only their shard of the state)."""
    from jaxsys.train.pipeline.partition import StagePartition

    return PipelineLayout.grid(dp=layout.dp, pp=layout.pp, num_micro=num_micro,
                               partition=StagePartition(layout.partition), schedule=layout.schedule,
                               num_devices=num_devices)
