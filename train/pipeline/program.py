"""The pipelined step program: `jaxsys train lm` with `pipeline.enabled`.

`PipelineStep` is the step program (`jaxsys.train.program.StepProgram`) that the host loop
(`jaxsys.train.trainer.Trainer`) drives when `pipeline.enabled`: a `PipelineRun` (the flat train
state and the pipelined step of one layout) on `pipeline.pipelines` x `pipeline.stages` devices,
and what happens at each step boundary (`advance`):

1. joins: devices that (re)join before step s get their share of the state; the layout is
   re-planned over the larger set (the configured grid once every device is back);
2. snapshot (`recovery.snapshot`): the pre-step state (the update keeps its input instead of
   donating it) and a replica of shard k on device k+1;
3. the step: unit executables dispatched in schedule order, then the fixed-order reduction and
   AdamW (`jaxsys.train.pipeline.step`); the program waits for its metrics;
4. failures: devices lost during step s -> the step's result is discarded and the program recovers
   with `recovery.strategy` (`auto`: the performance model's choice for this failure, from this
   run's measured unit times) from the snapshot, or from the last checkpoint when no copy of some
   shard survives, and asks for step s again (or for the checkpoint's step). A fixed strategy that
   cannot cover the failure (rerouting when a stage lost every data-parallel copy, redundancy when
   both neighbours are gone) re-plans instead. A failure of a layout that an earlier recovery
   degraded is handled the same way (the model then weighs re-planning against the checkpoint);
5. commit: the step's metrics, the schedule's bubble fraction (`bubble_fraction` in every metrics
   line) and, at the first step and after every change of layout, a `pipeline_layout` event with
   the memory of each stage.

Every layout computes the same M micro-batches with the same unit executables and the same
reduction order, so losses and parameters are bitwise those of the one-stage run whatever the
stages, pipelines, schedule, partition or recoveries (tests/test_train_pipeline.py). They are not
bitwise those of the elastic or GSPMD trainers: those differentiate the whole model in one XLA
program, which fuses, and so rounds, some ops differently from the units
(`jaxsys.train.pipeline.units`); the same test measures that difference against the fp32 model
tolerance.

When no strategy can continue (no layout of the survivors fits in the memory the model assumes,
`recovery.device_memory_gib`), the pre-step state is written as the checkpoint of step s (with
`checkpoint.dir`) and the run stops with a message that says how to resume: never a hang.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, NoReturn, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.models import decoder
from jaxsys.sharding import tree_shardings
from jaxsys.train.config import LMTrainConfig, TrainConfigError
from jaxsys.train.elastic import canonical
from jaxsys.train.elastic.compile import ExecutableCache
from jaxsys.train.elastic.events import EventSchedule, EventSpecError, MembershipEvent
from jaxsys.train.elastic.membership import ScheduledMembership, probe
from jaxsys.train.elastic.planner import UnrecoverableError, check_plan, plan_transfers
from jaxsys.train.elastic.snapshot import Snapshot, per_device
from jaxsys.train.elastic.transfer import execute_plan
from jaxsys.train.pipeline.partition import PartitionError, StageMap, StagePartition
from jaxsys.train.pipeline.runtime import PipelineLayout, PipelineRun, PipelineSetup
from jaxsys.train.program import Advance, CommittedStep, StepEventLog, init_params_f32, select_devices
from jaxsys.train.recovery import strategies as rs

MiB = 2**20


class PipelineStep(StepEventLog):
    """The pipelined step program (see the module docstring).

    cache: where the gather/update programs live (default: one cache per program; the unit
    executables are shared per process anyway). log: where recovery summaries go (default: beside
    the loop's progress bar).
    """

    def __init__(self, cfg: LMTrainConfig, *, devices: Sequence[jax.Device] | None = None,
                 cache: ExecutableCache | None = None, log: Callable[[str], None] | None = None):
        if not cfg.pipeline.enabled:
            cfg = cfg.replace(**{"pipeline.enabled": True, "elastic.enabled": False})
        super().__init__(log)
        self.cfg = cfg
        self.devices = select_devices(cfg, devices)
        n, pc, data = len(self.devices), cfg.pipeline, cfg.data
        pipelines = pc.pipelines if pc.pipelines is not None else n // pc.stages
        if pipelines < 1 or pipelines * pc.stages > n:
            need = max(pipelines, 1) * pc.stages
            msg = (f"pipeline: {max(pipelines, 1)} pipeline(s) x {pc.stages} stages need {need} devices, "
                   f"the run has {n}")
            if devices is None and cfg.devices is None and self.devices[0].platform == "cpu":
                from jaxsys.runtime import cpu_devices_hint

                msg += f"; {cpu_devices_hint(need)}"
            raise TrainConfigError(msg)
        self.num_micro = pc.micro_batches or data.micro_batches
        if self.num_micro < pipelines:
            raise TrainConfigError(f"pipeline: {self.num_micro} micro-batches cannot feed {pipelines} pipelines; "
                                   f"set pipeline.pipelines or more micro-batches")
        try:
            partition = (StagePartition(tuple(pc.partition)) if pc.partition is not None
                         else StagePartition.balanced(cfg.model.num_layers, pc.stages))
            StageMap.make(cfg.model, partition)
        except PartitionError as e:
            raise TrainConfigError(f"pipeline: {e}") from None
        self.setup = PipelineSetup(model=cfg.model, optim=cfg.optim, num_micro=self.num_micro,
                                   micro_size=data.global_batch // self.num_micro, seq_len=data.seq_len,
                                   dropout=cfg.dropout, seed=cfg.seed, chunk=cfg.elastic.chunk_size,
                                   keep_input=cfg.recovery.snapshot)
        self.initial_layout = PipelineLayout.grid(dp=pipelines, pp=pc.stages, num_micro=self.num_micro,
                                                  partition=partition, schedule=pc.schedule, num_devices=n)
        self.schedule = _validated_schedule(cfg, n)
        self.membership = ScheduledMembership(self.schedule)
        self.cache = cache if cache is not None else ExecutableCache()
        self.active: list[int] = list(range(n))
        """Indices (into `devices`) of the devices in service, in the order of `run.devices`."""
        self.recoveries: list[rs.RecoveryReport] = []
        self.run: PipelineRun | None = None
        self._checkpoints = None
        self._asked_fail: set[int] = set()
        self._asked_join: set[int] = set()
        self._layout_changed = True
        self._model_inputs: tuple[Any, Any] | None = None
        self._step_times: list[float] = []
        self._programs_compile_s: float | None = None

    @property
    def count(self) -> int:
        return self.run.count

    # ------------------------------------------------------------------ state (StepProgram)
    def build(self) -> None:
        if self.run is None:
            self.run = PipelineRun(self.setup, self.devices, self.initial_layout, cache=self.cache)

    def init_state(self) -> None:
        self.run.init_state(init_params_f32(self.cfg))

    def abstract_state(self) -> dict[str, Any]:
        mesh = canonical.layout_mesh(self.run.devices)
        shapes = decoder.param_shapes(self.cfg.model)
        sh = tree_shardings(decoder.param_logical_axes(self.cfg.model), shapes, mesh)
        is_shape = lambda s: isinstance(s, tuple) and all(isinstance(i, int) for i in s)  # noqa: E731
        p = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s, jnp.float32, sharding=h), shapes, sh,
                         is_leaf=is_shape)
        rep = canonical.layout_sharding(mesh, canonical.REPLICATED)
        return {"params": p, "mu": p, "nu": p, "count": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}

    def load_state(self, tree: dict[str, Any]) -> None:
        spec = self.run.flat_spec
        host = np.stack([spec.flatten_np(jax.device_get(tree[k])) for k in ("params", "mu", "nu")])
        self.run.load_flat_host(host, count=int(jax.device_get(tree["count"])))

    def state_tree(self) -> dict[str, Any]:
        return rs.state_tree(self.run)

    def params(self) -> Any:
        return self.run.flat_spec.unflatten_np(self.run.flat_host()[0])

    def compile(self) -> Any:
        """Compile the units (once per process, retargeted per device) and the gather and update
        programs of the current layout; returns the update program."""
        self.run.precompile()
        return self.run.programs()[1]

    # ------------------------------------------------------------------ what the CLI prints
    def describe(self) -> list[str]:
        """The layout, its bubble fraction and the memory of each stage, one line each."""
        ev = self.layout_event()
        lines = [f"pipeline: {ev['layout']}; bubble fraction {ev['bubble_fraction']:.3f} "
                 f"({ev['rounds']} rounds of ops)"]
        for st in ev["stages"]:
            lines.append(f"  stage {st['stage']} (layers {st['layers'][0]}-{st['layers'][1]}, devices "
                         f"{','.join(map(str, st['devices']))}): parameters {st['param_bytes'] / MiB:.2f} MiB, "
                         f"kept activations {st['kept_activation_bytes'] / MiB:.2f} MiB "
                         f"({st['micro_batches_in_flight']} micro-batches in flight), gradient slots "
                         f"{st['grad_slot_bytes'] / MiB:.2f} MiB")
        return lines

    def layout_event(self) -> dict[str, Any]:
        """The `pipeline_layout` event: the layout, its bubble fraction (idle device-rounds of the
        schedule) and, per stage, the largest memory of a device that holds it."""
        run = self.run
        rep = run.memory_report()
        part = run.layout.partition
        stages = []
        for s in range(part.num_stages):
            holders = [d for d in rep["per_device"] if s in d["stages"]]
            a, b = part.layer_range(s)
            stages.append({"stage": s, "layers": [a, b - 1], "devices": [d["device"] for d in holders],
                           **{k: max(d[k] for d in holders) for k in (
                               "param_bytes", "kept_activation_bytes", "grad_slot_bytes", "micro_batches_in_flight")}})
        return {"event": "pipeline_layout", "layout": rs.describe(run.layout),
                "devices": [d.id for d in run.devices], "bubble_fraction": rep["bubble_fraction_slots"],
                "rounds": rep["rounds"], "stages": stages}

    # ------------------------------------------------------------------ the step (StepProgram)
    def start(self, step: int, *, log: Callable[[str], None], checkpoints) -> None:
        self._loop_log, self._checkpoints = log, checkpoints
        self._layout_changed = True

    def advance(self, step: int, tokens_BxT1: np.ndarray, lr: np.float32) -> Advance:
        self._apply_joins(step)
        run = self.run
        snap = rs.snapshot(run, step) if self.cfg.recovery.snapshot else None
        started = time.perf_counter()
        metrics = run.step(step, tokens_BxT1, float(lr))
        step_time = time.perf_counter() - started
        if self._programs_compile_s is None:
            self._programs_compile_s = run.compile_s
        fails = self._failures_during(step)
        if fails:
            return Advance(self._recover(step, fails, snap), None)
        self._step_times.append(step_time)
        if self._layout_changed:
            self._record_event(step, self.layout_event())
            self._layout_changed = False
        events, self._step_events = self._step_events, []
        extra = {"bubble_fraction": round(run.tables.bubble_fraction(), 6)}
        return Advance(step + 1, CommittedStep(step, metrics, float(lr), len(run.devices), started, step_time,
                                               events, extra))

    # ------------------------------------------------------------------ membership
    def _failures_during(self, step: int) -> list[MembershipEvent]:
        """The devices that did not survive step `step` (asked once per step)."""
        if step in self._asked_fail:
            return []
        self._asked_fail.add(step)
        return self.membership.failures(step)

    def _apply_joins(self, step: int) -> None:
        """Devices (back) in service from `step` on get their share of the state (asked once per
        step); the layout is re-planned over the larger set."""
        if step in self._asked_join:
            return
        self._asked_join.add(step)
        joins = self.membership.joins(step)
        if not joins:
            return
        t0 = time.perf_counter()
        run = self.run
        new_active = sorted(set(self.active) | {e.device for e in joins})
        new_devs = [self.devices[i] for i in new_active]
        try:
            layout = (self.initial_layout if len(new_active) == len(self.devices)
                      else self._relayout(len(new_active)))
        except rs.RecoveryError as e:
            raise UnrecoverableError(f"step {step}: device(s) joined but {e}") from None
        old = run.flat_layout
        plan = plan_transfers(old, [d.id for d in new_devs], use_replicas=False)
        check_plan(plan)
        by_dev = per_device(run.flat)
        flat = execute_plan(self.cache, plan, {k: by_dev[d] for k, d in enumerate(old.device_ids)}, {}, new_devs,
                            "device")
        flat.block_until_ready()
        count = run.count
        run.set_layout(new_devs, layout)
        run.flat, run.count = flat, count
        run.precompile()
        self.active = new_active
        self._layout_changed = True
        joined = sorted(e.device for e in joins)
        seconds = time.perf_counter() - t0
        self._record_event(step, {"event": "join", "devices": joined, "layout": rs.describe(layout), "seconds": seconds,
                            "elements_moved": plan.network_elements()})
        self._log(f"step {step}: device(s) {joined} joined -> {rs.describe(layout)} ({seconds:.3f} s)")

    # ------------------------------------------------------------------ recovery
    def _recover(self, step: int, fails: list[MembershipEvent], snap: Snapshot | None) -> int:
        """Discard step `step`'s result, continue on the survivors; returns the step to run next."""
        run = self.run
        lost = sorted({e.device for e in fails})
        failed = [self.active.index(d) for d in lost]
        lost_ids = [run.devices[i].id for i in failed]
        run.flat.delete()  # the failed step's result
        self._log(f"step {step}: lost device(s) {lost} during the step")
        t0 = time.perf_counter()
        survivors = [d for i, d in enumerate(run.devices) if i not in failed]
        detect_s = probe(survivors)
        try:
            strategy, layout, how = self._decide(step, failed, snap, detect_s)
            decide_s = time.perf_counter() - t0
            rep = self._execute(step, failed, snap, strategy, layout)
        except rs.RecoveryError as e:  # no layout of the survivors fits
            self._stop(step, snap, lost_ids, str(e))
        rep.plan_s += decide_s
        self.active = [a for i, a in enumerate(self.active) if i not in failed]
        self.recoveries.append(rep)
        self._layout_changed = True
        resume = step - rep.lost_steps
        self._record_event(resume, {"event": "fail", "devices": lost, "strategy": rep.strategy, "chosen_by": how,
                              "recovery": rep.to_json()})
        self._log(rep.summary())
        return resume

    def _decide(self, step: int, failed: list[int], snap: Snapshot | None,
                detect_s: float) -> tuple[str, PipelineLayout | None, str]:
        """(strategy, the layout over the survivors for replan/checkpoint, how it was chosen)."""
        rc, run = self.cfg.recovery, self.run
        survivors = len(run.devices) - len(failed)
        if snap is None:
            return "checkpoint", self._relayout(survivors), "no in-memory snapshot (recovery.snapshot=false)"
        if rc.strategy == "auto":
            costs, hw = self._model()
            best, layout = rs.choose(run, failed, costs, hw, self._recovery_params(detect_s),
                                     remaining_steps=self.cfg.steps - step,
                                     since_checkpoint_s=self._since_checkpoint_s(step))
            return best.strategy, layout, (f"model: expected {best.time_to_finish(self.cfg.steps - step):.4g} s "
                                           f"to finish")
        if rc.strategy in ("reroute", "redundant"):
            make = rs.reroute_plan if rc.strategy == "reroute" else rs.redundant_plan
            try:
                make(run.layout.plan, failed)
            except rs.RecoveryError as e:
                self._log(f"step {step}: {rc.strategy} cannot cover this failure ({e}); re-planning instead")
                return "replan", self._relayout(survivors), f"config ({rc.strategy} impossible: {e})"
            return rc.strategy, None, "config"
        return rc.strategy, self._relayout(survivors), "config"

    def _execute(self, step: int, failed: list[int], snap: Snapshot | None, strategy: str,
                 layout: PipelineLayout | None) -> rs.RecoveryReport:
        why = "recovery.strategy=checkpoint"
        if strategy != "checkpoint":
            try:
                return rs.recover_in_memory(self.run, snap, failed, strategy, layout=layout)
            except (rs.RecoveryError, UnrecoverableError) as e:
                why = str(e)
                self._log(f"step {step}: {strategy} cannot recover in memory ({why}); restoring the last checkpoint")
            if layout is None:
                layout = self._relayout(len(self.run.devices) - len(failed))
        elif snap is None:
            why = "no in-memory snapshot"
        ck = self._checkpoints
        if ck is None:
            raise UnrecoverableError(f"step {step}: cannot recover in memory ({why}) and there is no checkpoint "
                                     f"(set checkpoint.dir)")
        ck.wait()
        if ck.latest_step() is None:
            raise UnrecoverableError(f"step {step}: cannot recover in memory ({why}) and no checkpoint has been "
                                     f"committed yet (checkpoint.every)")
        return rs.recover_from_checkpoint(self.run, failed, ck, layout=layout, step=step)

    def _stop(self, step: int, snap: Snapshot | None, lost_ids: list[int], why: str) -> NoReturn:
        """No strategy can continue: keep the pre-step state as a checkpoint when there is a
        checkpoint directory, then raise UnrecoverableError saying how to resume."""
        msg = f"step {step}: no recovery strategy can continue: {why}"
        ck = self._checkpoints
        if ck is not None and snap is not None:
            spec = self.run.flat_spec
            host = rs.snapshot_host(snap, lost_ids, spec.num_params)
            tree = {"params": spec.unflatten_np(host[0]), "mu": spec.unflatten_np(host[1]),
                    "nu": spec.unflatten_np(host[2]), "count": np.asarray(snap.count, np.int32)}
            ck.wait()
            ck.save(step, tree, {"config": self.cfg.to_dict(), "device_ids": [d.id for d in self.devices]})
            ck.wait()
            msg += (f"; the state at the start of step {step} is saved in {ck.directory}: resume from it on more "
                    f"devices (--resume)")
        elif ck is not None and ck.latest_step() is not None:
            msg += f"; the last checkpoint (step {ck.latest_step()}) is in {ck.directory} (--resume)"
        else:
            msg += "; set checkpoint.dir to keep the state when this happens"
        raise UnrecoverableError(msg)

    # ------------------------------------------------------------------ the performance model's inputs
    def _model(self):
        """(Costs, Hardware) of this run: unit times measured on the first device in service
        (once), link and memory figures from the config."""
        if self._model_inputs is None:
            from jaxsys.train.recovery.calibrate import local_hardware, unit_costs

            rc = self.cfg.recovery
            costs = unit_costs(self.run.units, self.setup, self.run.devices[0], snapshot=rc.snapshot)
            hw = local_hardware(self.devices, link_gbps=rc.link_gbps, memory_gib=rc.device_memory_gib)
            self._model_inputs = (costs, hw)
        return self._model_inputs

    def _recovery_params(self, detect_s: float):
        """Every strategy compiles gather and update programs for the survivors (their shapes change
        with the device count and the plan); the measured compile time of the first layout's
        programs stands for both the model's compile and retarget costs."""
        from jaxsys.train.recovery.model import RecoveryParams

        rc = self.cfg.recovery
        compile_s = self._programs_compile_s or 0.0
        every = self.cfg.checkpoint.every
        return RecoveryParams(detect_s=detect_s, restart_s=0.0,
                              checkpoint_every_s=every * self._typical_step_s() if every else math.inf,
                              checkpoint_read_bw=rc.link_gbps * 1e9, compile_s=compile_s, retarget_s=compile_s)

    def _typical_step_s(self) -> float:
        return statistics.median(self._step_times) if self._step_times else 0.0

    def _since_checkpoint_s(self, step: int) -> float:
        """Work lost by restarting from the last committed checkpoint (inf without one)."""
        ck = self._checkpoints
        latest = ck.latest_step() if ck is not None else None
        if latest is None or latest > step:
            return math.inf
        return (step - latest) * self._typical_step_s()

    def _relayout(self, num_devices: int) -> PipelineLayout:
        """The performance model's fastest layout over `num_devices` (tp 1), as a PipelineLayout."""
        from jaxsys.train.recovery import model as pm

        costs, hw = self._model()
        found = pm.search_layouts(num_devices, costs, hw, self.cfg.model.num_layers, self.num_micro, fixed_tp=1)
        if found is None:
            raise rs.RecoveryError(f"no layout of {num_devices} devices fits in memory "
                                   f"({hw.memory / 2**30:.3g} GiB per device)")
        return rs.pipeline_layout(found[0], num_micro=self.num_micro, num_devices=num_devices)


def _validated_schedule(cfg: LMTrainConfig, num_devices: int) -> EventSchedule:
    """`recovery.fail`/`recovery.join`, replayed against the run before any compute: unknown
    devices, steps outside the run, failing a device that is out, joining one that is in, losing
    every device, and (without a checkpoint) losing two ring neighbours at once are errors."""
    rc = cfg.recovery
    try:
        schedule = EventSchedule.from_specs(rc.fail, rc.join)
        schedule.validate(num_devices=num_devices, steps=cfg.steps, has_checkpoint=cfg.checkpoint.dir is not None)
    except EventSpecError as e:
        raise TrainConfigError(str(e)) from None
    if rc.fail and not rc.snapshot and cfg.checkpoint.dir is None:
        raise TrainConfigError("recovery.snapshot=false: every failure restores the last checkpoint; set "
                               "checkpoint.dir (and checkpoint.every)")
    return schedule
