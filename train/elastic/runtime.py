"""The elastic trainer: lose or gain devices mid-run without changing the math.

`ElasticTrainer` runs the trainer's loop on the layout-invariant step
(`jaxsys.train.elastic.canonical`) and adds, at every step boundary:

1. joins: a device that (re)joins before step s gets its share of the state (planned transfers
   from the current shards) and step s runs on the larger set;
2. a snapshot of the pre-step state: the state itself, a replica of shard k on device k+1,
   reference checksums. The previous step emitted it (in the same program); `take_snapshot`
   makes one only after a change;
3. the step (not donating its input: the input *is* the snapshot's primary copy; the step checks
   it against the reference checksums);
4. failures: a device lost during step s -> the step's result is discarded, the lost device is
   fenced (its buffers deleted), the survivors' copies are verified, the transfer planner builds
   the new layout from surviving primaries and replicas, the executable for the survivors comes
   from the ahead-of-time cache, and step s runs again on the survivors: no completed step is
   lost and no disk is read. Two ring neighbours lost at once fall back to the last Orbax
   checkpoint (steps since then are lost);
5. verification: every step checks its primary input; every `verify_every` steps all held copies
   (replicas in host memory included) are checksummed. A bad primary (the input step s consumed)
   is repaired from its replica and step s is re-run; a bad replica is re-copied from its primary.

Global batch, micro-batches, reduction order and per-example RNG never depend on the device set,
so a run that loses device 3 at step 20 and regains it at step 40 produces the same losses and
parameters, bit for bit, as the run without failures (tests/test_elastic.py).

`elastic.policy: torchft` is the negative control: after a loss the survivors keep only their
own micro-batches and average over the participants (the global batch shrinks), as TorchFT-style
fault tolerance does; its trajectory departs from the failure-free run.

Unlike the GSPMD loop, this loop waits for each step to finish before committing it (a step that
a device did not survive must not be committed, and its snapshot is released only then); the host
still prepares the next batch while the step runs, so the wait costs one dispatch latency.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.models import decoder
from jaxsys.train.config import LMTrainConfig, TrainConfigError
from jaxsys.train.elastic import canonical
from jaxsys.train.elastic.compile import ExecutableCache, global_cache
from jaxsys.train.elastic.events import EventSchedule, EventSpecError
from jaxsys.train.elastic.layout import FlatLayout, FlatSpec, MicroBatchPlan
from jaxsys.train.elastic.membership import DistributedMembership, ScheduledMembership, probe
from jaxsys.train.elastic.planner import UnrecoverableError, check_plan, plan_transfers
from jaxsys.train.elastic.snapshot import (Snapshot, VerifyResult, build_snapshot_program,
                                           build_verify_program, inject_bit_flip, per_device, repair,
                                           resolve_replica_memory, take_snapshot, verify)
from jaxsys.train.elastic.transfer import execute_plan, precompile_plan
from jaxsys.train.optim import compiled_optim
from jaxsys.train.trainer import (MetricsWriter, StepRecord, Trainer, TrainResult, _progress,
                                  init_params_f32)


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


class ElasticTrainer(Trainer):
    """Elastic causal-LM trainer (see the module docstring)."""

    def __init__(self, cfg: LMTrainConfig, *, devices: Sequence[jax.Device] | None = None,
                 cache: ExecutableCache | None = None, membership: Any = None,
                 faults: Sequence[BitFlip] = (), log: Callable[[str], None] | None = None):
        if not cfg.elastic.enabled:
            cfg = cfg.replace(**{"elastic.enabled": True})
        if jax.process_count() > 1:
            raise TrainConfigError(
                "the elastic trainer is single-controller: it drives all of its devices from one "
                "process; in a multi-process job use jaxsys.train.elastic.DistributedMembership to "
                "watch membership (moving shards between processes is not implemented)")
        super().__init__(cfg, devices=devices)
        self.cache = cache if cache is not None else global_cache()
        self.flat_spec = FlatSpec.from_shapes(decoder.param_shapes(cfg.model))
        self.schedule = EventSchedule.from_specs(cfg.elastic.fail, cfg.elastic.join)
        try:
            self.schedule.validate(num_devices=len(self.devices), steps=cfg.steps,
                                   has_checkpoint=self.ckpt is not None)
        except EventSpecError as e:
            raise TrainConfigError(str(e)) from None
        if membership is not None:
            self.membership = membership
        elif cfg.elastic.membership == "distributed":
            try:
                self.membership = DistributedMembership(self.devices)
            except RuntimeError as e:
                raise TrainConfigError(f"elastic.membership=distributed: {e}") from None
        else:
            self.membership = ScheduledMembership(self.schedule)
        self.faults = sorted(faults, key=lambda f: f.step)
        self.memory = resolve_replica_memory(cfg.elastic.replica_memory, self.devices)
        self.recoveries: list[Recovery] = []
        self.events: list[dict[str, Any]] = []
        self._log_fn = log
        self._bar = None
        self.active: list[int] = list(range(len(self.devices)))
        self._base_plan = MicroBatchPlan.balanced(cfg.data.micro_batches, len(self.devices))
        self._flat: jax.Array | None = None
        self._snap: Snapshot | None = None
        self._count = 0
        self._pending_recovery: Recovery | None = None
        self._done_fail_checks: set[int] = set()
        self._done_joins: set[int] = set()
        self._done_faults: set[BitFlip] = set()

    # ------------------------------------------------------------------ layouts and programs
    @property
    def active_devices(self) -> list[jax.Device]:
        return [self.devices[i] for i in self.active]

    def _layout(self, active: Sequence[int]) -> FlatLayout:
        return FlatLayout(self.flat_spec.num_params, tuple(self.devices[i].id for i in active))

    def _plan(self, active: Sequence[int]) -> MicroBatchPlan:
        M = self.cfg.data.micro_batches
        if self.cfg.elastic.policy == "torchft":
            return MicroBatchPlan(M, tuple(self._base_plan.assignment[i] for i in active))
        return MicroBatchPlan.balanced(M, len(active))

    def _spec(self, plan: MicroBatchPlan) -> canonical.StepSpec:
        cfg = self.cfg
        return canonical.StepSpec(
            model=cfg.model, flat=self.flat_spec, optim=compiled_optim(cfg.optim),
            num_devices=plan.num_devices, slots=plan.slots, num_micro=cfg.data.micro_batches,
            micro_size=cfg.data.micro_size, seq_len=cfg.data.seq_len, dropout=cfg.dropout,
            seed=cfg.seed, chunk=cfg.elastic.chunk_size,
            snapshot=self.memory if cfg.elastic.snapshot else None)

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
        n, S = len(active), self._layout(active).shard_size
        for key, builder in (build_snapshot_program(n, S, self.memory), build_verify_program(n, S, "device"),
                             build_verify_program(n, S, self.memory)):
            self.cache.get(key[0], key[1], devs, builder)

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
            sets = self.schedule.device_sets(len(self.devices), start_step=self.step, initial=cur)
            out += [(a, b, tuple(sorted(set(a) - set(b)))) for a, b in zip(sets, sets[1:])]
        return out

    def _precompile(self) -> None:
        """Compile (or retarget) the programs of the likely next device sets in the background:
        first everything cheap (small programs, retargets of step executables already compiled
        for that size), then the step for sizes not compiled yet."""
        if self.cfg.elastic.precompile == "none":
            return
        likely = self._likely_sets()
        by_id = {d.id: d for d in self.devices}

        def small(src, act, lost):
            old_layout = self._layout(src)
            self._layout_programs(act)
            new_ids = [self.devices[i].id for i in act]
            lost_ids = [self.devices[i].id for i in lost]
            if self.cfg.elastic.snapshot and lost:
                holders = [by_id[d] for d in old_layout.device_ids if d not in lost_ids]
                for key, builder in (build_verify_program(len(holders), old_layout.shard_size, "device"),
                                     build_verify_program(len(holders), old_layout.shard_size, self.memory)):
                    self.cache.get(key[0], key[1], holders, builder)
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

    # ------------------------------------------------------------------ state
    def _setup_mesh(self) -> None:
        self.mesh = canonical.layout_mesh(self.active_devices)

    def _build_step(self):
        return None

    def _init_state(self) -> Any:
        return self._flat_from_host(init_params_f32(self.cfg), None, None)

    def _flat_from_host(self, params, mu, nu) -> jax.Array:
        lay = self._layout(self.active)
        P, NS = lay.num_params, lay.padded_size
        arr = np.zeros((3, NS), np.float32)
        for r, tree in enumerate((params, mu, nu)):
            if tree is not None:
                arr[r, :P] = self.flat_spec.flatten_np(tree)
        self._flat = jax.device_put(arr, canonical.state_sharding(self.mesh))
        return self._flat

    def abstract_state(self) -> dict[str, Any]:
        from jaxsys.sharding import tree_shardings

        mesh = canonical.layout_mesh(self.active_devices)
        shapes = decoder.param_shapes(self.cfg.model)
        sh = tree_shardings(decoder.param_logical_axes(self.cfg.model), shapes, mesh)
        is_shape = lambda s: isinstance(s, tuple) and all(isinstance(i, int) for i in s)  # noqa: E731
        p = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s, jnp.float32, sharding=h), shapes, sh,
                         is_leaf=is_shape)
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return {"params": p, "mu": p, "nu": p, "count": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}

    def state_tree(self) -> dict[str, Any]:
        from jaxsys.sharding import tree_shardings

        devs = self.active_devices
        n = len(devs)

        def builder(devices):
            mesh = canonical.layout_mesh(devices)
            fn = canonical.make_to_tree(self.flat_spec, mesh)
            S = canonical.ceil_div(self.flat_spec.num_params, n)
            return fn, (jax.ShapeDtypeStruct((3, n * S), jnp.float32, sharding=canonical.state_sharding(mesh)),)

        exe = self.cache.get("to_tree", (self.cfg.model, n), devs, builder)
        mesh = canonical.layout_mesh(devs)
        sh = tree_shardings(decoder.param_logical_axes(self.cfg.model), decoder.param_shapes(self.cfg.model), mesh)
        params, mu, nu = (jax.device_put(t, sh) for t in exe(self._flat))
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return {"params": params, "mu": mu, "nu": nu,
                "count": jax.device_put(np.int32(self._count), rep)}

    def _from_tree_exe(self):
        devs = self.active_devices
        n = len(devs)

        def builder(devices):
            mesh = canonical.layout_mesh(devices)
            fn = canonical.make_from_tree(self.flat_spec, mesh, n)
            abs_tree = self.abstract_state()
            return fn, (abs_tree["params"], abs_tree["mu"], abs_tree["nu"])

        return self.cache.get("from_tree", (self.cfg.model, n), devs, builder)

    def _load_tree(self, tree: dict[str, Any]) -> None:
        self._snap = None
        exe = self._from_tree_exe()
        self._flat = exe(tree["params"], tree["mu"], tree["nu"])
        self._count = int(jax.device_get(tree["count"]))

    def params(self) -> Any:
        P = self.flat_spec.num_params
        return self.flat_spec.unflatten_np(np.asarray(jax.device_get(self._flat))[0, :P])

    def flat_state(self) -> np.ndarray:
        """[3, P] host copy of (params, mu, nu) as flat vectors (layout-independent)."""
        return np.asarray(jax.device_get(self._flat))[:, :self.flat_spec.num_params]

    def setup(self) -> None:
        if self._flat is not None:
            return
        self._setup_mesh()
        start = self._maybe_resume()
        if self._flat is None:
            self._init_state()
        self.step = start
        if not start:
            self._count = 0

    def compile(self) -> Any:
        self.setup()
        exe = self._step_exe(self.active)
        self._layout_programs(self.active)
        return exe

    # ------------------------------------------------------------------ helpers
    def _log(self, msg: str) -> None:
        if self._log_fn is not None:
            self._log_fn(msg)
        elif self._bar is not None and not self._bar.disable:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def _slot_batch(self, step: int, plan: MicroBatchPlan):
        tokens, _, _ = self._host_batch(step)
        b, T = self.cfg.data.micro_size, self.cfg.data.seq_len
        B = self.cfg.data.global_batch
        table = plan.slot_table()
        N, K = table.shape
        tok = np.zeros((N, K, b, T + 1), np.int32)
        ex = np.zeros((N, K, b), np.int32)
        for i in range(N):
            for k in range(K):
                m = table[i, k]
                if m >= 0:
                    tok[i, k] = tokens[m * b:(m + 1) * b]
                    ex[i, k] = step * B + m * b + np.arange(b, dtype=np.int32)
        idx, active = plan.micro_to_slot()
        valid = tokens[:, 1:] >= 0
        per_micro = valid.reshape(plan.num_micro, b * T).sum(axis=1)
        n_valid = np.float32(per_micro[active].sum())
        return tok, ex, table, idx, active, n_valid

    def _snapshot_for(self, step: int) -> Snapshot | None:
        """The snapshot step `step` starts from: the one the previous step emitted, else a new one;
        scheduled faults are injected into it here."""
        if not self.cfg.elastic.snapshot:
            return None
        snap = self._snap
        if snap is None or snap.step != step or snap.layout != self._layout(self.active):
            snap = take_snapshot(self.cache, step, self._count, self._layout(self.active),
                                 self.active_devices, self._flat, self.memory)
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

    def _record_event(self, step: int, event: dict[str, Any]) -> None:
        event = {"step": step, **event}
        self.events.append(event)
        self._step_events.append(event)

    # ------------------------------------------------------------------ membership changes
    def _grow(self, joins, step: int) -> None:
        join_idx = sorted({e.device for e in joins})
        before = list(self.active)
        detection = probe([self.devices[i] for i in join_idx])
        t1 = time.perf_counter()
        new_active = sorted(set(self.active) | set(join_idx))
        old_layout = self._layout(self.active)
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
        rec = Recovery("join", step, before, list(new_active), detection_s=detection,
                       replanning_s=t2 - t1, compile_s=t3 - t2, compile_how=how, transfer_s=t4 - t3,
                       elements_moved=plan.network_elements())
        self._start_recovery(rec)

    def _start_recovery(self, rec: Recovery) -> None:
        self.recoveries.append(rec)
        self._pending_recovery = rec  # the next likely sets are compiled after its first step

    def _shrink(self, fails, step: int, snap: Snapshot | None) -> int:
        """Recover from losing the devices of `fails` during `step`; returns the step to run next."""
        lost_idx = sorted({e.device for e in fails})
        before = list(self.active)
        survivors = [i for i in self.active if i not in lost_idx]
        detection = probe([self.devices[i] for i in survivors])
        if isinstance(self.membership, DistributedMembership):
            detection += self.membership.last_check_s
        t1 = time.perf_counter()
        lost_ids = [self.devices[i].id for i in lost_idx]
        old_layout = self._layout(self.active)
        new_ids = [self.devices[i].id for i in survivors]
        new_devs = [self.devices[i] for i in survivors]
        try:
            if snap is None:
                raise UnrecoverableError("no in-memory snapshot (elastic.snapshot is off)")
            plan = plan_transfers(old_layout, new_ids, lost_ids)
            check_plan(plan)
        except UnrecoverableError as e:
            return self._from_checkpoint(step, survivors, lost_idx, str(e), detection)
        t2 = time.perf_counter()
        how = self._step_exe(survivors, info=True)[1]
        self._layout_programs(survivors)
        holders = [d for d in self.active_devices if d.id not in lost_ids]
        for key, builder in (build_verify_program(len(holders), old_layout.shard_size, "device"),
                             build_verify_program(len(holders), old_layout.shard_size, self.memory)):
            self.cache.get(key[0], key[1], holders, builder)
        precompile_plan(self.cache, plan, self.memory, {d.id: d for d in self.devices})
        t3 = time.perf_counter()
        # fence the lost devices: their buffers are gone
        pb, rb = snap.by_device()
        for d in lost_ids:
            for bufs in (pb, rb):
                buf = bufs.pop(d, None)
                if buf is not None:
                    buf.delete()
        snap.pieces = (pb, rb)
        tv = time.perf_counter()
        res = verify(self.cache, snap, lost=lost_ids)
        notes = []
        if not res.ok:
            try:
                notes = repair(snap, res, lost=lost_ids)
            except UnrecoverableError as e:  # both copies of a shard are bad or gone
                return self._from_checkpoint(step, survivors, lost_idx, str(e), detection)
            for n in notes:
                self._log(f"step {step}: {n}")
        verify_s = time.perf_counter() - tv
        primary, replica = snap.shard_buffers(lost_ids)
        flat = execute_plan(self.cache, plan, primary, replica, new_devs, self.memory)
        flat.block_until_ready()
        t4 = time.perf_counter()
        self._flat, self.active, self._count = flat, survivors, snap.count
        self.mesh = canonical.layout_mesh(new_devs)
        rec = Recovery("fail", step, before, list(survivors), detection_s=detection,
                       replanning_s=t2 - t1, compile_s=t3 - t2, compile_how=how, transfer_s=t4 - t3,
                       verify_s=verify_s, elements_moved=plan.network_elements(), notes=notes)
        self._start_recovery(rec)
        return step

    def _from_checkpoint(self, step: int, survivors: list[int], lost_idx: list[int], why: str,
                         detection: float) -> int:
        if self.ckpt is None:
            raise UnrecoverableError(f"step {step}: cannot recover in memory ({why}) and there is no "
                                     f"checkpoint (set checkpoint.dir)") from None
        self.ckpt.wait()
        if self.ckpt.latest_step() is None:
            raise UnrecoverableError(f"step {step}: cannot recover in memory ({why}) and no "
                                     f"checkpoint has been committed yet")
        before = list(self.active)
        t1 = time.perf_counter()
        self.active = survivors
        self.mesh = canonical.layout_mesh(self.active_devices)
        t2 = time.perf_counter()
        how = self._step_exe(survivors, info=True)[1]
        self._layout_programs(survivors)
        self._from_tree_exe()
        t3 = time.perf_counter()
        tree, meta = self.ckpt.restore(self.abstract_state())  # from disk onto the survivors' mesh
        self._load_tree(tree)
        self._flat.block_until_ready()
        t4 = time.perf_counter()
        resume = int(meta["step"])
        rec = Recovery("checkpoint", step, before, list(survivors), detection_s=detection,
                       replanning_s=t2 - t1, compile_s=t3 - t2, compile_how=how, transfer_s=t4 - t3,
                       lost_steps=step - resume, notes=[why])
        self._start_recovery(rec)
        return resume

    # ------------------------------------------------------------------ the loop
    def run(self, steps: int | None = None, *, metrics_out: str | Path | None = None,
            progress: bool | None = None, on_step: Callable[[int, "ElasticTrainer"], None] | None = None) -> TrainResult:
        cfg = self.cfg
        end = cfg.steps if steps is None else steps
        self.setup()
        start = self.step
        writer = MetricsWriter(metrics_out if metrics_out is not None else cfg.metrics_out)
        self._bar = _progress(end, start, cfg.progress if progress is None else progress)
        records: list[StepRecord] = []
        self._step_events: list[dict[str, Any]] = []
        self._precompile()
        s = start
        try:
            while s < end:
                if s not in self._done_joins:
                    self._done_joins.add(s)
                    joins = self.membership.joins(s)
                    if joins:
                        self._grow(joins, s)
                        self._record_event(s, {"event": "join", "devices": sorted(e.device for e in joins),
                                               "recovery": self._pending_recovery.to_json()})
                plan = self._plan(self.active)
                exe = self._step_exe(self.active)
                tok, ex, slots, idx, act, n_valid = self._slot_batch(s, plan)
                t_step = time.perf_counter()
                snap = self._snapshot_for(s)
                lr = self.lr(self._count)
                args = (self._flat, np.int32(self._count), tok, ex, slots, np.int32(s), idx, act, n_valid, lr)
                if snap is not None:
                    new_flat, _, metrics, replica, ref = exe(*args, snap.ref)
                else:
                    new_flat, _, metrics = exe(*args)
                # boundary s+1: did step s survive?
                fails = []
                if s not in self._done_fail_checks:
                    self._done_fail_checks.add(s)
                    fails = self.membership.failures(s)
                if fails:
                    jax.block_until_ready(metrics)  # the failed step ends (errors out, on real hardware)
                    new_flat.delete()
                    self._log(f"step {s}: lost device(s) {sorted(e.device for e in fails)} during the step")
                    s = self._shrink(fails, s, snap)
                    self._snap = None
                    rec = self._pending_recovery
                    self._record_event(s, {"event": "fail", "devices": sorted(e.device for e in fails),
                                           "recovery": rec.to_json() if rec else None})
                    continue
                m = jax.device_get(metrics)
                if snap is not None:
                    bad = tuple(int(i) for i in np.flatnonzero(~m["input_ok"]))
                    res = VerifyResult(bad, ())
                    if cfg.elastic.verify_every and s % cfg.elastic.verify_every == 0:
                        full = verify(self.cache, snap)
                        res = VerifyResult(tuple(sorted(set(bad) | set(full.bad_primary))), full.bad_replica)
                    if not res.ok:
                        notes = repair(snap, res)
                        for n in notes:
                            self._log(f"step {s}: checksum mismatch: {n}")
                        self._record_event(s, {"event": "corruption_repaired", "notes": notes,
                                               "bad_primary": list(res.bad_primary),
                                               "bad_replica": list(res.bad_replica)})
                        if res.bad_primary:  # step s consumed corrupted input: run it again
                            new_flat.delete()
                            self._flat = snap.primary
                            continue
                step_time = time.perf_counter() - t_step
                if self._pending_recovery is not None:
                    self._pending_recovery.first_step_s = step_time
                    self._log(self._pending_recovery.summary())
                    self._pending_recovery = None
                    self._precompile()  # for the new device set, without slowing its first step
                ck = m["param_checksum"]
                rec = StepRecord(step=s, loss=float(m["loss"]), grad_norm=float(m["grad_norm"]),
                                 lr=float(lr), num_devices=len(self.active), step_time_s=step_time,
                                 param_checksum=f"{int(ck[0]):08x}{int(ck[1]):08x}",
                                 events=self._step_events)
                self._step_events = []
                records.append(rec)
                writer.write(rec.to_json())
                self._bar.update(1)
                self._bar.set_postfix(loss=f"{rec.loss:.4f}", dev=rec.num_devices, refresh=False)
                self._flat = new_flat
                self._count += 1
                s += 1
                self.step = s
                if snap is not None:  # the step's output is the next snapshot
                    self._snap = Snapshot(s, self._count, self._layout(self.active), tuple(self.active_devices),
                                          new_flat, replica, ref, self.memory)
                if cfg.checkpoint.every and s % cfg.checkpoint.every == 0:
                    self.save(s)
                if on_step is not None:
                    on_step(s - 1, self)
            if self.ckpt is not None and end > start and (not cfg.checkpoint.every or end % cfg.checkpoint.every):
                self.save(end)
        finally:
            self._bar.close()
            self._bar = None
            writer.close()
            if self.ckpt is not None:  # never leave a started save behind
                self.ckpt.wait()
        return TrainResult(records, list(self.events), start, end)
