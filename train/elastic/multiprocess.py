"""The elastic step across processes: a multi-controller `jax.distributed` job that loses a whole
process (hard kill, no goodbye), carries on with the survivors, and takes the process back when
it restarts, with the losses and parameters bitwise those of the run without the failure.

Every process runs this program on the same global view (the same config, the same batch of step
s, the same device list, process-major); each drives only its own devices. The train state is
the elastic layout's flat [3, N*S] array sharded over every device in service
(`jaxsys.train.elastic.canonical`), and the step is the layout-invariant step over a mesh that
spans the processes, so its collectives (all-gather, all-to-all, ppermute) run over the CPU
collectives between processes. Its bits do not depend on N, the process count or who computes
which micro-batch. At each step boundary (`DistributedElasticStep.advance`):

1. membership: every live process checks in with the coordination service
   (`membership.DistributedMembership`, a barrier among the live processes); a process that
   stopped answering its heartbeats is a failure, a process that (re)connected is a join;
2. failure: the survivors build the new layout from the copies they hold. The step in snapshot
   mode keeps its input (the primary copy of every shard) and emits a replica of shard k on device
   k + D, D the devices per process, so a replica never lives in its primary's process: one lost
   process never loses both copies. The transfer planner (`planner.plan_transfers`) picks a
   surviving copy for every piece of every new shard and the pieces move in one SPMD program over
   the survivors' mesh (`make_transfer`: one ppermute per (distance, piece) round, each piece
   placed exactly; no host round trip). The lost process's micro-batches go to the survivors
   (the balanced plan over N' devices: Odyssey's rerouting for a data-parallel layout) and the
   global batch, gradient scale and per-example dropout keys stay as they were. Several
   processes lost at one boundary are one failure: if no two of them are neighbours in the mesh
   (the replica of the last shard of one process lives in the first device of the next), every
   shard keeps a copy and the recovery is the same. Before the first collective over the new
   mesh the survivors meet (`DistributedMembership.meet`, `get_live_nodes` among them, which
   leaves out a process whose heartbeats stopped where a named barrier would wait for it until
   its timeout). A survivor that died while they planned and compiled (a second failure during
   the recovery) is missing there; nothing has moved yet, so the others plan again, from the same
   copies, without it;
3. join: a process that starts while the job runs (the coordination service holds the job's
   `started` key) learns the current step, optimizer count and devices in service from its peers
   (one key-value message written by the survivors at the boundary where they see it join) and
   receives its shard of the state in the same transfer program, over the grown mesh. The grown
   mesh takes a device order that no mesh had with the process's previous incarnation: XLA's CPU
   collectives keep a communicator per ordered device list, and the old one is tied to the dead
   process (`DistributedElasticStep._order`);
4. the step over the devices in service; it commits when its metrics (replicated) are back.

Faults it cannot repair in memory stop the job with a consistent checkpoint instead, never a hang
(`ShardCheckpoints`, written by each process on its own; `RestartFromCheckpoint`, exit status
`RESTART_EXIT_CODE`); the launcher restarts the job from the latest complete one:

5. no feasible layout: a loss whose survivors' step would need more memory per device than
   `recovery.device_memory_gib` (XLA's memory analysis of the compiled step). The survivors
   still hold every shard of the last committed step (a lost process's shards have their
   replicas in the next process), so each writes the copies it holds as the checkpoint of that
   step and stops: no step is lost;
6. both copies of some shard lost: neighbouring processes lost at one boundary (killed together,
   or one during the recovery from the other's loss). The survivors write what they hold, an
   incomplete set; the last periodic checkpoint (`--checkpoint-every`) is the one to restart
   from, and the steps since then run again;
7. a loss inside collectives: once the survivors have met, the transfer, its checksums and the
   first step on the new layout run collectives over the new mesh, and XLA's CPU collectives
   have no abort. A peer that exchanges data with the dead process gets an error at once; one
   that waits on such a peer (alive, but out of the collective) waits as long as that peer
   lives. No survivor can be released from there without ending its process, so this window is
   not repaired in memory: on the error, or after `collective_timeout_s` (a watchdog thread,
   `DistributedElasticStep._guarded`), each survivor writes its copies of the last committed
   state and stops. Until the first step on the new layout commits, those are the old layout's
   primaries and replicas (kept as the fallback; the transfer and the step in snapshot mode do
   not donate their inputs), so a lost process that is not a neighbour of an earlier one leaves
   a complete checkpoint of the step before the recovery: the job resumes there, no step lost.
   Every step runs under the same guard, so a loss inside an ordinary step's collectives
   stops the job the same way with that step's input (the tests kill inside the transfer and
   inside the first step after a recovery). A step slower than `collective_timeout_s` is taken
   for such a loss: a restart, never wrong bits;
8. the coordinator (process 0) hosts the coordination service, and `jax.distributed` cannot
   survive its loss: the moment the service's socket closes, every peer's client reports a fatal
   error and ends its process (a missed-heartbeat callback cannot be set from Python in jax
   0.10: the callable fails to convert and terminates the process just the same). Nothing can be
   written then, so the last periodic checkpoint is the one to restart from.

What this program does not do: a new coordinator is not elected in place (the coordination
service's state and every process's connection to it die with process 0; the restart from the
checkpoint is the recovery); the final gather of the state (`flat_state`) runs without the
guard, so a process lost inside it leaves its peers waiting; a loss while a joining process
receives its state is found at the meeting (a stop with a checkpoint, untested) or inside the
transfer (item 7).
`jaxsys.train.elastic.launch` starts such a job on one machine (CPU processes), kills and
restarts processes on a schedule, restarts the job from its checkpoint when it stops, and checks
the result.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.models import decoder
from jaxsys.train.config import LMTrainConfig, TrainConfigError
from jaxsys.train.elastic import canonical
from jaxsys.train.elastic.events import MembershipEvent
from jaxsys.train.elastic.layout import FlatLayout, FlatSpec, MicroBatchPlan
from jaxsys.train.elastic.membership import DistributedMembership
from jaxsys.train.elastic.planner import TransferPlan, UnrecoverableError, check_plan, plan_transfers
from jaxsys.train.elastic.runtime import Recovery, step_inputs
from jaxsys.train.optim import compiled_optim
from jaxsys.train.program import Advance, CommittedStep, StepEventLog, init_params_f32

STARTED_KEY = "jaxsys/elastic/started"
"""Set in the coordination service once the job has committed a step: a process that finds it at
start joins a running job instead of starting one."""
WELCOME_KEY = "jaxsys/elastic/welcome/{process}"
"""Where the survivors tell a joining process the boundary, count and devices it joins."""
WELCOME_TIMEOUT_MS = 600_000

COLLECTIVE_TIMEOUT_S = 60.0
"""Default of `DistributedElasticStep(collective_timeout_s=...)`."""

RESTART_EXIT_CODE = 75
"""A process's exit status when the job stopped with a consistent checkpoint and must be restarted
from it (`RestartFromCheckpoint`): the coordinator was lost, or no feasible layout remains."""


class RestartFromCheckpoint(RuntimeError):
    """The job cannot go on in memory; this process wrote the copies it holds of the state before
    `step` (`ShardCheckpoints`), and the job restarted from the latest complete checkpoint resumes
    bitwise."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# ----------------------------------------------------------------------------- checkpoints
class ShardCheckpoints:
    """Checkpoints of the flat state that the processes write shard by shard, with no coordination.

    `<directory>/step_<S>/` holds the state before step S of an N-shard layout as
    `shard_<k>-of-<N>.npy` ([3, S_shard] float32: params, mu and nu of shard k) and
    `meta-of-<N>.json` (S, the optimizer count, the layout). It is complete when the meta and all N
    shards of some N are there. Each file is written under a temporary name and renamed, so a
    process killed mid-write leaves an incomplete checkpoint, never a torn file; two processes that
    write the same shard (a primary and its replica) write the same bits; files of another layout
    (an incomplete stop, then a restarted job on other devices) never mix with these. Every `every`
    steps each process writes its primaries; a job that must stop writes the primaries and
    replicas it holds, so the survivors of one lost process cover every shard.

    Orbax is not used here: its multi-process save synchronises through the coordination service,
    the very thing that is gone when the coordinator dies. The flat vector does not depend on the
    layout, so a checkpoint loads onto any device count."""

    def __init__(self, directory: str | Path, *, every: int = 0):
        if every < 0:
            raise ValueError(f"checkpoint every {every} steps: expected >= 0 (0: only when the job stops)")
        self.directory = Path(directory)
        self.every = every

    def path(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}"

    def due(self, step: int) -> bool:
        """Whether the state before `step` is a periodic checkpoint."""
        return bool(self.every) and step % self.every == 0

    def write(self, step: int, count: int, layout: FlatLayout, shards: dict[int, np.ndarray]) -> None:
        """The state before `step` after `count` updates: `shards` {k: [3, S]} of `layout`."""
        d, n = self.path(step), layout.n
        d.mkdir(parents=True, exist_ok=True)
        for k, shard_3xS in sorted(shards.items()):
            _atomic(d / f"shard_{k:05d}-of-{n:05d}.npy", lambda f, x=shard_3xS: np.save(f, x))
        meta = {"step": step, "count": count, "num_params": layout.num_params, "num_shards": n,
                "shard_size": layout.shard_size, "device_ids": list(layout.device_ids)}
        _atomic(d / f"meta-of-{n:05d}.json", lambda f: f.write(json.dumps(meta).encode()))

    def _complete_layout(self, step: int) -> int | None:
        """N of a complete N-shard checkpoint of `step`, or None."""
        d = self.path(step)
        for meta in sorted(d.glob("meta-of-*.json")):
            n = int(meta.stem.rsplit("-", 1)[1])
            if all((d / f"shard_{k:05d}-of-{n:05d}.npy").exists() for k in range(n)):
                return n
        return None

    def complete(self, step: int) -> bool:
        return self._complete_layout(step) is not None

    def latest(self) -> int | None:
        """The latest complete checkpoint's step (None: there is none)."""
        steps = sorted((int(d.name[5:]) for d in self.directory.glob("step_*") if d.name[5:].isdigit()),
                       reverse=True)
        return next((s for s in steps if self.complete(s)), None)

    def load(self, step: int) -> tuple[np.ndarray, int]:
        """(state_3xP, count) of the complete checkpoint of `step`."""
        n = self._complete_layout(step)
        if n is None:
            raise UnrecoverableError(f"no complete checkpoint of step {step} in {self.directory}")
        d = self.path(step)
        meta = json.loads((d / f"meta-of-{n:05d}.json").read_text())
        flat = np.concatenate([np.load(d / f"shard_{k:05d}-of-{n:05d}.npy") for k in range(n)], axis=1)
        return flat[:, :meta["num_params"]], int(meta["count"])


def _atomic(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the transfer program
@dataclasses.dataclass(frozen=True)
class TransferRounds:
    """A `TransferPlan` as static per-device tables for one SPMD program over the new mesh.

    Transfers between the same (source, destination) pair are numbered r = 0, 1, ...; the
    transfers with the same distance (destination position - source position mod N') and number r
    form one round: one ppermute (none at distance 0, a local copy) in which every device sends
    at most one piece and receives at most one. Tables are indexed [round][mesh position]."""

    num_devices: int
    old_shard: int
    new_shard: int
    shifts: tuple[int, ...]
    lengths: tuple[int, ...]
    """Buffer length of each round (its longest piece)."""
    slot: tuple[tuple[int, ...], ...]
    """Per sender: 0 sends from its primary copy, 1 from its replica."""
    src_offset: tuple[tuple[int, ...], ...]
    dst_offset: tuple[tuple[int, ...], ...]
    dst_length: tuple[tuple[int, ...], ...]
    """Per receiver: where the piece lands in its new shard and how long it is (0: nothing)."""

    @classmethod
    def from_plan(cls, plan: TransferPlan) -> "TransferRounds":
        new_ids = plan.new.device_ids
        pos = {d: i for i, d in enumerate(new_ids)}
        N = len(new_ids)
        missing = sorted({t.src for t in plan.transfers} - set(pos))
        if missing:
            raise ValueError(f"sources {missing} are not in the new mesh {list(new_ids)}")
        number: dict[tuple[int, int], int] = {}
        rounds: dict[tuple[int, int], list] = {}
        for t in plan.transfers:
            sp, dp = pos[t.src], pos[t.dst]
            r = number.get((sp, dp), 0)
            number[(sp, dp)] = r + 1
            rounds.setdefault(((dp - sp) % N, r), []).append((sp, dp, t))
        shifts, lengths, slot, so, do, dl = [], [], [], [], [], []
        for (shift, _), members in sorted(rounds.items()):
            s_slot, s_off, d_off, d_len = [0] * N, [0] * N, [0] * N, [0] * N
            for sp, dp, t in members:
                s_slot[sp] = 0 if t.copy == "primary" else 1
                s_off[sp] = t.src_offset
                d_off[dp], d_len[dp] = t.dst_offset, t.length
            shifts.append(shift)
            lengths.append(max(t.length for _, _, t in members))
            for table, row in ((slot, s_slot), (so, s_off), (do, d_off), (dl, d_len)):
                table.append(tuple(row))
        return cls(N, plan.old.shard_size, plan.new.shard_size, tuple(shifts), tuple(lengths), tuple(slot),
                   tuple(so), tuple(do), tuple(dl))

    def network_elements(self) -> int:
        """Elements per state row sent between devices (padded to each round's buffer)."""
        return sum(L * sum(1 for n in dl if n) for s, L, dl in zip(self.shifts, self.lengths, self.dst_length) if s)


def make_transfer(rounds: TransferRounds, mesh):
    """held_Nx2x3xS -> flat_3xNS': every device of the new mesh gives its copies of old shards
    ([primary, replica], zeros where it holds none) and gets its new shard. Slices, ppermutes and
    selects only: the bits are moved, never recomputed."""
    axis = canonical.layout_axis()
    N, S_new = rounds.num_devices, rounds.new_shard
    pad = max(rounds.lengths, default=0)

    def body(held_1x2x3xS):
        held = jnp.pad(held_1x2x3xS[0], ((0, 0), (0, 0), (0, pad)))
        me = jax.lax.axis_index(axis)
        pos_S = jnp.arange(S_new, dtype=jnp.int32)
        out = jnp.zeros((3, S_new), jnp.float32)
        for r, (shift, L) in enumerate(zip(rounds.shifts, rounds.lengths)):
            slot = jnp.asarray(rounds.slot[r], jnp.int32)[me]
            src = jnp.asarray(rounds.src_offset[r], jnp.int32)[me]
            piece_3xL = jax.lax.dynamic_slice(held, (slot, 0, src), (1, 3, L))[0]
            if shift:
                piece_3xL = jax.lax.ppermute(piece_3xL, axis, [(i, (i + shift) % N) for i in range(N)])
            idx_S = pos_S - jnp.asarray(rounds.dst_offset[r], jnp.int32)[me]
            valid_S = (idx_S >= 0) & (idx_S < jnp.asarray(rounds.dst_length[r], jnp.int32)[me])
            out = jnp.where(valid_S[None], jnp.take(piece_3xL, jnp.clip(idx_S, 0, L - 1), axis=1), out)
        return out

    held_sh = canonical.layout_sharding(mesh, canonical.TABLE_AXES)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(canonical.layout_spec(mesh, canonical.TABLE_AXES),),
                       out_specs=canonical.layout_spec(mesh, canonical.STATE_AXES), check_vma=False)
    return jax.jit(fn, in_shardings=(held_sh,), out_shardings=canonical.state_sharding(mesh))


def make_checksums(mesh):
    """flat_3xNS -> [N, 2] reference checksums of its shards (replicated): what the next step checks
    its input against."""
    axis = canonical.layout_axis()
    fn = jax.shard_map(lambda x: jax.lax.all_gather(canonical.shard_checksum(x)[None], axis, tiled=True),
                       mesh=mesh, in_specs=(canonical.layout_spec(mesh, canonical.STATE_AXES),),
                       out_specs=canonical.layout_spec(mesh, canonical.REPLICATED), check_vma=False)
    return jax.jit(fn, in_shardings=(canonical.state_sharding(mesh),),
                   out_shardings=canonical.layout_sharding(mesh, canonical.REPLICATED))


def make_gather_state(mesh):
    """flat_3xNS -> the same array replicated on every device (each process reads it locally)."""
    axis = canonical.layout_axis()
    fn = jax.shard_map(lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True), mesh=mesh,
                       in_specs=(canonical.layout_spec(mesh, canonical.STATE_AXES),),
                       out_specs=canonical.layout_spec(mesh, canonical.REPLICATED), check_vma=False)
    return jax.jit(fn, in_shardings=(canonical.state_sharding(mesh),),
                   out_shardings=canonical.layout_sharding(mesh, canonical.REPLICATED))


def global_array(value: Any, sharding) -> jax.Array:
    """A host value that every process holds whole, as a global array: each process places its
    own devices' slices (no collective)."""
    x = np.asarray(value)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


# ----------------------------------------------------------------------------- the step program
def step_spec(cfg: LMTrainConfig, n: int, *, replica_shift: int, flat: FlatSpec | None = None) -> canonical.StepSpec:
    """The layout-invariant step in snapshot mode over `n` devices (`flat`: the model's `FlatSpec`,
    when the caller has it)."""
    plan = MicroBatchPlan.balanced(cfg.data.micro_batches, n)
    return canonical.StepSpec(
        model=cfg.model, flat=flat if flat is not None else FlatSpec.from_shapes(decoder.param_shapes(cfg.model)),
        optim=compiled_optim(cfg.optim), num_devices=n, slots=plan.slots, num_micro=cfg.data.micro_batches,
        micro_size=cfg.data.micro_size, seq_len=cfg.data.seq_len, dropout=cfg.dropout, seed=cfg.seed,
        chunk=cfg.elastic.chunk_size, snapshot="device", replica_shift=replica_shift)


def compiled_memory_bytes(exe: Any, shard_size: int) -> int:
    """Bytes per device that the compiled step `exe` holds while it runs: its arguments, outputs
    and temporaries (XLA's memory analysis, less what outputs alias), plus the previous step's
    replica ([3, shard_size] float32), which the snapshot keeps meanwhile."""
    m = exe.memory_analysis()
    if m is None:
        raise TrainConfigError("recovery.device_memory_gib: this backend reports no memory analysis of the step")
    return (int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
            + 3 * shard_size * 4)


def step_memory_bytes(cfg: LMTrainConfig, devices: Sequence[jax.Device], *, replica_shift: int) -> int:
    """Bytes per device of the step of `cfg` over `devices` (compiles it): what a device set must
    offer under `recovery.device_memory_gib`."""
    spec = step_spec(cfg, len(devices), replica_shift=replica_shift)
    mesh = canonical.layout_mesh(list(devices))
    exe = canonical.make_step(spec, mesh).lower(*canonical.abstract_step_args(spec, mesh)).compile()
    return compiled_memory_bytes(exe, FlatLayout(spec.flat.num_params, tuple(range(len(devices)))).shard_size)


class DistributedElasticStep(StepEventLog):
    """The elastic step program of one process of a multi-process job (module docstring).

    devices: the job's devices (default: every device of every process, process-major).
    membership: the live-process check (default: `DistributedMembership` over `devices`).
    log: where recovery summaries go (default: beside the loop's progress bar).
    checkpoints: where this process writes its shards, periodically and when the job must stop
        (without: a fault that memory cannot repair is an `UnrecoverableError`).
    resume: start from the complete checkpoint of this step in `checkpoints` (a restarted job).
    collective_timeout_s: how long a transfer, or a step, may take before this process takes a
        peer for dead inside its collectives and stops the job with a checkpoint (`_guarded`).
    """

    def __init__(self, cfg: LMTrainConfig, *, devices: Sequence[jax.Device] | None = None,
                 membership: DistributedMembership | None = None, log: Callable[[str], None] | None = None,
                 checkpoints: ShardCheckpoints | None = None, resume: int | None = None,
                 collective_timeout_s: float = COLLECTIVE_TIMEOUT_S):
        check_config(cfg)
        if collective_timeout_s <= 0:
            raise TrainConfigError(f"collective_timeout_s={collective_timeout_s}: expected > 0")
        if resume is not None and checkpoints is None:
            raise TrainConfigError("resume needs the checkpoints to resume from")
        super().__init__(log)
        self.cfg = cfg
        self.devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
        if membership is None:
            try:
                membership = DistributedMembership(self.devices)
            except RuntimeError as e:
                raise TrainConfigError(f"the multi-process elastic step: {e}") from None
        self.membership = membership
        self.process = jax.process_index()
        per_process = {d.process_index: 0 for d in self.devices}
        for d in self.devices:
            per_process[d.process_index] += 1
        if len(set(per_process.values())) != 1:
            raise TrainConfigError(f"every process needs the same number of devices, got {per_process}")
        self.devices_per_process = next(iter(per_process.values()))
        self.replica_shift = self.devices_per_process if len(per_process) > 1 else 1
        self.flat_spec = FlatSpec.from_shapes(decoder.param_shapes(cfg.model))
        self.active: list[int] = list(range(len(self.devices)))
        self.recoveries: list[Recovery] = []
        self.joining = False
        """True in a process that (re)started while the job runs, until it has its state."""
        self._programs: dict[tuple, Any] = {}
        self._flat: jax.Array | None = None
        self._replica: jax.Array | None = None
        self._ref: jax.Array | None = None
        self._count = 0
        self._checked: set[int] = set()
        self._started_key_set = False
        self._pending: tuple[Recovery, dict] | None = None
        self._used: list[tuple[int, ...]] = [tuple(self.active)]
        """Every device order a mesh of this job has had (the order names its CPU communicators)."""
        self._stale: set[tuple[int, ...]] = set()
        """Orders whose communicators hold connections to a process that has since restarted."""
        self.checkpoints = checkpoints
        self.resume = resume
        self.memory_limit = (None if cfg.recovery.device_memory_gib is None
                             else int(cfg.recovery.device_memory_gib * 2**30))
        self._next = 0
        """The step the committed state runs next."""
        self._resumed: dict | None = None
        self.collective_timeout_s = collective_timeout_s
        self._fallback: tuple[jax.Array, jax.Array | None] | None = None
        """The last committed state's copies in the layout before a recovery (primaries, replicas),
        kept until the first step on the new layout commits: what a stop then writes."""
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def count(self) -> int:
        return self._count

    @property
    def active_devices(self) -> list[jax.Device]:
        return [self.devices[i] for i in self.active]

    def layout(self, active: Sequence[int] | None = None) -> FlatLayout:
        active = self.active if active is None else active
        return FlatLayout(self.flat_spec.num_params, tuple(self.devices[i].id for i in active), self.replica_shift)

    # ------------------------------------------------------------------ programs
    def _mesh(self, active: Sequence[int]):
        return canonical.layout_mesh([self.devices[i] for i in active])

    def _compiled(self, name: str, key: Any, active: Sequence[int], build: Callable[[Any], tuple]) -> Any:
        full = (name, key, tuple(active))
        if full not in self._programs:
            fn, args = build(self._mesh(active))
            self._programs[full] = fn.lower(*args).compile()
        return self._programs[full]

    def _spec(self, n: int) -> canonical.StepSpec:
        return step_spec(self.cfg, n, replica_shift=self.replica_shift, flat=self.flat_spec)

    def memory_bytes(self, active: Sequence[int]) -> int:
        """Bytes per device of the step over the devices `active` (`compiled_memory_bytes`)."""
        return compiled_memory_bytes(self._step_exe(active), self.layout(active).shard_size)

    def _step_exe(self, active: Sequence[int]):
        spec = self._spec(len(active))
        return self._compiled("step", spec, active, lambda mesh: (
            canonical.make_step(spec, mesh), canonical.abstract_step_args(spec, mesh)))

    def _state_struct(self, mesh, n: int) -> jax.ShapeDtypeStruct:
        S = self.layout(range(n)).shard_size
        return jax.ShapeDtypeStruct((3, n * S), jnp.float32, sharding=canonical.state_sharding(mesh))

    def _checksums(self, flat: jax.Array, active: Sequence[int] | None = None) -> jax.Array:
        active = self.active if active is None else active
        n = len(active)
        exe = self._compiled("checksums", n, active, lambda mesh: (
            make_checksums(mesh), (self._state_struct(mesh, n),)))
        return exe(flat)

    def _transfer(self, plan: TransferPlan, new_active: Sequence[int], held: jax.Array) -> jax.Array:
        rounds = TransferRounds.from_plan(plan)
        S_old = plan.old.shard_size
        n = len(new_active)
        exe = self._compiled("transfer", rounds, new_active, lambda mesh: (make_transfer(rounds, mesh), (
            jax.ShapeDtypeStruct((n, 2, 3, S_old), jnp.float32,
                                 sharding=canonical.layout_sharding(mesh, canonical.TABLE_AXES)),)))
        return exe(held)

    # ------------------------------------------------------------------ state (StepProgram)
    def build(self) -> None:
        """Whether this process joins a running job (the coordination service has its `started`
        key) or starts one with its peers."""
        try:
            self.joining = self.membership.client.key_value_try_get(STARTED_KEY) is not None
        except jax.errors.JaxRuntimeError:  # no such key: the job has not started
            self.joining = False

    def init_state(self) -> None:
        """Fresh state from the seed (every process computes the same host tree and places its
        own shards); a joining process gets its state from its peers instead."""
        if self.joining:
            return
        host = np.zeros((3, self.layout().padded_size), np.float32)
        P = self.flat_spec.num_params
        if self.resume is None:
            host[0, :P] = self.flat_spec.flatten_np(init_params_f32(self.cfg))
            self._count = 0
        else:
            t0 = time.perf_counter()
            state_3xP, self._count = self.checkpoints.load(self.resume)
            if state_3xP.shape != (3, P):
                raise TrainConfigError(f"the checkpoint of step {self.resume} in {self.checkpoints.directory} holds "
                                       f"{state_3xP.shape[1]} parameters, the model has {P}")
            host[:, :P] = state_3xP
            self._resumed = {"event": "resume", "checkpoint_step": self.resume,
                             "checkpoint": str(self.checkpoints.path(self.resume)),
                             "load_s": time.perf_counter() - t0}
            self._log(f"resumes from the checkpoint of step {self.resume} ({self._count} updates)")
        self._next = 0 if self.resume is None else self.resume
        self._flat = global_array(host, canonical.state_sharding(self._mesh(self.active)))
        self._ref = self._checksums(self._flat)

    def compile(self) -> Any:
        """The step over every device; with `recovery.device_memory_gib`, an error if even that
        does not fit."""
        exe = self._step_exe(self.active)
        if self.memory_limit is not None:
            need = self.memory_bytes(self.active)
            if need > self.memory_limit:
                raise TrainConfigError(f"recovery.device_memory_gib={self.cfg.recovery.device_memory_gib}: the step "
                                       f"over all {len(self.active)} devices needs {need / 2**30:.6f} GiB per device")
        return exe

    def flat_state(self) -> np.ndarray:
        """[3, P] host copy of (params, mu, nu) (a collective: every process in service calls it)."""
        n = len(self.active)
        exe = self._compiled("gather_state", n, self.active, lambda mesh: (
            make_gather_state(mesh), (self._state_struct(mesh, n),)))
        full = exe(self._flat)
        return np.asarray(full.addressable_data(0))[:, :self.flat_spec.num_params]

    def params(self) -> Any:
        return self.flat_spec.unflatten_np(self.flat_state()[0])

    # ------------------------------------------------------------------ the step (StepProgram)
    def start(self, step: int, *, log: Callable[[str], None], checkpoints) -> None:
        self._loop_log = log

    def advance(self, step: int, tokens_BxT1: np.ndarray, lr: np.float32) -> Advance:
        if self.joining:
            return Advance(self._join_running_job(), None)
        if step < self._next:  # a job resumed from a checkpoint
            return Advance(self._next, None)
        if step not in self._checked:
            self._checked.add(step)
            try:
                events = self.membership.check(step)
            except jax.errors.JaxRuntimeError as e:  # jax.distributed is about to end this process too
                raise UnrecoverableError(f"step {step}: the coordination service (process 0) does not answer "
                                         f"({str(e).splitlines()[0]}); the job restarts from its last complete "
                                         f"checkpoint") from None
            fails = [e for e in events if e.kind == "fail"]
            joins = [e for e in events if e.kind == "join"]
            if fails:
                self._shrink(fails, step)
            if joins:
                self._grow(joins, step)
        exe = self._step_exe(self.active)
        mesh = self._mesh(self.active)
        host = step_inputs(self.cfg, step, tokens_BxT1, MicroBatchPlan.balanced(self.cfg.data.micro_batches,
                                                                                len(self.active)),
                           count=self._count, lr=lr)
        shardings = canonical.step_input_shardings(mesh, snapshot=True)
        inputs = canonical.StepInputs(*(None if v is None else global_array(v, sh)
                                        for v, sh in zip(host, shardings)))._replace(ref_Nx2=self._ref)
        if self._fallback is not None and self._pending is not None and self._pending[1]["event"] == "fail":
            self.on_recovery("step", step, self._pending[1]["processes"])
        started = time.perf_counter()

        def run():
            out = exe(self._flat, inputs)
            return out, jax.device_get(out.metrics)

        out, metrics = self._guarded(step, f"step {step}", self.active, run)
        if not np.all(metrics["input_ok"]):
            bad = [self.active[i] for i in np.flatnonzero(~metrics["input_ok"])]
            raise RuntimeError(f"step {step}: the state shards on devices {bad} do not match their checksums")
        return Advance(step + 1, self._commit(step, out, metrics, float(lr), started))

    def _commit(self, step: int, out: canonical.StepOutputs, metrics: dict, lr: float,
                started: float) -> CommittedStep:
        step_time = time.perf_counter() - started
        self._flat, self._replica, self._ref = out.flat_3xNS, out.replica_3xNS, out.ref_Nx2
        self._count += 1
        self._next = step + 1
        self._fallback = None
        if self.checkpoints is not None and self.checkpoints.due(self._next):
            shards, layout = self._held_shards(replicas=False)
            self.checkpoints.write(self._next, self._count, layout, shards)
        if self._resumed is not None:
            self._resumed.update(step=step, first_step_s=step_time, first_step_done_unix=time.time())
            self._step_events.append(self._resumed)
            self.events.append(self._resumed)
            self._resumed = None
        if self._pending is not None:
            rec, event = self._pending
            rec.first_step_s = step_time
            event["recovery"] = rec.to_json()
            event["first_step_done_unix"] = time.time()
            self._log(rec.summary())
            self._pending = None
        if not self._started_key_set:
            self.membership.client.key_value_set(STARTED_KEY, "1", allow_overwrite=True)
            self._started_key_set = True
        events, self._step_events = self._step_events, []
        return CommittedStep(step, metrics, lr, len(self.active), started, step_time, events)

    # ------------------------------------------------------------------ membership changes
    def _order(self, members: Sequence[int]) -> list[int]:
        """The mesh order of the device set `members` (indices, in the preferred order): the
        preferred one unless it is stale, else the first fresh reordering of whole processes.

        XLA's CPU collectives name a communicator by its devices in mesh order and keep it for
        the life of the process; the one of an order that included a since-restarted process
        still points at the dead incarnation's sockets, and the restarted process cannot enter it
        again (its rendezvous keys exist). A new order is a new communicator. Processes move as
        blocks so that the replica of a shard stays `replica_shift` devices on, in another
        process. The math does not depend on the order (the canonical step)."""
        members = list(members)
        if tuple(members) not in self._stale:
            return members
        blocks: dict[int, list[int]] = {}
        for i in members:
            blocks.setdefault(self.devices[i].process_index, []).append(i)
        for perm in itertools.permutations(blocks.values()):
            for r in range(self.devices_per_process):
                order = [b[(j + r) % len(b)] for b in perm for j in range(len(b))]
                if tuple(order) not in self._stale:
                    return order
        raise RuntimeError(f"no fresh device order is left for devices {sorted(members)}")

    def _use(self, order: Sequence[int]) -> None:
        if tuple(order) not in self._used:
            self._used.append(tuple(order))

    def _restarted(self, processes: Sequence[int]) -> None:
        """`processes` came back: every order that included them is stale."""
        procs = set(processes)
        self._stale |= {o for o in self._used if any(self.devices[i].process_index in procs for i in o)}

    def _meet(self, order: Sequence[int]) -> list[int]:
        """A barrier among the live processes of `order` before the first collective over it (each
        compiled the new programs at its own pace, and a process that enters the communicator's
        rendezvous long before a peer times out in it); returns those of its processes that died
        meanwhile (`DistributedMembership.meet`). Until then nobody has moved a byte: the copies
        every survivor holds are those of the last committed step."""
        return self.membership.meet(sorted({self.devices[i].process_index for i in order}))

    def _held(self, new_active: Sequence[int], old: FlatLayout, *, replicas: bool) -> jax.Array:
        """[N', 2, 3, S_old] over the new mesh: each local device's primary and replica of the old
        layout's shards (zeros where it holds none, e.g. a device that is joining)."""
        S = old.shard_size
        prim = {s.device.id: s.data for s in self._flat.addressable_shards} if self._flat is not None else {}
        rep = ({s.device.id: s.data for s in self._replica.addressable_shards}
               if replicas and self._replica is not None else {})
        local = []
        mesh = self._mesh(new_active)
        sharding = canonical.layout_sharding(mesh, canonical.TABLE_AXES)
        for dev in sharding.addressable_devices_indices_map((len(new_active), 2, 3, S)):
            zero = jnp.zeros((3, S), jnp.float32, device=dev)
            local.append(jnp.stack([prim.get(dev.id, zero), rep.get(dev.id, zero)])[None])
        return jax.make_array_from_single_device_arrays((len(new_active), 2, 3, S), sharding, local)

    def on_recovery(self, point: str, step: int, lost: Sequence[int]) -> None:
        """Called at three points of a recovery at boundary `step` from the loss of processes
        `lost`: "start", as this process begins (or begins again) to plan, before anything is
        compiled or moved; "transfer", once the survivors have met, before the transfer's
        collectives; "step", before the first step on the new layout. Nothing here; the launcher's
        fault schedule overrides it to end a process at such a point (`--kill P@recovery:S`,
        `P@transfer:S`, `P@step:S`)."""

    def _shrink(self, fails: list[MembershipEvent], step: int) -> None:
        """The devices of `fails` are gone (their process died after step-1 committed): rebuild the
        state on the survivors from the primaries and replicas they hold. A survivor that dies
        before the survivors meet (while they plan and compile) is found at the meeting: the
        others plan again from the same copies, without it."""
        lost = sorted({e.device for e in fails})
        before = list(self.active)
        old = self.layout()
        t1 = time.perf_counter()
        while True:
            processes = sorted({self.devices[i].process_index for i in lost})
            self.on_recovery("start", step, processes)
            survivors = [i for i in before if i not in lost]
            if not survivors:
                raise RuntimeError(f"step {step}: every device is lost")
            survivors = self._order(survivors)
            together = sorted({self.devices[i].process_index for i in survivors})
            try:
                plan = plan_transfers(old, [self.devices[i].id for i in survivors],
                                      [self.devices[i].id for i in lost if i in before])
            except UnrecoverableError as e:
                raise self.checkpoint_and_stop(f"step {step}: process(es) {processes} lost and {e}",
                                               together=together) from None
            check_plan(plan)
            t2 = time.perf_counter()
            if self.memory_limit is not None:
                need = self.memory_bytes(survivors)
                if need > self.memory_limit:
                    raise self.checkpoint_and_stop(
                        f"step {step}: process(es) {processes} lost and no layout of the {len(survivors)} surviving "
                        f"devices fits: the step needs {need / 2**30:.6f} GiB per device, recovery.device_memory_gib="
                        f"{self.cfg.recovery.device_memory_gib}", together=together)
            self._warm(survivors, plan)
            gone = self._meet(survivors)
            if not gone:
                break
            lost = sorted(set(lost) | {i for i in survivors if self.devices[i].process_index in gone})
            self._log(f"step {step}: process(es) {gone} lost during the recovery from the loss of {processes}; "
                      f"planning again from the same copies")
        t3 = time.perf_counter()
        self.on_recovery("transfer", step, processes)
        self._move(step, plan, survivors, old, replicas=True)
        t4 = time.perf_counter()
        self._log(f"step {step}: process(es) {processes} lost (devices {lost}) -> {len(survivors)} devices")
        self._start(Recovery("fail", step, before, list(survivors), detection_s=self.membership.last_check_s,
                             replanning_s=t2 - t1, compile_s=t3 - t2, compile_how="compiled",
                             transfer_s=t4 - t3, elements_moved=plan.network_elements()),
                    {"event": "fail", "devices": lost, "processes": processes, "strategy": "reroute+reshard"})

    def _grow(self, joins: list[MembershipEvent], step: int) -> None:
        """Processes joined at boundary `step`: tell them where the job is, then move their
        shares of the state to them."""
        joined = sorted({e.device for e in joins} - set(self.active))
        if not joined:
            return
        procs = sorted({self.devices[i].process_index for i in joined})
        self._restarted(procs)
        new_active = self._order(sorted(set(self.active) | set(joined)))
        writer = min(self.devices[i].process_index for i in self.active)
        if self.process == writer:
            msg = json.dumps({"step": step, "count": self._count, "active": self.active, "new_active": new_active,
                              "used": self._used, "stale": sorted(self._stale)})
            for p in procs:
                self.membership.client.key_value_set(WELCOME_KEY.format(process=p), msg, allow_overwrite=True)
        self._receive(step, new_active, procs)

    def _join_running_job(self) -> int:
        """This process (re)started while the job runs: meet the peers at their next boundary, learn
        the step, count and devices in service, receive the state; returns the step to run."""
        t0 = time.perf_counter()
        self.membership.check(-1)
        key = WELCOME_KEY.format(process=self.process)
        msg = json.loads(self.membership.client.blocking_key_value_get(key, WELCOME_TIMEOUT_MS))
        self.membership.client.key_value_delete(key)
        step = int(msg["step"])
        self.active, self._count, self._next = list(msg["active"]), int(msg["count"]), step
        self._used = [tuple(o) for o in msg["used"]]
        self._stale = {tuple(o) for o in msg["stale"]}
        self._checked.add(step)
        self.joining = False
        self._log(f"process {self.process} joins the job at step {step} (waited {time.perf_counter() - t0:.2f} s)")
        self._receive(step, list(msg["new_active"]), [self.process])
        self.membership.adopt(self.active)
        return step

    def _receive(self, step: int, new_active: list[int], procs: list[int]) -> None:
        """The transfer that gives the devices of `new_active` not yet in service their shares."""
        before = list(self.active)
        t1 = time.perf_counter()
        old = self.layout()
        plan = plan_transfers(old, [self.devices[i].id for i in new_active], use_replicas=False)
        check_plan(plan)
        t2 = time.perf_counter()
        self._warm(new_active, plan)
        gone = self._meet(new_active)
        if gone:
            alive = sorted({self.devices[i].process_index for i in new_active} - set(gone))
            raise self.checkpoint_and_stop(f"step {step}: process(es) {gone} lost while process(es) {procs} joined",
                                           together=alive)
        t3 = time.perf_counter()
        self._move(step, plan, new_active, old, replicas=False)
        t4 = time.perf_counter()
        joined = sorted(set(new_active) - set(before))
        self._log(f"step {step}: process(es) {procs} joined (devices {joined}) -> {len(new_active)} devices")
        self._start(Recovery("join", step, before, list(new_active), detection_s=self.membership.last_check_s,
                             replanning_s=t2 - t1, compile_s=t3 - t2, compile_how="compiled",
                             transfer_s=t4 - t3, elements_moved=plan.network_elements()),
                    {"event": "join", "devices": joined, "processes": procs})

    def _move(self, step: int, plan: TransferPlan, new_active: list[int], old: FlatLayout, *, replicas: bool) -> None:
        """Run the transfer of `plan` and the new layout's checksums (under the guard), then put the
        new layout in service. The old layout's copies stay as the fallback until the next commit."""
        def run():
            flat = self._transfer(plan, new_active, self._held(new_active, old, replicas=replicas))
            ref = self._checksums(flat, new_active)
            ref.block_until_ready()
            return flat, ref

        if self._fallback is None:  # a join after a loss at the same boundary: keep the older, replicated copies
            self._fallback = (self._flat, self._replica)
        flat, self._ref = self._guarded(step, f"the transfer to {len(new_active)} devices", new_active, run)
        self.active = new_active
        self._flat, self._replica = flat, None
        self._use(new_active)

    def _warm(self, active: Sequence[int], plan: TransferPlan) -> None:
        """Compile what the new device set runs (the transfer, checksums and the step)."""
        rounds = TransferRounds.from_plan(plan)
        n, S_old = len(active), plan.old.shard_size
        self._compiled("transfer", rounds, active, lambda mesh: (make_transfer(rounds, mesh), (
            jax.ShapeDtypeStruct((n, 2, 3, S_old), jnp.float32,
                                 sharding=canonical.layout_sharding(mesh, canonical.TABLE_AXES)),)))
        self._compiled("checksums", n, active, lambda mesh: (make_checksums(mesh), (self._state_struct(mesh, n),)))
        self._step_exe(active)

    # ------------------------------------------------------------------ faults memory cannot repair
    def _guarded(self, step: int, what: str, order: Sequence[int], run: Callable[[], Any]) -> Any:
        """`run()`: programs with collectives over the devices `order`, waited for; or, when a peer
        dies inside them, a stop with a checkpoint (`RestartFromCheckpoint`).

        A process that dies closes its sockets: the peers that exchange data with it get an error
        at once, and a peer that waits on one of those (alive, but out of the collective) waits for
        as long as it lives, since XLA's CPU collectives have no abort. On such an error, or when
        `run` has not returned after `collective_timeout_s` (a watchdog thread, as the waiting
        thread cannot be interrupted; it then ends the process itself with `RESTART_EXIT_CODE`),
        this process writes the copies it holds of the last committed state and meets the live
        processes of `order` (`checkpoint_and_stop`)."""
        together = sorted({self.devices[i].process_index for i in order})
        timer = threading.Timer(self.collective_timeout_s, self._stuck, (step, what, together))
        timer.daemon = True
        timer.start()
        try:
            return run()
        except (jax.errors.JaxRuntimeError, ValueError) as e:  # jax 0.10 raises Gloo's errors as ValueError
            if not isinstance(e, jax.errors.JaxRuntimeError) and "Gloo" not in str(e):
                raise
            timer.cancel()
            err = self._stop(f"step {step}: {what} failed ({str(e).splitlines()[0]}): a peer died inside its "
                             f"collectives", together)
            if err is None:  # the watchdog is stopping the job; it ends the process
                threading.Event().wait()
            raise err from None
        finally:
            timer.cancel()

    def _stuck(self, step: int, what: str, together: list[int]) -> None:
        """The watchdog of `_guarded`: `what` never returned."""
        try:
            err = self._stop(f"step {step}: {what} did not finish in {self.collective_timeout_s:g} s: a peer died "
                             f"inside its collectives", together)
        except Exception as e:  # nowhere to write the state: end with the error rather than hang
            self._log(f"{type(e).__name__}: {e}")
            os._exit(1)
        if err is not None:
            self._log(str(err))
            os._exit(RESTART_EXIT_CODE)

    def _stop(self, why: str, together: list[int]) -> RestartFromCheckpoint | None:
        """`checkpoint_and_stop` once, whether the watchdog or the failed call gets here first
        (None to the second: the first ends the process)."""
        with self._stop_lock:
            if self._stopped:
                return None
            self._stopped = True
            return self.checkpoint_and_stop(why, together=together)

    def checkpoint_and_stop(self, why: str, *, together: Sequence[int] = ()) -> RestartFromCheckpoint:
        """Write the copies this process holds of the committed state (its primaries and the
        replicas of its neighbour's shards) as the checkpoint of the next step, and return the
        error that stops the job (`RestartFromCheckpoint`). The write needs no collective.
        `together`: the processes that stop at this point with this one; they meet at a barrier
        after writing, so that process 0 (whose exit takes the coordination service, and with it
        every peer, down) leaves last. Without `checkpoints`: an `UnrecoverableError`."""
        if self.checkpoints is None:
            raise UnrecoverableError(f"{why}; the job cannot go on in memory and has nowhere to write its state "
                                     f"(DistributedElasticStep(checkpoints=...))")
        step = self._next
        shards, layout = self._held_shards(replicas=True)
        if shards:
            self.checkpoints.write(step, self._count, layout, shards)
        wrote = (f"wrote its {len(shards)} of {layout.n} shards of the state before step {step} to "
                 f"{self.checkpoints.path(step)}" if shards else "holds no shard")
        if together:
            try:
                self.membership.meet(sorted(together))  # a peer that died meanwhile is not waited for
            except jax.errors.JaxRuntimeError as e:
                self._log(f"stopping without the barrier: {str(e).splitlines()[0]}")
        return RestartFromCheckpoint(
            f"{why}; process {self.process} {wrote}; restart the job from the latest complete checkpoint in "
            f"{self.checkpoints.directory} (it resumes bitwise)", step)

    def _held_shards(self, *, replicas: bool) -> tuple[dict[int, np.ndarray], FlatLayout | None]:
        """({shard k: [3, S] host copy}, their layout) of the committed state on this process's
        devices: primaries, and with `replicas` the replicas (mesh position j holds the replica of
        shard j - shift); shard numbers and the layout come from the arrays' own shardings."""
        flat, replica = self._fallback if self._fallback is not None else (self._flat, self._replica)
        if flat is None:
            return {}, None
        layout = FlatLayout(self.flat_spec.num_params, tuple(d.id for d in flat.sharding.mesh.devices.flat),
                            self.replica_shift)
        out: dict[int, np.ndarray] = {}
        for arr, is_replica in ((flat, False), (replica, True)):
            if arr is None or (is_replica and not replicas):
                continue
            n = len(arr.sharding.device_set)
            S = arr.shape[1] // n
            for shard in arr.addressable_shards:
                j = (shard.index[1].start or 0) // S
                k = (j - self.replica_shift) % n if is_replica else j
                out.setdefault(k, np.asarray(shard.data))
        return out, layout

    def _start(self, rec: Recovery, event: dict) -> None:
        self.recoveries.append(rec)
        event = {"step": rec.step, **event}
        self.events.append(event)
        self._step_events.append(event)
        self._pending = (rec, event)


def check_config(cfg: LMTrainConfig) -> None:
    """What the multi-process program runs: the elastic consistent policy with snapshots, no
    schedule (failures are real), no memory plan, no Orbax checkpoints (it writes its own,
    `ShardCheckpoints`). The launcher calls it before any process starts."""
    e = cfg.elastic
    if e.policy != "consistent":
        raise TrainConfigError("the multi-process elastic step keeps the math (elastic.policy=consistent)")
    if e.fail or e.join:
        raise TrainConfigError("elastic.fail/elastic.join schedule one process's devices; across processes the "
                               "failures are real (kill a process; the launcher's --kill/--restart do)")
    if cfg.memory.policy != "keep" or cfg.memory.budget is not None:
        raise TrainConfigError("the multi-process elastic step runs without a memory plan (memory.policy=keep)")
    if cfg.checkpoint.dir is not None:
        raise TrainConfigError("the multi-process elastic step writes its own shard checkpoints, not Orbax's: unset "
                               "checkpoint.dir (the launcher's --checkpoint-dir and --checkpoint-every)")
