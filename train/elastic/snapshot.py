"""Per-step in-memory snapshots with interleaved replication, checksums, verification and repair.

At every step boundary the elastic trainer keeps:

* the primary: the pre-step state itself. The elastic step does not donate its input, so the state
  it starts from stays valid while it runs; that costs the same memory as donating and copying,
  and saves the copy;
* the replica: shard k is also copied to device k+1 mod N (one `ppermute`), in that device's
  `pinned_host` memory when the backend has it (`replica_memory`), so any single device loss, and
  any loss of devices that are not ring neighbours, leaves a copy of every shard;
* reference checksums of every primary shard ([N, 2] uint32, replicated).

In steady state the step program itself emits the next snapshot and checks the primary it reads
against the reference checksums (`canonical.make_step`), so snapshots cost no extra program
launch; `take_snapshot` makes one from a state that did not come out of a step (start, after a
recovery). `verify` recomputes the checksums of all held copies (every `verify_every` steps, and
always on the survivors before a recovery, so a corrupted copy is never restored); a mismatch is
repaired by copying the other copy over the bad one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from jaxsys.train.elastic.canonical import (REPLICATED, STATE_AXES, as_bits, layout_axis, layout_mesh,
                                            layout_sharding, layout_spec, shard_checksum, state_sharding)
from jaxsys.train.elastic.compile import ExecutableCache
from jaxsys.train.elastic.layout import FlatLayout


def has_memory_kind(device: jax.Device, kind: str) -> bool:
    try:
        return any(m.kind == kind for m in device.addressable_memories())
    except Exception:
        return False


def resolve_replica_memory(setting: str, devices: Sequence[jax.Device]) -> str:
    """`auto` -> pinned_host on accelerators that have it (the replica then leaves scarce device
    memory and survives a device, not host, failure), else device memory. On the CPU backend
    device memory already is host memory, so `auto` keeps replicas there (pinned_host would only
    add a copy); `pinned_host` forces it."""
    if setting == "device":
        return "device"
    ok = all(has_memory_kind(d, "pinned_host") for d in devices)
    if setting == "pinned_host":
        if not ok:
            raise ValueError("replica_memory=pinned_host: this backend has no pinned_host memory")
        return "pinned_host"
    return "pinned_host" if ok and devices[0].platform != "cpu" else "device"


def _to_device_memory(x: jax.Array, sharding) -> jax.Array:
    return jax.device_put(x, sharding.with_memory_kind("device"))


# ----------------------------------------------------------------------------- programs
def build_snapshot_program(n: int, shard: int, memory: str):
    """flat [3, n*S] -> (replica [3, n*S] (shard k on device k+1), ref checksums [n, 2])."""

    def builder(devices):
        mesh = layout_mesh(devices)
        s_state = state_sharding(mesh)
        s_rep = s_state.with_memory_kind(memory) if memory != "device" else s_state
        axis = layout_axis()

        def body(x_3xS):
            rep = jax.lax.ppermute(x_3xS, axis, [(i, (i + 1) % n) for i in range(n)]) if n > 1 else x_3xS
            ck = shard_checksum(x_3xS)[None, :]
            return rep, jax.lax.all_gather(ck, axis, tiled=True)

        fn = jax.shard_map(body, mesh=mesh, in_specs=layout_spec(mesh, STATE_AXES),
                           out_specs=(layout_spec(mesh, STATE_AXES), layout_spec(mesh, REPLICATED)),
                           check_vma=False)
        jitted = jax.jit(fn, in_shardings=(s_state,),
                         out_shardings=(s_rep, layout_sharding(mesh, REPLICATED)))
        return jitted, (jax.ShapeDtypeStruct((3, n * shard), jnp.float32, sharding=s_state),)

    return ("snapshot", (n, shard, memory)), builder


def build_verify_program(n: int, shard: int, memory: str):
    """bufs [3, n*S] (one buffer per holder, in `memory`), expect [n, 2] -> ok [n] (replicated)."""

    def builder(devices):
        mesh = layout_mesh(devices)
        s_state = state_sharding(mesh)
        s_in = s_state.with_memory_kind(memory) if memory != "device" else s_state
        s_rep = layout_sharding(mesh, REPLICATED)
        axis = layout_axis()

        def body(x_3xS, expect_nx2):
            ck = shard_checksum(x_3xS)
            ok = jnp.all(ck == expect_nx2[jax.lax.axis_index(axis)])[None]
            return jax.lax.all_gather(ok, axis, tiled=True)

        fn = jax.shard_map(body, mesh=mesh, in_specs=(layout_spec(mesh, STATE_AXES), layout_spec(mesh, REPLICATED)),
                           out_specs=layout_spec(mesh, REPLICATED), check_vma=False)

        def run(x, expect):
            if memory != "device":
                x = _to_device_memory(x, s_state)
            return fn(x, expect)

        jitted = jax.jit(run, in_shardings=(s_in, s_rep), out_shardings=s_rep)
        return jitted, (jax.ShapeDtypeStruct((3, n * shard), jnp.float32, sharding=s_in),
                        jax.ShapeDtypeStruct((n, 2), jnp.uint32, sharding=s_rep))

    return ("verify", (n, shard, memory)), builder


def build_flip_program(shard: int, memory: str):
    """Fault injection: buf [3, S] with one bit of one element flipped (row, index, bit dynamic)."""

    def builder(devices):
        (dev,) = devices
        s = SingleDeviceSharding(dev, memory_kind=None if memory == "device" else memory)
        s_dev = SingleDeviceSharding(dev)

        def flip(buf, row, index, bit):
            if memory != "device":
                buf = jax.device_put(buf, s_dev)
            bits = as_bits(buf)
            mask = jnp.left_shift(jnp.uint32(1), bit.astype(jnp.uint32))
            bits = bits.at[row, index].set(bits[row, index] ^ mask)
            return jax.lax.bitcast_convert_type(bits, jnp.float32)

        i32 = jax.ShapeDtypeStruct((), jnp.int32, sharding=s_dev)
        return (jax.jit(flip, in_shardings=(s, s_dev, s_dev, s_dev), out_shardings=s),
                (jax.ShapeDtypeStruct((3, shard), jnp.float32, sharding=s), i32, i32, i32))

    return ("bitflip", (shard, memory)), builder


# ----------------------------------------------------------------------------- helpers
def per_device(arr: jax.Array) -> dict[int, jax.Array]:
    """Device id -> that device's shard (a single-device array sharing the buffer)."""
    return {s.device.id: s.data for s in arr.addressable_shards}


def assemble(bufs: Sequence[jax.Array], devices: Sequence[jax.Device], memory: str = "device") -> jax.Array:
    """A [3, n*S] state-sharded global array from one [3, S] buffer per device (no copy)."""
    mesh = layout_mesh(devices)
    s = state_sharding(mesh)
    if memory != "device":
        s = s.with_memory_kind(memory)
    S = bufs[0].shape[1]
    return jax.make_array_from_single_device_arrays((3, len(devices) * S), s, list(bufs))


@dataclasses.dataclass
class Snapshot:
    """The state at the start of `step` on `layout`, a replica of every shard, and checksums."""

    step: int
    count: int
    layout: FlatLayout
    devices: tuple[jax.Device, ...]
    primary: jax.Array
    replica: jax.Array
    ref: jax.Array
    memory: str
    _ref_host: np.ndarray | None = None
    pieces: tuple[dict[int, jax.Array], dict[int, jax.Array]] | None = None
    """Per-device (primary, replica) buffers by device id, once repaired after a loss."""

    def ref_host(self) -> np.ndarray:
        if self._ref_host is None:
            self._ref_host = np.asarray(self.ref)
        return self._ref_host

    @property
    def n(self) -> int:
        return self.layout.n

    def by_device(self) -> tuple[dict[int, jax.Array], dict[int, jax.Array]]:
        """(primary, replica) buffers by holder device id."""
        if self.pieces is not None:
            return self.pieces
        return per_device(self.primary), per_device(self.replica)

    def shard_buffers(self, lost: Sequence[int] = ()) -> tuple[dict[int, jax.Array], dict[int, jax.Array]]:
        """(primary, replica) buffers by old shard index, leaving out copies held by `lost`."""
        pb, rb = self.by_device()
        lay, lost_set = self.layout, set(lost)
        prim = {k: pb[lay.primary_holder(k)] for k in range(self.n) if lay.primary_holder(k) not in lost_set}
        rep = {k: rb[lay.replica_holder(k)] for k in range(self.n) if lay.replica_holder(k) not in lost_set}
        return prim, rep


def take_snapshot(cache: ExecutableCache, step: int, count: int, layout: FlatLayout,
                  devices: Sequence[jax.Device], flat: jax.Array, memory: str) -> Snapshot:
    key, builder = build_snapshot_program(layout.n, layout.shard_size, memory)
    exe = cache.get(key[0], key[1], devices, builder)
    replica, ref = exe(flat)
    return Snapshot(step, count, layout, tuple(devices), flat, replica, ref, memory)


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    bad_primary: tuple[int, ...]
    """Old shard indices whose held primary does not match its reference checksum."""
    bad_replica: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return not self.bad_primary and not self.bad_replica


def verify(cache: ExecutableCache, snap: Snapshot, lost: Sequence[int] = ()) -> VerifyResult:
    """Check every held copy (on devices not in `lost`) against the reference checksums."""
    lost_set = set(lost)
    ref = snap.ref_host()
    layout = snap.layout
    alive_idx = [i for i, d in enumerate(layout.device_ids) if d not in lost_set]
    devices = [snap.devices[i] for i in alive_idx]
    n, S = len(alive_idx), layout.shard_size
    key, builder = build_verify_program(n, S, "device")
    exe_p = cache.get(key[0], key[1], devices, builder)
    rkey, rbuilder = build_verify_program(n, S, snap.memory)
    exe_r = cache.get(rkey[0], rkey[1], devices, rbuilder)
    if not lost_set and snap.pieces is None:
        prim, rep = snap.primary, snap.replica
    else:
        pb, rb = snap.by_device()
        prim = assemble([pb[layout.device_ids[i]] for i in alive_idx], devices)
        rep = assemble([rb[layout.device_ids[i]] for i in alive_idx], devices, snap.memory)
    exp_p = ref[alive_idx]
    exp_r = ref[[(i - 1) % layout.n for i in alive_idx]]  # device i holds the replica of shard i-1
    ok_p = np.asarray(exe_p(prim, exp_p))
    ok_r = np.asarray(exe_r(rep, exp_r))
    bad_p = tuple(alive_idx[j] for j in range(n) if not ok_p[j])
    bad_r = tuple((alive_idx[j] - 1) % layout.n for j in range(n) if not ok_r[j])
    return VerifyResult(bad_p, bad_r)


def repair(snap: Snapshot, result: VerifyResult, lost: Sequence[int] = ()) -> list[str]:
    """Replace each bad copy by the other copy of the same shard; returns what was done."""
    from jaxsys.train.elastic.planner import UnrecoverableError

    lost_set = set(lost)
    layout = snap.layout
    dev_by_id = {d.id: d for d in snap.devices}
    pb, rb = (dict(x) for x in snap.by_device())
    notes = []
    for k in result.bad_primary:
        holder = layout.replica_holder(k)
        if k in result.bad_replica or holder in lost_set:
            raise UnrecoverableError(f"shard {k}: the primary is corrupted and the replica is unusable")
        src = rb[holder]
        pb[layout.primary_holder(k)] = jax.device_put(src, SingleDeviceSharding(dev_by_id[layout.primary_holder(k)]))
        notes.append(f"primary of shard {k} on device {layout.primary_holder(k)} repaired from the "
                     f"replica on device {holder}")
    for k in result.bad_replica:
        owner = layout.primary_holder(k)
        if k in result.bad_primary or owner in lost_set:
            raise UnrecoverableError(f"shard {k}: the replica is corrupted and the primary is unusable")
        holder = layout.replica_holder(k)
        mk = None if snap.memory == "device" else snap.memory
        rb[holder] = jax.device_put(pb[owner], SingleDeviceSharding(dev_by_id[holder], memory_kind=mk))
        notes.append(f"replica of shard {k} on device {holder} repaired from the primary on device {owner}")
    if notes:
        if not lost_set:
            ids = layout.device_ids
            snap.primary = assemble([pb[i] for i in ids], snap.devices)
            snap.replica = assemble([rb[i] for i in ids], snap.devices, snap.memory)
        else:  # the device set has holes: keep the per-device buffers for the recovery
            snap.pieces = (pb, rb)
    return notes


def inject_bit_flip(cache: ExecutableCache, snap: Snapshot, *, copy: str, shard: int, row: int = 0,
                    index: int = 0, bit: int = 0) -> None:
    """Fault injection for tests and demos: flip one bit of one held copy of `shard`."""
    layout = snap.layout
    holder = layout.primary_holder(shard) if copy == "primary" else layout.replica_holder(shard)
    arr = snap.primary if copy == "primary" else snap.replica
    memory = "device" if copy == "primary" else snap.memory
    dev = next(d for d in snap.devices if d.id == holder)
    key, builder = build_flip_program(layout.shard_size, memory)
    exe = cache.get(key[0], key[1], [dev], builder)
    bufs = per_device(arr)
    bufs[holder] = exe(bufs[holder], np.int32(row), np.int32(index), np.int32(bit))
    snap.pieces = None
    new = assemble([bufs[i] for i in layout.device_ids], snap.devices, memory)
    if copy == "primary":
        snap.primary = new
    else:
        snap.replica = new
