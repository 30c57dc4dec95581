"""Inputs, the jitted variants and round-robin timing of the attention benchmark.

Every variant runs in the same process on the same inputs, jitted and warmed up; repeats are timed
round-robin across the variants of a configuration (so load from other processes hits all of them
alike), each with block_until_ready, and records keep every repeat and the median.

On a GPU one timed call runs a variant on `layers` query batches inside one jit (a `lax.map`, like
the layers of one decode step, which share the step's plan) and the per-call time is the sample
divided by `layers`: the device time of one attention call, not Python dispatch (tens of
microseconds, as much as the smallest kernels). The KV one call reads (>= 100 MB in the
configurations and the tuning trees) is larger than a GPU's L2, so later layers do not find it
cached. On CPU, `layers` is 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.pallas_kernels import shared_prefix_attention as spa

from .configs import HEAD_DIM, HKV, HQ, INTERPRET_SHRINK, PAGE, Config, build_tree

GPU_LAYERS = 16
GIB = 2.0**30
# HBM peak bandwidth (bytes/s) by device kind substring, most specific first.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12,
                  "L4": 0.3e12}
# The device whose tables a GPU without any of its own starts from when it is a Hopper (SM 9.x: the
# same shared memory and register file per SM), and whose tables --interpret runs the GPU path with.
HOPPER_TABLES = "NVIDIA H200"


def tables_device(requested: str | None, interpret: bool) -> tuple[str, str]:
    """(device kind whose tables ours starts from, why). `requested`: --tables-from."""
    if requested:
        return requested, "--tables-from"
    if interpret:
        return HOPPER_TABLES, "--interpret runs the GPU path with a GPU's tables"
    dev = jax.devices()[0]
    if any(key[0] == dev.device_kind for key in spa.tuned_block_sizes.TABLES):
        return dev.device_kind, "this device's tables"
    if dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9"):
        return HOPPER_TABLES, f"{dev.device_kind} has no tables of its own; another Hopper's (same SM resources)"
    return dev.device_kind, "no tables for this device: the conservative default"


def time_round_robin(fns: dict, repeats: int) -> dict[str, list[float]]:
    """fns: name -> zero-arg callable returning jax arrays. Rotates the order every repeat."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[n]())
            times[n].append(time.perf_counter() - t0)
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


def kv_bytes(tokens: float, itemsize: int) -> float:
    """Bytes of K and V for `tokens` tokens of every KV head."""
    return 2.0 * tokens * HKV * HEAD_DIM * itemsize


def peak_bandwidth() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in kind), None)


def mem_available() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def naive_decode(q, k, v, lengths, *, sm_scale):
    """Plain jnp decode attention over contiguous per-request KV.

    q: [B, Hq, D]; k, v: [B, Hkv, L, D]; lengths: i32[B]."""
    b, hq, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    qq = q.reshape(b, hkv, hq // hkv, d)
    s = jnp.einsum("bhgd,bhld->bhgl", qq, k, precision=jax.lax.Precision.HIGHEST) * sm_scale
    mask = jnp.arange(length)[None, :] < lengths[:, None]
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgl,bhld->bhgd", p, v, precision=jax.lax.Precision.HIGHEST)
    return o.reshape(b, hq, d)


@dataclasses.dataclass
class Ours:
    """Our tiles and cost model at one precision, and where they came from."""

    block_sizes: spa.BlockSizes
    cost_model: spa.CostModel
    source: str


class Runner:
    """Inputs and jitted variants for one platform, dtype and list of precisions of ours.

    gpu: the Pallas kernels (compiled, or with `interpret` in the Pallas interpreter on shrunk
    trees, 2 layers: checks the GPU path, times nothing); else the XLA paths. `ours[p]` holds the
    tiles and cost model ours runs with at precision p; phases may replace them (tuning,
    calibration).
    """

    def __init__(self, *, gpu: bool, dtype: str, precisions: tuple[str, ...], interpret: bool = False,
                 tables_from: str | None = None):
        self.gpu, self.interpret = gpu, interpret
        self.dtype = jnp.dtype(dtype)
        self.precisions = precisions
        self.shrink = INTERPRET_SHRINK if interpret else 1
        self.layers = (2 if interpret else GPU_LAYERS) if gpu else 1
        self.scale = 1.0 / math.sqrt(HEAD_DIM)
        self.device_kind, self.tables_reason = tables_device(tables_from, interpret)
        self.ours = {p: self._tables(p) for p in precisions}
        self.baseline_params: dict[str, dict] = {}  # JAX kernel -> tuned parameters (phase tune-baselines)
        self.naive = self.layered(lambda q, k, v, ln: naive_decode(q, k, v, ln, sm_scale=self.scale))

    def _tables(self, precision: str) -> Ours:
        tuned = spa.get_default(self.device_kind, self.dtype.name, precision, q_per_kv=HQ // HKV, head_dim=HEAD_DIM,
                                page_size=PAGE)
        cm = tuned.cost_model
        if self.shrink > 1:  # overheads are in tokens: shrunk with the trees, so they share as on a GPU
            cm = dataclasses.replace(cm, step_overhead=cm.step_overhead / self.shrink,
                                     item_overhead=cm.item_overhead / self.shrink,
                                     step_overhead_by_size=tuple((n, o / self.shrink)
                                                                 for n, o in cm.step_overhead_by_size))
        return Ours(tuned.block_sizes, cm, tuned.source)

    # -- inputs ----------------------------------------------------------------------------------

    def tree(self, cfg: Config, rng):
        """`build_tree` of the configuration, shrunk under --interpret."""
        return build_tree(cfg.shrunk(self.shrink) if self.shrink > 1 else cfg, rng)

    def pools(self, total_pages: int, seed: int):
        kk, kv = jax.random.split(jax.random.PRNGKey(seed))
        shape = (HKV, total_pages, PAGE, HEAD_DIM)
        return jax.random.normal(kk, shape, self.dtype), jax.random.normal(kv, shape, self.dtype)

    def queries(self, b: int, seed: int):
        """[layers, b, Hq, D]: one query batch per layer."""
        return jax.random.normal(jax.random.PRNGKey(seed + 7), (self.layers, b, HQ, HEAD_DIM), self.dtype)

    def contiguous(self, pages, table: np.ndarray, length: int):
        """[B, Hkv, L, D] per-request copy of the paged KV (built outside any timing)."""
        n = -(-length // PAGE)
        out = jnp.transpose(pages[:, table[:, :n]], (1, 0, 2, 3, 4)).reshape(table.shape[0], HKV, n * PAGE, HEAD_DIM)
        return jax.block_until_ready(out)

    # -- variants --------------------------------------------------------------------------------

    def layered(self, f):
        """jit of (xs, *rest) -> f(xs[i], *rest) per layer, stacked along a leading [layers] axis
        (qs [layers, B, Hq, D] -> [layers, B, Hq, D] for the attention variants): a `lax.map`, one
        compilation of each kernel however many layers."""
        if self.layers == 1:
            return jax.jit(lambda xs, *rest: jax.tree.map(lambda y: y[None], f(jax.tree.map(lambda x: x[0], xs),
                                                                                 *rest)))
        return jax.jit(lambda xs, *rest: jax.lax.map(lambda x: f(x, *rest), xs))

    def ours_fn(self, precision: str, block_sizes: spa.BlockSizes | None = None):
        """Layered shared-prefix attention: (qs, k_pages, v_pages, step) -> outs."""
        bs = block_sizes or self.ours[precision].block_sizes
        if self.gpu:
            f = functools.partial(spa.shared_prefix_attention, block_sizes=bs, precision=precision,
                                  interpret=self.interpret)
        else:
            f = functools.partial(spa.shared_prefix_attention_xla, block_sizes=bs)
        return self.layered(f)

    def splitkv_fn(self, precision: str):
        """Layered split-KV paged decode: (qs, k_pages, v_pages, page_table, lengths) -> outs."""
        bs = self.ours[precision].block_sizes
        if self.gpu:
            f = functools.partial(spa.paged_attention, block_sizes=bs, precision=precision, interpret=self.interpret)
        else:
            f = functools.partial(spa.paged_attention_xla, block_sizes=bs)
        return self.layered(f)

    def per_call(self, times: dict[str, list[float]]) -> dict[str, list[float]]:
        return {n: [t / self.layers for t in ts] for n, ts in times.items()}

    def harness_floor(self, repeats: int) -> float:
        """Median per-call time of a trivial function in the harness: what the harness alone costs."""
        q = self.queries(32, 0)
        fn = self.layered(lambda x: x * 2)
        jax.block_until_ready(fn(q))
        return median(self.per_call(time_round_robin({"floor": lambda: fn(q)}, repeats))["floor"])
