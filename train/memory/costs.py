"""What an equation costs: FLOPs, a roofline time on the measured hardware, and the hardware itself.

Times are predicted as `flops / matmul_flops_per_s` for contractions and
`bytes / elementwise_bytes_per_s` for everything else (each materialised value is written once and
read once). That roofline only ranks equations; a program's predicted times are scaled by its own
measured layer time (`jaxsys.train.memory.profiler`), so the constants need only be right in ratio.
`Hardware.calibrate()` measures the three rates on the device it runs on: a matmul, an elementwise
pass and a round trip to host memory (`pinned_host`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jaxsys.train.memory.liveness import aval_bytes

CONTRACTIONS = frozenset({"dot_general", "conv_general_dilated", "ragged_dot", "ragged_dot_general"})
_FREE = frozenset({"name", "reshape", "squeeze", "expand_dims", "stop_gradient", "broadcast_in_dim",
                   "convert_element_type", "iota", "reduce_precision", "device_put", "copy", "copy_p",
                   "optimization_barrier"})


def dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    k = float(np.prod([lhs[d] for d in lhs_contract], dtype=np.float64))
    return 2.0 * k * float(np.prod(eqn.outvars[0].aval.shape, dtype=np.float64))


def eqn_flops(eqn) -> float:
    """FLOPs of one primitive equation (not of equations nested in it): 2mnk for a contraction,
    one per output element for elementwise work, one per input element for a reduction."""
    prim = eqn.primitive.name
    if prim == "dot_general":
        return dot_flops(eqn)
    if prim in _FREE or jcore.jaxprs_in_params(eqn.params):
        return 0.0
    if prim.startswith("reduce_") or prim in ("argmax", "argmin", "cumsum", "cumprod", "cummax"):
        return float(sum(np.prod(v.aval.shape, dtype=np.float64) for v in eqn.invars
                         if hasattr(v.aval, "shape")))
    return float(sum(np.prod(v.aval.shape, dtype=np.float64) for v in eqn.outvars))


def total_flops(eqn) -> float:
    """FLOPs of an equation with what it nests (scan bodies times their length)."""
    subs = list(jcore.jaxprs_in_params(eqn.params))
    if not subs:
        return eqn_flops(eqn)
    if eqn.primitive.name == "scan":
        return eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
    if eqn.primitive.name == "cond":
        return max(jaxpr_flops(s) for s in subs)
    return sum(jaxpr_flops(s) for s in subs)


def jaxpr_flops(jaxpr) -> float:
    return sum(total_flops(e) for e in getattr(jaxpr, "jaxpr", jaxpr).eqns)


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Measured rates of one device (and its host link), and its memory if known."""

    name: str
    matmul_flops_per_s: float
    elementwise_bytes_per_s: float
    link_bytes_per_s: float  # device -> pinned host -> device, per direction
    device_bytes: int | None = None  # usable device memory (None: unknown, e.g. CPU)

    def eqn_seconds(self, eqn) -> float:
        """Roofline time of one primitive equation (nested jaxprs are costed by `jaxpr_seconds`)."""
        prim = eqn.primitive.name
        if prim in CONTRACTIONS:
            return dot_flops(eqn) / self.matmul_flops_per_s if prim == "dot_general" else 0.0
        if prim in _FREE or jcore.jaxprs_in_params(eqn.params):
            return 0.0
        moved = sum(aval_bytes(v.aval) for v in eqn.outvars)
        if prim.startswith("reduce_") or prim in ("argmax", "argmin"):
            moved += sum(aval_bytes(v.aval) for v in eqn.invars if hasattr(v, "aval"))
        return 2.0 * moved / self.elementwise_bytes_per_s

    def total_seconds(self, eqn) -> float:
        """Roofline time of an equation with what it nests: a scan's body times its length, the
        slower branch of a cond, a called jaxpr once (a while loop's body once: its trip count is
        unknown)."""
        subs = list(jcore.jaxprs_in_params(eqn.params))
        if not subs:
            return self.eqn_seconds(eqn)
        if eqn.primitive.name == "scan":
            return eqn.params["length"] * self.jaxpr_seconds(eqn.params["jaxpr"])
        if eqn.primitive.name == "cond":
            return max(self.jaxpr_seconds(s) for s in subs)
        return sum(self.jaxpr_seconds(s) for s in subs)

    def jaxpr_seconds(self, jaxpr) -> float:
        return sum(self.total_seconds(e) for e in getattr(jaxpr, "jaxpr", jaxpr).eqns)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def calibrate(cls, device: jax.Device | None = None, *, dtype: str = "float32") -> "Hardware":
        """Measure this device (cached per device and dtype for the process): a square matmul, an
        elementwise pass over a large array, and a round trip of a buffer to `pinned_host` memory."""
        device = device or jax.devices()[0]
        return _calibrate(device, jnp.dtype(dtype).name)


def _median_seconds(fn, repeats: int = 5) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@functools.lru_cache(maxsize=None)
def _calibrate(device: jax.Device, dtype: str) -> Hardware:
    gpu = device.platform != "cpu"
    n = 8192 if gpu else 1024
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    mm = jax.jit(lambda x: x @ x)
    matmul = 2.0 * n ** 3 / _median_seconds(lambda: mm(a))
    m = (256 if gpu else 16) * 1024 * 1024 // 4
    x = jax.device_put(jnp.ones((m,), jnp.float32), device)
    ew = jax.jit(lambda v: jnp.exp(v) * 0.5)
    elementwise = 2.0 * x.nbytes / _median_seconds(lambda: ew(x))
    link = _link_bandwidth(device, x)
    stats = device.memory_stats() or {}
    mem = stats.get("bytes_limit")
    return Hardware(name=f"{device.platform}:{device.device_kind}", matmul_flops_per_s=matmul,
                    elementwise_bytes_per_s=elementwise, link_bytes_per_s=link,
                    device_bytes=int(mem) if mem else None)


def _link_bandwidth(device: jax.Device, x: jax.Array) -> float:
    """Bytes per second of one direction of a device -> pinned_host -> device round trip."""
    kinds = {m.kind for m in device.addressable_memories()}
    if "pinned_host" not in kinds:
        return float("nan")
    host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    dev = jax.sharding.SingleDeviceSharding(device, memory_kind=device.default_memory().kind)
    seconds = _median_seconds(lambda: jax.device_put(jax.device_put(x, host), dev), repeats=3)
    return 2.0 * x.nbytes / seconds
