"""Tuned tiles and balancer cost models, by device kind, dtype, fp32 precision and attention shape.

`get_default(device_kind, dtype, precision, q_per_kv=..., head_dim=..., page_size=...)` is the one
lookup (`device_kind` is `jax.devices()[0].device_kind`: "cpu", "NVIDIA H200", ...):

1. the table of (device kind, dtype, precision), else of the device's default precision for that
   dtype, else of its float32 default: that table's cost model (in plain-path units, which carry
   over between tile settings better than tiles carry over between shapes);
2. the table's tiles when its dtype and attention shape are the ones asked for, else the
   device's tiles for untuned shapes;
3. a device kind without tables (an unmeasured GPU: shared memory, SM count and bandwidth all
   differ) gets `CONSERVATIVE`, with a one-line warning: small tiles that fit any recent GPU,
   and the cost model whose step overhead is largest, so it shares only where the saving is
   large.

Every table names the result JSON (and the commit) it was measured in (`source`). How it was
measured, what else was tried and how long each took, is in that JSON and in git history:
`benchmarks/attention.py --tune-first` sweeps the tiles and calibrates the cost model
(`calibration.py` fits it).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

from .config import DEFAULT_PRECISION, PRECISIONS, BlockSizes, CostModel, ItemsLaunch, MergeLaunch, SplitLaunch

__all__ = ["Defaults", "get_default", "TABLES", "UNTUNED_BLOCK_SIZES", "CONSERVATIVE"]

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Defaults:
    """Tiles and cost model for one device, dtype, precision and attention shape.

    Attributes:
      block_sizes: the tiles (static argument of the attention functions).
      cost_model: the balancer's cost model (`plan_step`).
      source: where they were measured; tiles of an untuned shape say so.
    """

    block_sizes: BlockSizes
    cost_model: CostModel
    source: str


@dataclasses.dataclass(frozen=True)
class _Table:
    """One measured setting: the attention shape its tiles were tuned for, and the source."""

    shape: tuple[int, int, int]  # (q_per_kv, head_dim, page_size)
    block_sizes: BlockSizes
    cost_model: CostModel
    source: str


_SHAPE_32_8_128_16 = (4, 128, 16)  # Hq=32, Hkv=8, head_dim=128, page_size=16: the benchmark's shape

_CPU = _Table(
    shape=_SHAPE_32_8_128_16,
    block_sizes=BlockSizes(items=ItemsLaunch(chunk_pages=64, query_block=32), split=SplitLaunch(pages_per_split=16)),
    cost_model=CostModel(shared_token_cost=((2, 1.245), (4, 1.646), (8, 2.349), (16, 3.638), (32, 6.077)),
                         step_overhead=284.1),
    source="benchmarks/results/attention.json at b43292f (2-core AMD EPYC VM; tuning.best, calibration)",
)

_H200_TF32X3 = _Table(
    shape=_SHAPE_32_8_128_16,
    block_sizes=BlockSizes(
        items=ItemsLaunch(chunk_pages=64, query_block=16, pages_per_compute_block=2, num_warps=4, num_stages=2),
        split=SplitLaunch(pages_per_split=32, pages_per_compute_block=2, num_warps=4, num_stages=2),
        merge=MergeLaunch(num_warps=4, num_stages=2)),
    cost_model=CostModel(shared_token_cost=((2, 1.025), (4, 1.025), (8, 1.025), (16, 1.064)),
                         step_overhead=33627.1),
    source="benchmarks/results/attention_gpu.json at 25c0eed (tuning.best, calibration)",
)

_H200_TF32 = _Table(
    shape=_SHAPE_32_8_128_16,
    block_sizes=BlockSizes(
        items=ItemsLaunch(chunk_pages=32, query_block=32, pages_per_compute_block=4, num_warps=8, num_stages=3,
                          row_tiers=4, flat_kv=True),
        split=SplitLaunch(pages_per_split=64, pages_per_compute_block=2, num_warps=4, num_stages=2,
                          min_programs=512, flat_kv=True),
        merge=MergeLaunch(partials_per_step=16, num_warps=8, num_stages=3)),
    cost_model=CostModel(shared_token_cost=((2, 0.479), (4, 0.479), (8, 0.698), (16, 2.108), (32, 2.187)),
                         step_overhead_by_size=((2, 3893.8), (4, 9013.8), (8, 18693.1), (16, 35563.5),
                                                (32, 15264.3))),
    source="benchmarks/results/attention_gpu_tf32.json at 854115e (tuning.best; calibration.fit_cost_model "
           "of calibration.points)",
)

_H200_BF16 = _Table(
    shape=_SHAPE_32_8_128_16,
    block_sizes=BlockSizes(
        items=ItemsLaunch(chunk_pages=32, query_block=32, pages_per_compute_block=8, num_warps=8, num_stages=2,
                          row_tiers=4, flat_kv=True),
        split=SplitLaunch(pages_per_split=128, pages_per_compute_block=8, num_warps=8, num_stages=2,
                          min_programs=512, flat_kv=True),
        merge=MergeLaunch(num_warps=8, num_stages=2)),
    cost_model=_H200_TF32X3.cost_model,
    source="benchmarks/results/attention_gpu_bf16.json at 854115e (tuning.best; no calibration of its own: "
           "the cost model of attention_gpu.json)",
)

# (device kind, dtype name, precision) -> table. Precision None: any (the XLA path on CPU computes
# IEEE fp32 whatever it is asked; bf16 products are bf16 whatever it is).
TABLES: dict[tuple[str, str, str | None], _Table] = {
    ("cpu", "float32", None): _CPU,
    ("NVIDIA H200", "float32", "tf32x3"): _H200_TF32X3,
    ("NVIDIA H200", "float32", "tf32"): _H200_TF32,
    ("NVIDIA H200", "bfloat16", None): _H200_BF16,
}

# Tiles of a shape without its own table (the kernels' constraints only: 16-token tiles, fp32 K
# and V tiles of 64 tokens in shared memory with 2 stages, query blocks of 4 x G rows).
_GPU_UNTUNED = BlockSizes(
    items=ItemsLaunch(chunk_pages=16, query_block=4, pages_per_compute_block=4),
    split=SplitLaunch(pages_per_split=16, pages_per_compute_block=4))
UNTUNED_BLOCK_SIZES: dict[str, BlockSizes] = {"cpu": _CPU.block_sizes, "NVIDIA H200": _GPU_UNTUNED}

CONSERVATIVE = Defaults(
    block_sizes=_GPU_UNTUNED, cost_model=_H200_TF32X3.cost_model,
    source="conservative default for a device without tables: untuned tiles, the cost model of "
           + _H200_TF32X3.source)


@functools.lru_cache(maxsize=None)
def _warn_untuned(device_kind: str) -> None:
    _log.warning("shared-prefix attention has no tuned tables for %r: using conservative tiles and cost "
                 "model (benchmarks/attention.py --tune-first measures them)", device_kind)


def get_default(device_kind: str, dtype: str, precision: str = DEFAULT_PRECISION, *, q_per_kv: int,
                head_dim: int, page_size: int) -> Defaults:
    """Tiles and cost model for a device kind, KV dtype, fp32 precision and attention shape.

    Args:
      device_kind: `jax.devices()[0].device_kind` ("cpu", "NVIDIA H200", ...).
      dtype: the KV cache dtype name ("float32", "bfloat16").
      precision: how fp32 dots are computed, one of `PRECISIONS` (ignored for other dtypes).
      q_per_kv: query heads per KV head (G).
      head_dim: head dimension.
      page_size: tokens per KV page.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dtype = str(dtype)
    keys = [(device_kind, dtype, precision), (device_kind, dtype, DEFAULT_PRECISION), (device_kind, dtype, None),
            (device_kind, "float32", DEFAULT_PRECISION), (device_kind, "float32", None)]
    key = next((k for k in keys if k in TABLES), None)
    if key is None:
        _warn_untuned(device_kind)
        return CONSERVATIVE
    table = TABLES[key]
    if key[1] == dtype and table.shape == (q_per_kv, head_dim, page_size):
        return Defaults(block_sizes=table.block_sizes, cost_model=table.cost_model, source=table.source)
    return Defaults(block_sizes=UNTUNED_BLOCK_SIZES[device_kind], cost_model=table.cost_model,
                    source=f"tiles untuned for {dtype} (q_per_kv, head_dim, page_size)="
                           f"{(q_per_kv, head_dim, page_size)}; cost model of {table.source}")
