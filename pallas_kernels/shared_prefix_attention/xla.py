"""Shared-prefix decode attention as plain XLA: the portable path (what CPU runs).

The algorithm, for one decode step described by a `SharedPrefixStep` (see `balancer.py`):

1. Shared work items. Item w holds one KV chunk (`C` pages of one tree node) and up to `Qb`
   requests below that node. Per KV head, its queries are stacked as a [Qb x G, D] matrix
   (G = query heads per KV head) and multiplied ONCE with the chunk's [C x page_size, D] keys:
   the chunk is read once for all requests that share it. Each item yields a partial
   (normalized output, log-sum-exp) per query row. The product uses only as many rows as
   the item has requests (rounded up to a power of two, chosen per item by `lax.switch`).
2. Private pages. Whatever a request does not share runs as plain split-KV paged decode
   ("FlashDecoding"): its page table is cut into splits of `pages_per_split` pages, one partial
   per split.

Items and splits run in `lax.map` loops whose bodies gather one chunk or split: on a CPU
that keeps the gathered KV in cache, where gathering every request's KV at once would
materialize it in memory (costing more than the attention), and a unit whose pages are all
padding is skipped by `lax.cond`, so padded buckets cost little.
3. Merge. Each request's output is the LSE-weighted combination of its private partials and
   the shared partials listed in `merge_rows` (chunks of one node, then the nodes down its
   path: LSE merging is associative, so one merge over all of them is the same thing).

Everything has static shapes (the step is padded to buckets on the host), there is no Python
control flow on traced values, padding is masked (a padding request gets zeros), and inputs
may be float32 or bfloat16 with scores, softmax statistics and accumulation in float32.
`paged_attention_xla` is the plain split-KV paged decode on its own: the balancer's fallback
and the benchmark's baseline.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from .balancer import SharedPrefixStep
from .config import BlockSizes
from .validation import check_paged_inputs, check_shared_prefix_inputs

__all__ = ["shared_prefix_attention_xla", "paged_attention_xla", "merge_partials"]

# fp32 means fp32 products on every backend (GPUs default to TF32 for fp32 dots).
_PRECISION = jax.lax.Precision.HIGHEST


def _unit_partial(q, k, v, valid, sm_scale):
    """Partial attention of one work unit, all KV heads at once.

    q: [Hkv, M, D] stacked query rows; k, v: [Hkv, T, D] the unit's keys/values; valid: bool[T].
    Returns (o f32[Hkv, M, D] normalized, lse f32[Hkv, M]); with no valid key, o = 0 and
    lse = -inf.
    """
    s = jnp.einsum("hmd,htd->hmt", q, k, precision=_PRECISION,
                   preferred_element_type=jnp.float32) * sm_scale
    s = jnp.where(valid[None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    p = jnp.exp(s - m_safe[..., None])
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("hmt,htd->hmd", p.astype(v.dtype), v, precision=_PRECISION,
                   preferred_element_type=jnp.float32)
    l_safe = jnp.where(l > 0, l, 1.0)
    return o / l_safe[..., None], jnp.where(l > 0, m_safe + jnp.log(l_safe), -jnp.inf)


def _paged_unit(q, k_pages, v_pages, pages, page_lens, sm_scale):
    """One unit over a list of pages; skipped (empty partial) when it has no valid token.

    q: [Hkv, M, D]; pages, page_lens: i32[n]. Returns o f32[Hkv, M, D], lse f32[Hkv, M].
    """
    hkv, m, d = q.shape
    ps = k_pages.shape[2]
    n = pages.shape[0]

    def compute(_):
        k = k_pages[:, pages].reshape(hkv, n * ps, d)  # [Hkv, T, D]
        v = v_pages[:, pages].reshape(hkv, n * ps, d)
        valid = (jnp.arange(ps, dtype=jnp.int32)[None, :] < page_lens[:, None]).reshape(n * ps)
        return _unit_partial(q, k, v, valid, sm_scale)

    def empty(_):
        return (jnp.zeros((hkv, m, d), jnp.float32), jnp.full((hkv, m), -jnp.inf, jnp.float32))

    return jax.lax.cond(jnp.any(page_lens > 0), compute, empty, None)


def merge_partials(o, lse, axis, with_lse=False):
    """LSE-merge partials along `axis`. o: f32[..., P, ..., D]; lse: f32 (o without D).
    Returns the merged output (and, with_lse, the merged log-sum-exp, -inf where all are empty)."""
    m = jnp.max(lse, axis=axis, keepdims=True)
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    w = jnp.exp(lse - m_safe)  # 0 for empty partials
    denom = jnp.sum(w, axis=axis)
    num = jnp.sum(w[..., None] * o, axis=axis)
    out = num / jnp.where(denom > 0, denom, 1.0)[..., None]
    if not with_lse:
        return out
    total = jnp.where(denom > 0, jnp.squeeze(m_safe, axis) + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
    return out, total


def _private_partials(q_bhgd, k_pages, v_pages, pages, page_lens, pages_per_split, sm_scale):
    """Split-KV paged decode partials: one unit per (request, split), looped.

    q_bhgd: [B, Hkv, G, D]; k/v_pages: [Hkv, NP, ps, D]; pages, page_lens: i32[B, Pp].
    Returns o f32[B, S, Hkv, G, D], lse f32[B, S, Hkv, G], S = ceil(Pp / pages_per_split).
    The loop keeps each unit's gathered KV cache-sized instead of materializing every
    request's KV (which on CPU costs more than the attention itself).
    """
    b, hkv, g, d = q_bhgd.shape
    pp = max(pages.shape[1], 1)
    sp = min(pages_per_split, pp)
    n_split = -(-pp // sp)
    if n_split * sp > pages.shape[1]:  # padding pages have length 0: never read
        pad = ((0, 0), (0, n_split * sp - pages.shape[1]))
        pages, page_lens = jnp.pad(pages, pad), jnp.pad(page_lens, pad)
    req = jnp.repeat(jnp.arange(b, dtype=jnp.int32), n_split)

    def unit(args):
        r, pg, ln = args
        return _paged_unit(q_bhgd[r], k_pages, v_pages, pg, ln, sm_scale)

    o, lse = jax.lax.map(unit, (req, pages.reshape(b * n_split, sp), page_lens.reshape(b * n_split, sp)))
    return o.reshape(b, n_split, hkv, g, d), lse.reshape(b, n_split, hkv, g)


def _block_sizes_up_to(qb: int) -> tuple[int, ...]:
    """Powers of two below `qb`, then `qb`: the row counts an item's product may use."""
    sizes = [1 << i for i in range(max(qb - 1, 0).bit_length()) if (1 << i) < qb]
    return tuple(sizes) + (qb,)


def _shared_partials(q_bhgd, k_pages, v_pages, step: SharedPrefixStep, sm_scale):
    """Partials of the shared work items: each item's KV chunk is read once for its Qb requests.

    An item's product uses only as many query rows as it has requests (rounded up to a power
    of two, picked per item with `lax.switch`), so a node shared by 2 requests does not pay
    for Qb. Returns o f32[W * Qb + 1, Hkv, G, D], lse f32[W * Qb + 1, Hkv, G]; the last row
    is the empty partial that `merge_rows` padding points at.
    """
    b, hkv, g, d = q_bhgd.shape
    w = step.item_pages.shape[0]
    qb = step.item_queries.shape[1]
    sizes = _block_sizes_up_to(qb)
    q_ext = jnp.concatenate([q_bhgd, jnp.zeros((1, hkv, g, d), q_bhgd.dtype)], axis=0)

    def item(args):
        pg, ln, qs = args
        n_real = jnp.sum((qs < b).astype(jnp.int32))
        which = jnp.sum((jnp.asarray(sizes[:-1], jnp.int32) < n_real).astype(jnp.int32))

        def branch(size):
            def run(_):
                q = jnp.transpose(q_ext[qs[:size]], (1, 0, 2, 3)).reshape(hkv, size * g, d)
                o, lse = _paged_unit(q, k_pages, v_pages, pg, ln, sm_scale)  # [Hkv, size*G, ...]
                pad = (qb - size) * g
                return (jnp.pad(o, ((0, 0), (0, pad), (0, 0))),
                        jnp.pad(lse, ((0, 0), (0, pad)), constant_values=-jnp.inf))
            return run

        return jax.lax.switch(which, [branch(s) for s in sizes], None)

    o, lse = jax.lax.map(item, (step.item_pages, step.item_page_lens, step.item_queries))
    o = jnp.transpose(o.reshape(w, hkv, qb, g, d), (0, 2, 1, 3, 4)).reshape(w * qb, hkv, g, d)
    lse = jnp.transpose(lse.reshape(w, hkv, qb, g), (0, 2, 1, 3)).reshape(w * qb, hkv, g)
    o = jnp.concatenate([o, jnp.zeros((1, hkv, g, d), o.dtype)], axis=0)
    lse = jnp.concatenate([lse, jnp.full((1, hkv, g), -jnp.inf, lse.dtype)], axis=0)
    return o, lse


@functools.partial(jax.jit, static_argnames=("block_sizes", "sm_scale", "return_lse"))
def shared_prefix_attention_xla(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                                step: SharedPrefixStep, *, block_sizes: BlockSizes,
                                sm_scale: float | None = None, return_lse: bool = False):
    """Decode attention over a prefix tree, reading each shared KV chunk once (XLA path).

    Args:
      q: [B, num_q_heads, head_dim] the step's query token of each request (B = padded batch,
        `step.private_pages.shape[0]`); query head h attends KV head h // G, G =
        num_q_heads // num_kv_heads.
      k_pages: [num_kv_heads, total_num_pages, page_size, head_dim] one layer's key cache.
      v_pages: [num_kv_heads, total_num_pages, page_size, head_dim] one layer's value cache.
      step: `SharedPrefixStep` from `plan_step` (int32 arrays, numpy or jax):
        item_pages i32[W, C], item_page_lens i32[W, C], item_queries i32[W, Qb],
        private_pages i32[B, Pp], private_page_lens i32[B, Pp], merge_rows i32[B, M].
        W = 0 runs plain paged decode.
      block_sizes: `BlockSizes` (static); uses `split.pages_per_split` (pages per split of the
        private, plain part; the last split is padded). C and Qb come from the step's shapes.
      sm_scale: softmax scale, default 1/sqrt(head_dim).
      return_lse: also return the log-sum-exp of the scaled scores, f32[B, num_q_heads] (-inf
        for a request with no KV), so a caller can merge in more keys (e.g. the new token).

    Returns:
      [B, num_q_heads, head_dim] in q's dtype; padding requests (no pages) get zeros.
      With return_lse: (that, lse).
    """
    check_shared_prefix_inputs(q, k_pages, v_pages, step, block_sizes)
    b, hq, d = q.shape
    hkv = k_pages.shape[0]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    q_bhgd = q.astype(k_pages.dtype).reshape(b, hkv, g, d)
    o, lse = _private_partials(q_bhgd, k_pages, v_pages, step.private_pages,
                               step.private_page_lens, block_sizes.split.pages_per_split, scale)
    if step.item_pages.shape[0] > 0 and step.merge_rows.shape[1] > 0:
        o_sh, lse_sh = _shared_partials(q_bhgd, k_pages, v_pages, step, scale)
        o = jnp.concatenate([o, o_sh[step.merge_rows]], axis=1)  # [B, S + M, Hkv, G, D]
        lse = jnp.concatenate([lse, lse_sh[step.merge_rows]], axis=1)
    if return_lse:
        out, total = merge_partials(o, lse, axis=1, with_lse=True)
        return out.reshape(b, hq, d).astype(q.dtype), total.reshape(b, hq)
    return merge_partials(o, lse, axis=1).reshape(b, hq, d).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("block_sizes", "sm_scale"))
def paged_attention_xla(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                        page_indices: jax.Array, lengths: jax.Array, *, block_sizes: BlockSizes,
                        sm_scale: float | None = None) -> jax.Array:
    """Plain split-KV paged decode attention (no sharing), FlashDecoding-style (XLA path).

    Args:
      q: [B, num_q_heads, head_dim].
      k_pages: [num_kv_heads, total_num_pages, page_size, head_dim].
      v_pages: [num_kv_heads, total_num_pages, page_size, head_dim].
      page_indices: i32[B, pages_per_sequence] physical pages of each request.
      lengths: i32[B] tokens of each request (0 for a padding request: zeros out).
      block_sizes: `BlockSizes` (static); uses `split.pages_per_split`, the pages per KV split
        (each split gives one (output, LSE) partial).
      sm_scale: softmax scale, default 1/sqrt(head_dim).

    Returns:
      [B, num_q_heads, head_dim] in q's dtype.
    """
    check_paged_inputs(q, k_pages, v_pages, page_indices, lengths, block_sizes)
    b, hq, d = q.shape
    hkv, _, ps, _ = k_pages.shape
    pp = page_indices.shape[1]
    page_lens = jnp.clip(lengths[:, None] - ps * jnp.arange(pp, dtype=jnp.int32)[None, :], 0, ps)
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    q_bhgd = q.astype(k_pages.dtype).reshape(b, hkv, g, d)
    o, lse = _private_partials(q_bhgd, k_pages, v_pages, page_indices, page_lens.astype(jnp.int32),
                               block_sizes.split.pages_per_split, scale)
    return merge_partials(o, lse, axis=1).reshape(b, hq, d).astype(q.dtype)
