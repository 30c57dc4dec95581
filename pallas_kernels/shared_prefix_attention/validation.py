"""Input validation of the two attention ops, shared by every path (XLA and Pallas).

Each check runs while the op is traced (shapes and dtypes only, nothing is read from the device),
so bad input fails with the argument's name instead of an error from deep inside the lowering.
The Pallas kernels add their Triton constraints (`kernel.py`).
"""

from __future__ import annotations

from .balancer import SharedPrefixStep
from .config import BlockSizes

__all__ = ["check_shared_prefix_inputs", "check_paged_inputs"]


def _check_cache(q, k_pages, v_pages, block_sizes) -> None:
    if not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
    if q.ndim != 3 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"expected q [B, num_q_heads, head_dim] and k/v_pages [num_kv_heads, total_num_pages, "
                         f"page_size, head_dim], got q {q.shape}, k_pages {k_pages.shape}, v_pages {v_pages.shape}")
    _, hq, d = q.shape
    hkv, _, _, dk = k_pages.shape
    if hq % hkv:
        raise ValueError(f"num_q_heads {hq} must be a multiple of num_kv_heads {hkv}")
    if dk != d:
        raise ValueError(f"head_dim of q ({d}) and k/v_pages ({dk}) differ")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages dtypes differ: {k_pages.dtype} vs {v_pages.dtype}")


def check_shared_prefix_inputs(q, k_pages, v_pages, step: SharedPrefixStep, block_sizes: BlockSizes) -> None:
    """`shared_prefix_attention[_xla]`: the cache, and a step whose arrays fit together and with q."""
    _check_cache(q, k_pages, v_pages, block_sizes)
    if not isinstance(step, SharedPrefixStep):
        raise TypeError(f"step must be a SharedPrefixStep (from plan_step), got {type(step).__name__}")
    b = q.shape[0]
    w, c = step.item_pages.shape
    if (step.item_page_lens.shape != (w, c) or step.item_queries.ndim != 2 or step.item_queries.shape[0] != w
            or step.private_pages.ndim != 2 or step.private_pages.shape[0] != b
            or step.private_page_lens.shape != step.private_pages.shape
            or step.merge_rows.ndim != 2 or step.merge_rows.shape[0] != b):
        shapes = {k: getattr(v, "shape", None) for k, v in step._asdict().items()}
        raise ValueError(f"step shapes do not fit together or with q {q.shape} (B = q.shape[0]): {shapes}")
    if c & (c - 1):
        raise ValueError(f"the step's chunk pages ({c}) must be a power of two")


def check_paged_inputs(q, k_pages, v_pages, page_indices, lengths, block_sizes: BlockSizes) -> None:
    """`paged_attention[_xla]`: the cache, and a page table i32[B, P] with lengths i32[B]."""
    _check_cache(q, k_pages, v_pages, block_sizes)
    b = q.shape[0]
    if page_indices.ndim != 2 or page_indices.shape[0] != b or lengths.shape != (b,):
        raise ValueError(f"page_indices {page_indices.shape} / lengths {lengths.shape} do not fit q {q.shape}: "
                         f"expected [{b}, pages_per_sequence] and [{b}]")
