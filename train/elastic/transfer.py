"""Run a `TransferPlan` with jax: cut each piece on its source device, copy it device-to-device,
concatenate a destination's pieces there. The programs involved are tiny and keyed by shape only
(piece length, shard sizes, memory kind), so the same few serve every plan between two layout
sizes; they are compiled ahead of time with the step (`precompile_plan`) and retargeted per device.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from jaxsys.train.elastic.compile import ExecutableCache
from jaxsys.train.elastic.planner import TransferPlan
from jaxsys.train.elastic.snapshot import assemble


def _slice_program(length: int, shard: int, memory: str):
    def builder(devices):
        (dev,) = devices
        s_in = SingleDeviceSharding(dev, memory_kind=None if memory == "device" else memory)
        s_dev = SingleDeviceSharding(dev)

        def cut(buf, start):
            if memory != "device":
                buf = jax.device_put(buf, s_dev)
            return jax.lax.dynamic_slice(buf, (jnp.int32(0), start), (3, length))

        return (jax.jit(cut, in_shardings=(s_in, s_dev), out_shardings=s_dev),
                (jax.ShapeDtypeStruct((3, shard), jnp.float32, sharding=s_in),
                 jax.ShapeDtypeStruct((), jnp.int32, sharding=s_dev)))

    return "transfer_slice", (length, shard, memory), builder


def _concat_program(lengths: tuple[int, ...], shard: int):
    def builder(devices):
        (dev,) = devices
        s = SingleDeviceSharding(dev)

        def cat(*parts):
            pad = shard - sum(lengths)
            tail = [jnp.zeros((3, pad), jnp.float32)] if pad else []
            return jnp.concatenate(list(parts) + tail, axis=1)

        return (jax.jit(cat, out_shardings=s),
                tuple(jax.ShapeDtypeStruct((3, n), jnp.float32, sharding=s) for n in lengths))

    return "transfer_concat", (lengths, shard), builder


def _whole_local(t, s_old: int, s_new: int, memory: str) -> bool:
    """A local piece that is a whole old shard of the new size needs no cut."""
    return t.local and t.src_offset == 0 and t.length == s_old == s_new and memory == "device"


def _programs(plan: TransferPlan, memory: str):
    """(name, key, builder, device id) for every program the plan runs."""
    S_old, S_new = plan.old.shard_size, plan.new.shard_size
    out = []
    for dst in plan.new.device_ids:
        pieces = plan.for_destination(dst)
        for t in pieces:
            mk = "device" if t.copy == "primary" else memory
            if not _whole_local(t, S_old, S_new, mk):
                out.append((*_slice_program(t.length, S_old, mk), t.src))
        out.append((*_concat_program(tuple(t.length for t in pieces), S_new), dst))
    return out


def precompile_plan(cache: ExecutableCache, plan: TransferPlan, memory: str,
                    devices_by_id: dict[int, jax.Device]) -> None:
    """Compile (or retarget) every program `plan` needs, so running it compiles nothing."""
    for name, key, builder, dev_id in _programs(plan, memory):
        cache.get(name, key, [devices_by_id[dev_id]], builder)


def execute_plan(cache: ExecutableCache, plan: TransferPlan, primary: dict[int, jax.Array],
                 replica: dict[int, jax.Array], devices: Sequence[jax.Device], memory: str) -> jax.Array:
    """The new [3, N'*S'] state on `devices` (ordered as `plan.new.device_ids`).

    primary/replica: old shard index -> the held [3, S] buffer (only copies on live devices).
    """
    dev_by_id = {d.id: d for d in devices}
    for src_map in (primary, replica):
        for buf in src_map.values():
            for d in buf.devices():
                dev_by_id.setdefault(d.id, d)
    S_old, S_new = plan.old.shard_size, plan.new.shard_size
    new_bufs = []
    for dst in plan.new.device_ids:
        pieces = plan.for_destination(dst)
        parts = []
        for t in pieces:
            buf = primary[t.shard] if t.copy == "primary" else replica[t.shard]
            mk = "device" if t.copy == "primary" else memory
            if _whole_local(t, S_old, S_new, mk):
                parts.append(buf)
                continue
            name, key, builder = _slice_program(t.length, S_old, mk)
            exe = cache.get(name, key, [dev_by_id[t.src]], builder)
            piece = exe(buf, np.int32(t.src_offset))
            if not t.local:
                piece = jax.device_put(piece, SingleDeviceSharding(dev_by_id[dst]))
            parts.append(piece)
        name, key, builder = _concat_program(tuple(t.length for t in pieces), S_new)
        exe = cache.get(name, key, [dev_by_id[dst]], builder)
        new_bufs.append(exe(*parts))
    return assemble(new_bufs, [dev_by_id[d] for d in plan.new.device_ids])
