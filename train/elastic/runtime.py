"""The elastic step program: lose or gain devices mid-run without changing the math.

`ElasticStep` is the step program (`jaxsys.train.program.StepProgram`) that the host loop
(`jaxsys.train.trainer.Trainer`) drives when `elastic.enabled`. It runs the layout-invariant step
(`jaxsys.train.elastic.canonical`) and, at every step boundary, goes through these phases
(`advance`):

1. joins: a device that (re)joins before step s gets its share of the state (planned transfers
   from the current shards) and step s runs on the larger set;
2. snapshot: the pre-step state itself, a replica of shard k on device k+1, reference checksums.
   The previous step emitted it (in the same program); `take_snapshot` makes one only after a
   change;
3. dispatch: the step (not donating its input: the input *is* the snapshot's primary copy; the
   step checks it against the reference checksums);
4. failures: a device lost during step s -> the step's result is discarded, the lost device is
   fenced (its buffers deleted), the survivors' copies are verified, the transfer planner builds
   the new layout from surviving primaries and replicas, the executable for the survivors comes
   from the ahead-of-time cache, and step s runs again on the survivors: no completed step is
   lost and no disk is read. Two ring neighbours lost at once fall back to the last Orbax
   checkpoint (steps since then are lost and re-run);
5. integrity: every step checks its primary input; every `verify_every` steps all held copies
   (replicas in host memory included) are checksummed. A bad primary (the input step s consumed)
   is repaired from its replica and step s is re-run; a bad replica is re-copied from its primary;
6. commit: the step's output becomes the state and the next snapshot.

Global batch, micro-batches, reduction order and per-example RNG never depend on the device set,
so a run that loses device 3 at step 20 and regains it at step 40 produces the same losses and
parameters, bit for bit, as the run without failures (tests/test_elastic.py).

`elastic.policy: torchft` is the negative control: after a loss the survivors keep only their
own micro-batches and average over the participants (the global batch shrinks), as TorchFT-style
fault tolerance does; its trajectory departs from the failure-free run.

Unlike the GSPMD step, this program waits for each step to finish before committing it (a step
that a device did not survive must not be committed, and its snapshot is released only then); the
host still prepares the next batch while the step runs, so the wait costs one dispatch latency.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.models import decoder
from jaxsys.sharding import tree_shardings
from jaxsys.train.config import LMTrainConfig, TrainConfigError
from jaxsys.train.elastic import canonical
from jaxsys.train.elastic.compile import ExecutableCache, global_cache
from jaxsys.train.elastic.events import EventSchedule, EventSpecError, MembershipEvent
from jaxsys.train.elastic.layout import FlatLayout, FlatSpec, MicroBatchPlan
from jaxsys.train.elastic.membership import DistributedMembership, ScheduledMembership, probe
from jaxsys.train.elastic.planner import UnrecoverableError, check_plan, plan_transfers
from jaxsys.train.elastic.snapshot import (Snapshot, VerifyResult, build_snapshot_program,
                                           build_verify_program, inject_bit_flip, per_device, repair,
                                           resolve_replica_memory, take_snapshot, verify)
from jaxsys.train.elastic.transfer import execute_plan, precompile_plan
from jaxsys.train.memory.training import ElasticMemory
from jaxsys.train.optim import compiled_optim
from jaxsys.train.program import (Advance, CommittedStep, StepEventLog, example_ids, init_params_f32,
                                  select_devices, target_count)


@dataclasses.dataclass(frozen=True)
class BitFlip:
    """Fault injection: flip `bit` of element `index` of row `row` (0 params, 1 mu, 2 nu) of the
    `copy` of shard `shard` in the snapshot taken at the start of `step`."""

    step: int
    copy: Literal["primary", "replica"] = "primary"
    shard: int = 0
    row: int = 0
    index: int = 0
    bit: int = 22


@dataclasses.dataclass
class Recovery:
    """One membership change (or repair) and where its time went."""

    kind: str  # "fail" | "join" | "checkpoint" | "repair"
    step: int
    devices_before: list[int]
    devices_after: list[int]
    detection_s: float = 0.0
    replanning_s: float = 0.0
    transfer_s: float = 0.0
    verify_s: float = 0.0
    compile_s: float = 0.0
    compile_how: str = ""
    first_step_s: float = 0.0
    lost_steps: int = 0
    elements_moved: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def recovery_s(self) -> float:
        return self.detection_s + self.replanning_s + self.transfer_s + self.compile_s + self.first_step_s

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["recovery_s"] = self.recovery_s
        return d

    def summary(self) -> str:
        what = {"fail": "lost", "join": "joined", "checkpoint": "lost", "repair": "repaired"}[self.kind]
        changed = sorted(set(self.devices_before) ^ set(self.devices_after))
        head = (f"step {self.step}: {what} device{'s' if len(changed) != 1 else ''} "
                f"{','.join(map(str, changed))} -> {len(self.devices_after)} devices")
        return (f"{head}; recovered in {self.recovery_s:.3f} s (detect {self.detection_s:.3f}, "
                f"re-plan {self.replanning_s:.4f}, transfer {self.transfer_s:.3f}, compile "
                f"{self.compile_s:.3f} [{self.compile_how}], first step {self.first_step_s:.3f}); "
                f"lost steps {self.lost_steps}")


class ElasticStep(StepEventLog):
    """The elastic step program (see the module docstring).

    cache: where executables live (default: the process-wide cache, so runs in one process
    share them). membership: where fail/join events come from (default: the config's schedule,
    or `DistributedMembership` with `elastic.membership=distributed`). faults: bit flips to
    inject into snapshots (tests and demos). log: where recovery summaries go (default: beside
    the loop's progress bar).
    """

    def __init__(self, cfg: LMTrainConfig, *, devices: Sequence[jax.Device] | None = None,
                 cache: ExecutableCache | None = None, membership: Any = None,
                 faults: Sequence[BitFlip] = (), log: Callable[[str], None] | None = None):
        if not cfg.elastic.enabled:
            cfg = cfg.replace(**{"elastic.enabled": True})
        super().__init__(log)
        self.cfg = cfg
        self.devices = select_devices(cfg, devices)
        remote = [d for d in self.devices if d.process_index != jax.process_index()]
        if remote:
            raise TrainConfigError(
                "ElasticStep is single-controller: it drives only this process's devices "
                f"(devices {[d.id for d in remote]} belong to other processes); a multi-process job runs "
                "jaxsys.train.elastic.DistributedElasticStep (started by python -m jaxsys.train.elastic.launch)")
        self.cache = cache if cache is not None else global_cache()
        self.flat_spec = FlatSpec.from_shapes(decoder.param_shapes(cfg.model))
        self.schedule = _validated_schedule(cfg, self.devices, explicit=devices is not None)
        self.membership = membership if membership is not None else self._default_membership()
        self.faults = sorted(faults, key=lambda f: f.step)
        self.memory = resolve_replica_memory(cfg.elastic.replica_memory, self.devices)
        self.activation_memory = ElasticMemory(cfg.memory, device=self.devices[0])
        """The memory plan of the step per device count (`memory:` in the config)."""
        self.recoveries: list[Recovery] = []
        self.active: list[int] = list(range(len(self.devices)))
        self._checkpoints = None
        self._base_plan = MicroBatchPlan.balanced(cfg.data.micro_batches, len(self.devices))
        self._flat: jax.Array | None = None
        self._snap: Snapshot | None = None
        self._count = 0
        self._pending_recovery: Recovery | None = None
        self._done_fail_checks: set[int] = set()
        self._done_joins: set[int] = set()
        self._done_faults: set[BitFlip] = set()
        self._next_step = 0

    def _default_membership(self):
        if self.cfg.elastic.membership == "distributed":
            try:
                return DistributedMembership(self.devices)
            except RuntimeError as e:
                raise TrainConfigError(f"elastic.membership=distributed: {e}") from None
        return ScheduledMembership(self.schedule)

    @property
    def count(self) -> int:
        return self._count

    @property
    def active_devices(self) -> list[jax.Device]:
        return [self.devices[i] for i in self.active]

    # ------------------------------------------------------------------ layouts and programs
    def layout(self, active: Sequence[int] | None = None) -> FlatLayout:
        """The flat layout over `active` (default: the current device set)."""
        active = self.active if active is None else active
        return FlatLayout(self.flat_spec.num_params, tuple(self.devices[i].id for i in active))

    def _plan(self, active: Sequence[int]) -> MicroBatchPlan:
        M = self.cfg.data.micro_batches
        if self.cfg.elastic.policy == "torchft":
            return MicroBatchPlan(M, tuple(self._base_plan.assignment[i] for i in active))
        return MicroBatchPlan.balanced(M, len(active))

    def _spec(self, plan: MicroBatchPlan) -> canonical.StepSpec:
        cfg = self.cfg
        return self.activation_memory.with_remat(canonical.StepSpec(
            model=cfg.model, flat=self.flat_spec, optim=compiled_optim(cfg.optim),
            num_devices=plan.num_devices, slots=plan.slots, num_micro=cfg.data.micro_batches,
            micro_size=cfg.data.micro_size, seq_len=cfg.data.seq_len, dropout=cfg.dropout,
            seed=cfg.seed, chunk=cfg.elastic.chunk_size,
            snapshot=self.memory if cfg.elastic.snapshot else None), self.devices)

    def _step_exe(self, active: Sequence[int], info: bool = False):
        spec = self._spec(self._plan(active))

        def builder(devices):
            mesh = canonical.layout_mesh(devices)
            return canonical.make_step(spec, mesh), canonical.abstract_step_args(spec, mesh)

        out = self.cache.get_with_info("elastic_step", spec, [self.devices[i] for i in active], builder)
        return out if info else out[0]

    def _layout_programs(self, active: Sequence[int]) -> None:
        """Snapshot and verify programs of a layout."""
        if not self.cfg.elastic.snapshot:
            return
        devs = [self.devices[i] for i in active]
        n, S = len(active), self.layout(active).shard_size
        for key, builder in (build_snapshot_program(n, S, self.memory), build_verify_program(n, S, "device"),
                             build_verify_program(n, S, self.memory)):
            self.cache.get(key[0], key[1], devs, builder)

    def _holder_verify_programs(self, holders: Sequence[jax.Device], shard: int) -> None:
        """The verify programs a recovery runs on the survivors that hold the old shards."""
        for key, builder in (build_verify_program(len(holders), shard, "device"),
                             build_verify_program(len(holders), shard, self.memory)):
            self.cache.get(key[0], key[1], holders, builder)

    def _from_tree_exe(self, active: Sequence[int]):
        """The program that turns a restored {"params", "mu", "nu"} tree into the flat state."""
        devs = [self.devices[i] for i in active]
        n = len(devs)

        def builder(devices):
            mesh = canonical.layout_mesh(devices)
            abstract = self._abstract_state(mesh)
            return (canonical.make_from_tree(self.flat_spec, mesh, n),
                    (abstract["params"], abstract["mu"], abstract["nu"]))

        return self.cache.get("from_tree", (self.cfg.model, n), devs, builder)

    def _likely_sets(self) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(from set, to set, lost devices) transitions worth compiling for ahead of time."""
        policy = self.cfg.elastic.precompile
        cur = tuple(self.active)
        out = []
        if policy == "single_loss":
            if len(cur) > 1:
                out += [(cur, tuple(i for i in cur if i != d), (d,)) for d in cur]
            out += [(cur, tuple(sorted(cur + (d,))), ()) for d in range(len(self.devices)) if d not in cur]
        elif policy == "scheduled":
            sets = self.schedule.device_sets(len(self.devices), start_step=self._next_step, initial=cur)
            out += [(a, b, tuple(sorted(set(a) - set(b)))) for a, b in zip(sets, sets[1:])]
        return out

    def precompile(self) -> None:
        """Compile (or retarget) the programs of the likely next device sets in the background:
        first everything cheap (small programs, retargets of step executables already compiled
        for that size), then the step for sizes not compiled yet. Without snapshots a loss always
        falls back to the checkpoint, so the restore's conversion program is compiled too: a
        checkpoint recovery then compiles nothing that an in-memory one would not."""
        if self.cfg.elastic.precompile == "none":
            return
        likely = self._likely_sets()
        by_id = {d.id: d for d in self.devices}
        restores = self._checkpoints is not None and not self.cfg.elastic.snapshot

        def small(src, act, lost):
            old_layout = self.layout(src)
            self._layout_programs(act)
            if restores and lost:
                self._from_tree_exe(act)
            new_ids = [self.devices[i].id for i in act]
            lost_ids = [self.devices[i].id for i in lost]
            if self.cfg.elastic.snapshot and lost:
                self._holder_verify_programs([by_id[d] for d in old_layout.device_ids if d not in lost_ids],
                                             old_layout.shard_size)
            try:
                plan = plan_transfers(old_layout, new_ids, lost_ids, use_replicas=bool(lost))
            except UnrecoverableError:
                return
            precompile_plan(self.cache, plan, self.memory, by_id)

        def job():
            later = []
            for src, act, lost in likely:
                small(src, act, lost)
                if self._has_step_size(act):
                    self._step_exe(act)
                else:
                    later.append(act)
            for act in later:
                self._step_exe(act)

        self.cache.background(job)

    def _has_step_size(self, act: Sequence[int]) -> bool:
        return self.cache.has_size("elastic_step", self._spec(self._plan(act)), len(act))

    # ------------------------------------------------------------------ state (StepProgram)
    def build(self) -> None:
        self.mesh = canonical.layout_mesh(self.active_devices)
        self._spec(self._plan(self.active))  # a memory budget no plan meets fails here, before training

    def init_state(self) -> None:
        params = init_params_f32(self.cfg)
        arr = np.zeros((3, self.layout().padded_size), np.float32)
        arr[0, :self.flat_spec.num_params] = self.flat_spec.flatten_np(params)
        self._flat = jax.device_put(arr, canonical.state_sharding(self.mesh))
        self._snap = None
        self._count = 0

    def _abstract_state(self, mesh) -> dict[str, Any]:
        shapes = decoder.param_shapes(self.cfg.model)
        sh = tree_shardings(decoder.param_logical_axes(self.cfg.model), shapes, mesh)
        is_shape = lambda s: isinstance(s, tuple) and all(isinstance(i, int) for i in s)  # noqa: E731
        p = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s, jnp.float32, sharding=h), shapes, sh,
                         is_leaf=is_shape)
        rep = canonical.layout_sharding(mesh, canonical.REPLICATED)
        return {"params": p, "mu": p, "nu": p, "count": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}

    def abstract_state(self) -> dict[str, Any]:
        return self._abstract_state(canonical.layout_mesh(self.active_devices))

    def load_state(self, tree: dict[str, Any]) -> None:
        self._snap = None
        exe = self._from_tree_exe(self.active)
        self._flat = exe(tree["params"], tree["mu"], tree["nu"])
        self._count = int(jax.device_get(tree["count"]))

    def state_tree(self) -> dict[str, Any]:
        devs = self.active_devices
        n = len(devs)

        def builder(devices):
            mesh = canonical.layout_mesh(devices)
            return (canonical.make_to_tree(self.flat_spec, mesh),
                    (jax.ShapeDtypeStruct((3, self.layout().padded_size), jnp.float32,
                                          sharding=canonical.state_sharding(mesh)),))

        exe = self.cache.get("to_tree", (self.cfg.model, n), devs, builder)
        mesh = canonical.layout_mesh(devs)
        abstract = self._abstract_state(mesh)
        shardings = jax.tree.map(lambda a: a.sharding, abstract["params"])
        params, mu, nu = (jax.device_put(t, shardings) for t in exe(self._flat))
        return {"params": params, "mu": mu, "nu": nu,
                "count": jax.device_put(np.int32(self._count), abstract["count"].sharding)}

    def params(self) -> Any:
        P = self.flat_spec.num_params
        return self.flat_spec.unflatten_np(np.asarray(jax.device_get(self._flat))[0, :P])

    @property
    def flat(self) -> jax.Array:
        """The [3, N*S] device state (rows params, Adam mu, Adam nu; `canonical.STATE_AXES`)."""
        return self._flat

    def flat_state(self) -> np.ndarray:
        """[3, P] host copy of (params, mu, nu) as flat vectors (layout-independent)."""
        return np.asarray(jax.device_get(self._flat))[:, :self.flat_spec.num_params]

    def compile(self) -> Any:
        exe = self._step_exe(self.active)
        self._layout_programs(self.active)
        return exe

    # ------------------------------------------------------------------ the step (StepProgram)
    def start(self, step: int, *, log: Callable[[str], None], checkpoints) -> None:
        self._loop_log, self._checkpoints, self._next_step = log, checkpoints, step
        self.precompile()

    def advance(self, step: int, tokens_BxT1: np.ndarray, lr: np.float32) -> Advance:
        self._next_step = step
        self._apply_joins(step)
        exe = self._step_exe(self.active)
        for event in self.activation_memory.report(len(self.active), self._log):
            self._record_event(step, event)
        inputs = self._inputs(step, tokens_BxT1, self._plan(self.active), lr)
        started = time.perf_counter()
        snap = self._snapshot_for(step)
        out = exe(self._flat, inputs if snap is None else inputs._replace(ref_Nx2=snap.ref))
        fails = self._failures_during(step)
        if fails:
            return Advance(self._recover_from_loss(step, fails, snap, out), None)
        metrics = jax.device_get(out.metrics)
        if snap is not None and self._repaired_bad_input(step, snap, metrics):
            out.flat_3xNS.delete()  # step s consumed corrupted input: run it again
            self._flat = snap.primary
            return Advance(step, None)
        return Advance(step + 1, self._commit(step, out, metrics, float(lr), started))

    def _inputs(self, step: int, tokens_BxT1: np.ndarray, plan: MicroBatchPlan,
                lr: np.float32) -> canonical.StepInputs:
        return step_inputs(self.cfg, step, tokens_BxT1, plan, count=self._count, lr=lr)

    def _snapshot_for(self, step: int) -> Snapshot | None:
        """The snapshot step `step` starts from: the one the previous step emitted, else a new one;
        scheduled faults are injected into it here."""
        if not self.cfg.elastic.snapshot:
            return None
        snap = self._snap
        if snap is None or snap.step != step or snap.layout != self.layout():
            snap = take_snapshot(self.cache, step, self._count, self.layout(), self.active_devices, self._flat,
                                 self.memory)
            self._snap = snap
        for f in self.faults:
            if f.step == step and f not in self._done_faults:
                self._done_faults.add(f)
                inject_bit_flip(self.cache, snap, copy=f.copy, shard=f.shard, row=f.row, index=f.index,
                                bit=f.bit)
                if f.copy == "primary":
                    self._flat = snap.primary
                self._record_event(step, {"event": "bitflip_injected", "copy": f.copy, "shard": f.shard})
        return snap

    def _failures_during(self, step: int) -> list[MembershipEvent]:
        """Boundary step+1: the devices that did not survive step `step` (asked once per step)."""
        if step in self._done_fail_checks:
            return []
        self._done_fail_checks.add(step)
        return self.membership.failures(step)

    def _recover_from_loss(self, step: int, fails: list[MembershipEvent], snap: Snapshot | None,
                           out: canonical.StepOutputs) -> int:
        """Discard the failed step's result and rebuild the state on the survivors; returns the
        step to run next."""
        jax.block_until_ready(out.metrics)  # the failed step ends (errors out, on real hardware)
        out.flat_3xNS.delete()
        lost = sorted(e.device for e in fails)
        self._log(f"step {step}: lost device(s) {lost} during the step")
        resume = self._shrink(fails, step, snap)
        self._snap = None
        rec = self._pending_recovery
        self._record_event(resume, {"event": "fail", "devices": lost, "recovery": rec.to_json() if rec else None})
        return resume

    def _repaired_bad_input(self, step: int, snap: Snapshot, metrics: dict[str, Any]) -> bool:
        """Check the copies step `step` read (all copies every `verify_every` steps) and repair any
        bad one from its twin; True when the step's own input was bad (it must run again)."""
        bad = tuple(int(i) for i in np.flatnonzero(~metrics["input_ok"]))
        res = VerifyResult(bad, ())
        every = self.cfg.elastic.verify_every
        if every and step % every == 0:
            full = verify(self.cache, snap)
            res = VerifyResult(tuple(sorted(set(bad) | set(full.bad_primary))), full.bad_replica)
        if res.ok:
            return False
        notes = repair(snap, res)
        for n in notes:
            self._log(f"step {step}: checksum mismatch: {n}")
        self._record_event(step, {"event": "corruption_repaired", "notes": notes,
                                  "bad_primary": list(res.bad_primary), "bad_replica": list(res.bad_replica)})
        return bool(res.bad_primary)

    def _commit(self, step: int, out: canonical.StepOutputs, metrics: dict[str, Any], lr: float,
                started: float) -> CommittedStep:
        """The step's output becomes the state (and, with snapshots, the next snapshot)."""
        step_time = time.perf_counter() - started
        if self._pending_recovery is not None:
            self._pending_recovery.first_step_s = step_time
            self._log(self._pending_recovery.summary())
            self._pending_recovery = None
            self.precompile()  # for the new device set, without slowing its first step
        self._flat = out.flat_3xNS
        self._count += 1
        if self.cfg.elastic.snapshot:
            self._snap = Snapshot(step + 1, self._count, self.layout(), tuple(self.active_devices),
                                  out.flat_3xNS, out.replica_3xNS, out.ref_Nx2, self.memory)
        events, self._step_events = self._step_events, []
        return CommittedStep(step, metrics, lr, len(self.active), started, step_time, events)

    # ------------------------------------------------------------------ membership changes
    def _apply_joins(self, step: int) -> None:
        """Devices that (re)join before `step` (asked once per step) get their share of the state."""
        if step in self._done_joins:
            return
        self._done_joins.add(step)
        joins = self.membership.joins(step)
        if joins:
            self._grow(joins, step)
            self._record_event(step, {"event": "join", "devices": sorted(e.device for e in joins),
                                      "recovery": self._pending_recovery.to_json()})

    def _grow(self, joins: list[MembershipEvent], step: int) -> None:
        join_idx = sorted({e.device for e in joins})
        before = list(self.active)
        detection = probe([self.devices[i] for i in join_idx])
        t1 = time.perf_counter()
        new_active = sorted(set(self.active) | set(join_idx))
        old_layout = self.layout()
        new_ids = [self.devices[i].id for i in new_active]
        new_devs = [self.devices[i] for i in new_active]
        plan = plan_transfers(old_layout, new_ids, use_replicas=False)
        check_plan(plan)
        t2 = time.perf_counter()
        how = self._step_exe(new_active, info=True)[1]
        self._layout_programs(new_active)
        precompile_plan(self.cache, plan, self.memory, {d.id: d for d in self.devices})
        t3 = time.perf_counter()
        prim_by_dev = per_device(self._flat)
        primary = {k: prim_by_dev[d] for k, d in enumerate(old_layout.device_ids)}
        flat = execute_plan(self.cache, plan, primary, {}, new_devs, self.memory)
        flat.block_until_ready()
        t4 = time.perf_counter()
        self._flat, self.active, self._snap = flat, new_active, None
        self.mesh = canonical.layout_mesh(new_devs)
        self._start_recovery(Recovery("join", step, before, list(new_active), detection_s=detection,
                                      replanning_s=t2 - t1, compile_s=t3 - t2, compile_how=how,
                                      transfer_s=t4 - t3, elements_moved=plan.network_elements()))

    def _start_recovery(self, rec: Recovery) -> None:
        self.recoveries.append(rec)
        self._pending_recovery = rec  # the next likely sets are compiled after its first step

    def _shrink(self, fails: list[MembershipEvent], step: int, snap: Snapshot | None) -> int:
        """Recover from losing the devices of `fails` during `step`; returns the step to run next."""
        lost_idx = sorted({e.device for e in fails})
        before = list(self.active)
        survivors = [i for i in self.active if i not in lost_idx]
        detection = probe([self.devices[i] for i in survivors])
        if isinstance(self.membership, DistributedMembership):
            detection += self.membership.last_check_s
        t1 = time.perf_counter()
        lost_ids = [self.devices[i].id for i in lost_idx]
        old_layout = self.layout()
        new_ids = [self.devices[i].id for i in survivors]
        new_devs = [self.devices[i] for i in survivors]
        try:
            if snap is None:
                raise UnrecoverableError("no in-memory snapshot (elastic.snapshot is off)")
            plan = plan_transfers(old_layout, new_ids, lost_ids)
            check_plan(plan)
        except UnrecoverableError as e:
            return self._from_checkpoint(step, survivors, str(e), detection)
        t2 = time.perf_counter()
        how = self._step_exe(survivors, info=True)[1]
        self._layout_programs(survivors)
        self._holder_verify_programs([d for d in self.active_devices if d.id not in lost_ids],
                                     old_layout.shard_size)
        precompile_plan(self.cache, plan, self.memory, {d.id: d for d in self.devices})
        t3 = time.perf_counter()
        _fence(snap, lost_ids)
        tv = time.perf_counter()
        res = verify(self.cache, snap, lost=lost_ids)
        notes = []
        if not res.ok:
            try:
                notes = repair(snap, res, lost=lost_ids)
            except UnrecoverableError as e:  # both copies of a shard are bad or gone
                return self._from_checkpoint(step, survivors, str(e), detection)
            for n in notes:
                self._log(f"step {step}: {n}")
        verify_s = time.perf_counter() - tv
        primary, replica = snap.shard_buffers(lost_ids)
        flat = execute_plan(self.cache, plan, primary, replica, new_devs, self.memory)
        flat.block_until_ready()
        t4 = time.perf_counter()
        self._flat, self.active, self._count = flat, survivors, snap.count
        self.mesh = canonical.layout_mesh(new_devs)
        self._start_recovery(Recovery("fail", step, before, list(survivors), detection_s=detection,
                                      replanning_s=t2 - t1, compile_s=t3 - t2, compile_how=how,
                                      transfer_s=t4 - t3, verify_s=verify_s,
                                      elements_moved=plan.network_elements(), notes=notes))
        return step

    def _from_checkpoint(self, step: int, survivors: list[int], why: str, detection: float) -> int:
        """No copy of some shard survives in memory: restore the last committed checkpoint onto the
        survivors; returns its step (the steps since are lost and run again)."""
        ckpt = self._checkpoints
        if ckpt is None:
            raise UnrecoverableError(f"step {step}: cannot recover in memory ({why}) and there is no "
                                     f"checkpoint (set checkpoint.dir)") from None
        ckpt.wait()
        if ckpt.latest_step() is None:
            raise UnrecoverableError(f"step {step}: cannot recover in memory ({why}) and no "
                                     f"checkpoint has been committed yet")
        before = list(self.active)
        t1 = time.perf_counter()
        self.active = survivors
        self.mesh = canonical.layout_mesh(self.active_devices)
        t2 = time.perf_counter()
        how = self._step_exe(survivors, info=True)[1]
        self._layout_programs(survivors)
        self._from_tree_exe(survivors)
        t3 = time.perf_counter()
        tree, meta = ckpt.restore(self.abstract_state())  # from disk onto the survivors' mesh
        self.load_state(tree)
        self._flat.block_until_ready()
        t4 = time.perf_counter()
        resume = int(meta["step"])
        self._start_recovery(Recovery("checkpoint", step, before, list(survivors), detection_s=detection,
                                      replanning_s=t2 - t1, compile_s=t3 - t2, compile_how=how,
                                      transfer_s=t4 - t3, lost_steps=step - resume, notes=[why]))
        return resume


def step_inputs(cfg: LMTrainConfig, step: int, tokens_BxT1: np.ndarray, plan: MicroBatchPlan, *, count: int,
                lr: np.float32) -> canonical.StepInputs:
    """The layout-invariant step's host inputs: the global batch laid out as the plan's per-device
    slot tables (host arrays; `canonical.STEP_INPUT_AXES` says how each is sharded)."""
    b, T, M = cfg.data.micro_size, cfg.data.seq_len, cfg.data.micro_batches
    ids_B = example_ids(step, tokens_BxT1.shape[0])
    table_NxK = plan.slot_table()
    N, K = table_NxK.shape
    tok = np.zeros((N, K, b, T + 1), np.int32)
    ex = np.zeros((N, K, b), np.int32)
    for i in range(N):
        for k in range(K):
            m = table_NxK[i, k]
            if m >= 0:
                tok[i, k] = tokens_BxT1[m * b:(m + 1) * b]
                ex[i, k] = ids_B[m * b:(m + 1) * b]
    micro_slot_M, micro_active_M = plan.micro_to_slot()
    targets_M = target_count(tokens_BxT1).reshape(M, b).sum(axis=1)
    return canonical.StepInputs(
        count=np.int32(count), tokens_NxKxbxT1=tok, example_ids_NxKxb=ex, slot_micro_NxK=table_NxK,
        step=np.int32(step), micro_slot_M=micro_slot_M, micro_active_M=micro_active_M,
        n_valid=np.float32(targets_M[micro_active_M].sum()), lr=lr)


def _fence(snap: Snapshot, lost_ids: Sequence[int]) -> None:
    """The lost devices' buffers are gone: delete them from the snapshot."""
    pb, rb = snap.by_device()
    for d in lost_ids:
        for bufs in (pb, rb):
            buf = bufs.pop(d, None)
            if buf is not None:
                buf.delete()
    snap.pieces = (pb, rb)


def _validated_schedule(cfg: LMTrainConfig, devices: list[jax.Device], *, explicit: bool) -> EventSchedule:
    """The fail/join schedule, replayed against the run before any compute. A device number past
    the run's devices is an error that says, on a CPU machine short of devices, how to get more."""
    schedule = EventSchedule.from_specs(cfg.elastic.fail, cfg.elastic.join)
    try:
        schedule.validate(num_devices=len(devices), steps=cfg.steps, has_checkpoint=cfg.checkpoint.dir is not None)
    except EventSpecError as e:
        msg = str(e)
        needed = max((ev.device for ev in schedule.events), default=-1) + 1
        if needed > len(devices) and not explicit and cfg.devices is None and devices[0].platform == "cpu":
            from jaxsys.runtime import cpu_devices_hint

            msg += f"; {cpu_devices_hint(needed)}"
        raise TrainConfigError(msg) from None
    return schedule
