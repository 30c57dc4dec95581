"""Shared-prefix decode attention as Pallas kernels (GPU, Triton backend; `interpret=True` on CPU).

Same algorithm as `xla.py`, in three launches:

1. Shared items, grid (W, Hkv): one program per (KV chunk, KV head) loads the chunk's pages
   ONCE and multiplies them with the stacked queries of every request in its query block
   ([Qb x G rows, D] padded to a power of two >= 16 for Triton's dot; the program gathers the
   rows itself), with an online softmax over `pages_per_compute_block`-page tiles. Writes a
   partial (output, LSE) per query row.
2. Private pages, grid (B, S, Hkv): split-KV paged decode ("FlashDecoding") of what each
   request does not share; one partial per (request, split, KV head). This launch alone is
   `paged_attention`, the plain fallback. It has its own tile (`BlockSizes.split_launch`), and
   with `min_split_programs` it takes more, shorter splits when the batch is small.
3. Merge, grid (B, Hkv): each program folds its request's private partials and the shared
   partials listed in `merge_rows` by log-sum-exp, reading both where the launches wrote them.

So between the launches XLA only reshapes the queries (tens of KB). Programs whose pages are
all padding run no KV loop and write an empty partial (LSE = -inf), so padded buckets cost
almost nothing. Triton needs power-of-two tiles: `head_dim`, the page size,
`BlockSizes.chunk_pages`/`split_pages`/`pages_per_compute_block` are validated.

File order follows jax's ragged_paged_attention: reference import, input validation, kernel
bodies, public jitted wrappers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .balancer import SharedPrefixStep
from .reference import paged_attention_reference, shared_prefix_attention_reference
from .tuned_block_sizes import BlockSizes

__all__ = [
    "shared_prefix_attention",
    "paged_attention",
    "shared_prefix_attention_reference",
    "paged_attention_reference",
    "BlockSizes",
]

# Finite "minus infinity" for running maxima: exp(MASK - finite) == 0 without inf - inf NaNs.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_MIN_DOT = 16  # Triton's smallest dot tile
# fp32 products (Triton's default for fp32 is TF32, ~1e-3 relative error). Two ways to get
# fp32 accuracy: IEEE fp32 dots run on the FMA units, not the tensor cores (the first H200 run
# measured the kernels at 0.7 TB/s, compute bound, with 16-row tiles); 3xTF32 splits each
# operand into a TF32 high and low part and runs three tensor-core products (error ~2**-21
# relative, fp32 level). "auto" is 3xTF32 compiled and IEEE in the interpreter (XLA:CPU has no
# TF32). "tf32" (opt-in) is one TF32 product: ~1e-3 relative, the precision of Triton's default
# and of JAX's own decode_attention on fp32 inputs, for like-for-like comparisons and callers
# who accept it. bf16 inputs use bf16 tensor-core products either way.
_FP32_DOTS = {"ieee": lax.Precision.HIGHEST, "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
              "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32}


def _dot_precision(fp32_dot: str, dtype, interpret: bool):
    if fp32_dot not in ("auto", *_FP32_DOTS):
        raise ValueError(f"fp32_dot must be 'auto', 'ieee', 'tf32x3' or 'tf32', got {fp32_dot!r}")
    if jnp.dtype(dtype) != jnp.float32:
        return lax.Precision.HIGHEST  # bf16/fp16 operands: exact products, fp32 accumulation
    if interpret:  # XLA:CPU computes every fp32 dot in IEEE fp32
        return _FP32_DOTS["ieee"]
    return _FP32_DOTS["tf32x3" if fp32_dot == "auto" else fp32_dot]


def _pow2_at_least(n: int, minimum: int) -> int:
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


# -- input validation ----------------------------------------------------------------------------


def _validate(q, k_pages, v_pages, block_sizes: BlockSizes, interpret: bool):
    if not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
    if q.ndim != 3 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"expected q [B, Hq, D] and k/v_pages [Hkv, NP, ps, D], got q {q.shape}, "
                         f"k_pages {k_pages.shape}, v_pages {v_pages.shape}")
    _, hq, d = q.shape
    hkv, _, ps, dk = k_pages.shape
    if hq % hkv:
        raise ValueError(f"num_q_heads {hq} must be a multiple of num_kv_heads {hkv}")
    if dk != d:
        raise ValueError(f"head_dim of q ({d}) and k/v ({dk}) differ")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages dtypes differ: {k_pages.dtype} vs {v_pages.dtype}")
    if not interpret:
        for name, n in (("head_dim", d), ("page_size", ps)):
            if n & (n - 1):
                raise ValueError(f"{name}={n} must be a power of two for the Triton kernel")
        if d < _MIN_DOT:
            raise ValueError(f"head_dim={d} must be >= {_MIN_DOT} for the Triton kernel")
        for name, tile in (("pages_per_compute_block", block_sizes.pages_per_compute_block),
                           ("split_pages_per_compute_block",
                            block_sizes.split_launch().pages_per_compute_block)):
            if tile * ps < _MIN_DOT:
                raise ValueError(f"{name} * page_size = {tile * ps} must be >= {_MIN_DOT} "
                                 f"for the Triton kernel")
        if k_pages.size >= 2**31:
            # Pallas' Triton lowering computes element offsets in int32: a larger cache would
            # wrap around and read the wrong pages silently.
            raise ValueError(f"k/v_pages hold {k_pages.size} elements per layer; the Triton kernel "
                             f"addresses at most 2**31 - 1: use fewer pages per layer")


def _validate_step(q, k_pages, step: SharedPrefixStep, block_sizes: BlockSizes, interpret: bool):
    b = q.shape[0]
    w, c = step.item_pages.shape
    if (step.item_page_lens.shape != (w, c) or step.item_queries.shape[0] != w
            or step.private_pages.shape[0] != b
            or step.private_page_lens.shape != step.private_pages.shape
            or step.merge_rows.shape[0] != b):
        raise ValueError(f"step shapes do not fit together or with q {q.shape}: "
                         f"{ {k: getattr(v, 'shape', None) for k, v in step._asdict().items()} }")
    if c & (c - 1):
        raise ValueError(f"chunk pages ({c}) must be a power of two")
    ppcb = min(block_sizes.pages_per_compute_block, c)
    if w and c % ppcb:
        raise ValueError(f"chunk pages ({c}) must be a multiple of pages_per_compute_block")
    if w and not interpret and ppcb * k_pages.shape[2] < _MIN_DOT:
        raise ValueError(f"chunk pages ({c}) x page_size ({k_pages.shape[2]}) must give tiles of >= "
                         f"{_MIN_DOT} tokens for the Triton kernel")


# -- kernel bodies -------------------------------------------------------------------------------


def _attend(q, pages_ref, page_lens_ref, k_pages_ref, v_pages_ref, *, sm_scale: float,
            pages_per_compute_block: int, page_size: int, precision, prefetch: bool = False):
    """Attention of one program's query rows over one program's list of pages (one KV head).

    q: [rows, D] (loaded); pages_ref, page_lens_ref: i32[n_pages] (valid pages first, then
    padding with length 0); k/v_pages_ref: [NP, ps, D] (this KV head), or [NP * ps, D] (the
    same memory as token rows, `BlockSizes.flat_kv` / `split_flat_kv`: a tile is then one 2D
    gather of token rows; which of the two shapes' fp32 V tile Triton copies to shared memory
    16 bytes at a time, and which 4, depends on the tile: `make kernel-report`). Returns the
    partial: o f32[rows, D] (normalized) and lse f32[rows] (-inf for a row with no keys).

    The page table is read once, before the loop: each tile picks its pages from registers, so
    the only loads in the loop are the KV tiles, whose addresses depend on the loop index alone,
    and Triton's pipeliner can keep num_stages - 1 tiles in flight (with the table read inside the
    loop it kept one buffer and waited for every tile: `benchmarks/triton_static.py`).

    prefetch: issue the loads of tile i + 1 before computing on tile i (the tiles ride in the
    loop carry), software pipelining in registers for where the compiler's does not happen.
    """
    rows, d = q.shape
    n_pages = pages_ref.shape[0]
    flat = len(k_pages_ref.shape) == 2
    ps = page_size
    ppcb = pages_per_compute_block
    block_k = ppcb * ps
    all_pages, all_lens = pages_ref[...], page_lens_ref[...]
    n_active = jnp.sum((all_lens > 0).astype(jnp.int32))
    table_slot = lax.broadcasted_iota(jnp.int32, (ppcb, n_pages), 1)
    tile_page = lax.broadcasted_iota(jnp.int32, (ppcb, n_pages), 0)
    in_page = lax.broadcasted_iota(jnp.int32, (ppcb, ps), 1)

    def load(i):  # tile i: keys, values, and 1 for each valid token
        pick = table_slot == i * ppcb + tile_page  # [ppcb, n_pages], one-hot rows
        pages = jnp.sum(jnp.where(pick, all_pages[None, :], 0), axis=1)
        lens = jnp.sum(jnp.where(pick, all_lens[None, :], 0), axis=1)
        valid = (in_page < lens[:, None]).astype(jnp.int32).reshape(block_k)
        if flat:
            tokens = (pages[:, None] * ps + in_page).reshape(block_k)
            return k_pages_ref[tokens], v_pages_ref[tokens], valid
        return k_pages_ref[pages].reshape(block_k, d), v_pages_ref[pages].reshape(block_k, d), valid

    def attend(carry, tile):
        o, m, l = carry
        k, v, valid = tile
        valid = valid > 0
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * sm_scale  # [rows, block_k]
        s = jnp.where(valid[None, :], s, _MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        l = alpha * l + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)  # [rows, D]
        return alpha[:, None] * o + pv, m_new, l

    carry = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), _MASK_VALUE, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    n_iter = lax.div(n_active + (ppcb - 1), ppcb)
    if prefetch:
        def body(i, carry):
            state, tile = carry[:3], carry[3:]
            nxt = lax.cond(i + 1 < n_iter, lambda: load(i + 1), lambda: tile)
            return attend(state, tile) + nxt

        empty = (jnp.zeros((block_k, d), k_pages_ref.dtype), jnp.zeros((block_k, d), v_pages_ref.dtype),
                 jnp.zeros((block_k,), jnp.int32))
        first = lax.cond(n_iter > 0, lambda: load(0), lambda: empty)  # padding programs load nothing
        o, m, l = lax.fori_loop(0, n_iter, body, carry + first)[:3]
    else:
        o, m, l = lax.fori_loop(0, n_iter, lambda i, c: attend(c, load(i)), carry)
    nonempty = l > 0.0
    l_safe = jnp.where(nonempty, l, 1.0)
    return o / l_safe[:, None], jnp.where(nonempty, m + jnp.log(l_safe), -jnp.inf)


def _split_kernel(pages_ref, page_lens_ref, q_ref, k_pages_ref, v_pages_ref, o_ref, lse_ref, **kw):
    """One split of one request's pages for one KV head. q_ref: [Gp, D], the request's rows."""
    o, lse = _attend(q_ref[...], pages_ref, page_lens_ref, k_pages_ref, v_pages_ref, **kw)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _item_rows(query_block: int, group: int) -> int:
    """Query rows of an item program: slot s's G rows from s * G, plus room for the last slot's
    Gm (G padded to a power of two) rows that the merge reads; a power of two >= 16."""
    gm = _pow2_at_least(group, 1)
    return _pow2_at_least(query_block * group + gm - group, _MIN_DOT)


def _row_tiers(rows: int, row_tiers: int) -> list[int]:
    """The row counts an item program can run on, ascending: `rows` and up to `row_tiers` - 1
    halvings of it, none below Triton's smallest dot."""
    return sorted({max(rows >> i, _MIN_DOT) for i in range(row_tiers)})


def _tier_index(n_slots, group: int, slot_rows: int, tiers: list[int], xp=jnp):
    """Index in `tiers` of the smallest that holds rows [0, (n_slots - 1) * group + slot_rows):
    every row the merge reads of an item whose last non-empty slot is n_slots - 1. jnp in the
    kernel, numpy (xp=np) on the host."""
    need = xp.maximum(n_slots - 1, 0) * group + slot_rows
    return sum((need > t).astype(xp.int32) for t in tiers[:-1])


def item_rows(step: SharedPrefixStep, group: int, block_sizes: BlockSizes) -> dict:
    """What the shared-items launch multiplies, on the host (numpy): query rows x KV tokens summed
    over the step's items, as `useful` (rows that hold a request's query head), `computed` (the
    rows the kernel runs each item on, with `block_sizes.row_tiers`) and `full` (every item on
    all of its rows, row_tiers=1). computed / full is the launch's product work relative to
    untiered; useful / computed how much of it is not zero rows."""
    import numpy as np

    item_queries, page_lens = np.asarray(step.item_queries), np.asarray(step.item_page_lens)
    qb, b = item_queries.shape[1], np.asarray(step.private_pages).shape[0]
    gm = _pow2_at_least(group, 1)
    rows = _item_rows(qb, group)
    tiers = _row_tiers(rows, block_sizes.row_tiers)
    tokens = page_lens.sum(axis=1)
    filled = item_queries != b
    n_slots = np.max(np.where(filled, np.arange(1, qb + 1)[None, :], 0), axis=1, initial=0)
    tier_rows = np.asarray(tiers)[_tier_index(n_slots, group, gm, tiers, xp=np)]
    return {"useful": int((filled.sum(axis=1) * group * tokens).sum()), "computed": int((tier_rows * tokens).sum()),
            "full": int(rows * tokens.sum())}


def _item_kernel(pages_ref, page_lens_ref, queries_ref, q_ref, k_pages_ref, v_pages_ref, o_ref, lse_ref,
                 *, group: int, rows: int, slot_rows: int, row_tiers: int = 1, **kw):
    """One shared work item for one KV head: its chunk's pages against the stacked query rows of
    every request in it, gathered here. queries_ref: i32[Qb] (request B: an empty slot);
    q_ref: [(B + 1) * G, D], request b's rows at [b * G, b * G + G) (request B: zeros). Row
    s * G + j of the program is query head j of slot s; rows past Qb slots read zeros.

    row_tiers > 1: the item runs on the smallest tier (`_row_tiers`) that holds the rows of its
    last non-empty slot (its slot_rows = Gm rows from s * G, which the merge reads), so an item
    with few requests multiplies a few rows instead of `rows` mostly zero ones; rows past the
    tier are not written (no merge row names them).
    """
    qb = queries_ref.shape[0]

    def run(n_rows):
        r = lax.broadcasted_iota(jnp.int32, (n_rows,), 0)
        slot = lax.div(r, group)
        request = queries_ref[jnp.minimum(slot, qb - 1)]
        row = jnp.where(slot < qb, request * group + lax.rem(r, group), q_ref.shape[0] - 1)
        o, lse = _attend(q_ref[row], pages_ref, page_lens_ref, k_pages_ref, v_pages_ref, **kw)
        o_ref[pl.ds(0, n_rows), :] = o.astype(o_ref.dtype)
        lse_ref[pl.ds(0, n_rows)] = lse

    tiers = _row_tiers(rows, row_tiers)
    if len(tiers) == 1:
        return run(rows)
    empty = q_ref.shape[0] // group - 1  # request B
    used = lax.broadcasted_iota(jnp.int32, (qb,), 0) + 1
    n_slots = jnp.max(jnp.where(queries_ref[...] != empty, used, 0))  # through the last non-empty slot
    lax.switch(_tier_index(n_slots, group, slot_rows, tiers), [functools.partial(run, t) for t in tiers])


def _merge_kernel(merge_rows_ref, o_sh_ref, lse_sh_ref, o_pr_ref, lse_pr_ref, out_ref, lse_out_ref=None,
                  *, query_block=1, group=1, merge_block=1):
    """LSE-merge one request's partials for one KV head.

    merge_rows_ref: i32[M] shared partials as `item * query_block + slot` (>= W * query_block:
    padding, skipped); o_sh_ref: f32[W, rows, D], lse_sh_ref: f32[W, rows]: the shared launch's
    output as it wrote it, slot s of an item in rows [s * group, s * group + Gm); o_pr_ref:
    f32[S, Gp, D], lse_pr_ref: f32[S, Gp] (first Gm rows used); out_ref: [Gm, D]; lse_out_ref
    (optional): f32[Gm]. Rows past `group` (Gm > G) are another slot's: the caller drops them.
    merge_block (a power of two): partials folded per step; > 1 loads that many private
    partials with one [K, Gm(, D)] load each (K = the largest power of two <= merge_block
    dividing S), and that many merge rows, then their shared partials with one gather each (K
    dividing M), so the loads of a step are independent of each other (at 1 every step waits
    for its loads, and a shared step for its merge row first, then for the partial it names).
    """
    n_split = o_pr_ref.shape[0]
    n_merge = 0 if merge_rows_ref is None else merge_rows_ref.shape[0]
    gm, d = out_ref.shape

    def fold(o_part, lse_part, carry):
        acc, m, den = carry
        m_new = jnp.maximum(m, lse_part)
        a = jnp.exp(m - m_new)
        b = jnp.exp(lse_part - m_new)  # 0 for an empty partial (lse = -inf)
        return a[:, None] * acc + b[:, None] * o_part, m_new, a * den + b

    def fold_block(o_part, lse_part, carry):  # o_part [K, Gm, D], lse_part [K, Gm]
        acc, m, den = carry
        m_new = jnp.maximum(m, jnp.max(lse_part, axis=0))
        a = jnp.exp(m - m_new)
        b = jnp.exp(lse_part - m_new[None, :])  # 0 for padding rows and empty partials
        acc = a[:, None] * acc + jnp.sum(b[:, :, None] * o_part, axis=0)
        return acc, m_new, a * den + jnp.sum(b, axis=0)

    def private(s, carry):
        return fold(o_pr_ref[s, pl.ds(0, gm), :], lse_pr_ref[s, pl.ds(0, gm)], carry)

    k_private = min(merge_block, n_split & -n_split)

    def private_block(j, carry):  # k_private partials at once: [K, Gm] and [K, Gm, D] loads
        first = pl.ds(pl.multiple_of(j * k_private, k_private), k_private)
        return fold_block(o_pr_ref[first, pl.ds(0, gm), :], lse_pr_ref[first, pl.ds(0, gm)], carry)

    def locate(rows):
        """Merge rows (scalar or [K]) -> (valid, item, first row of the slot in the item).
        A padding row reads item 0's slot 0 (weight 0): always written, whatever its tier."""
        n_rows = o_sh_ref.shape[0] * query_block
        valid = rows < n_rows
        rows = jnp.where(valid, rows, 0)
        return valid, lax.div(rows, query_block), lax.rem(rows, query_block) * group

    def shared(j, carry):
        valid, item, first = locate(merge_rows_ref[j])
        lse = jnp.where(valid, lse_sh_ref[item, pl.ds(first, gm)], -jnp.inf)
        return fold(o_sh_ref[item, pl.ds(first, gm), :], lse, carry)

    k_shared = min(merge_block, n_merge & -n_merge)  # (a pinned step's M need not be a power of two)

    def shared_block(j, carry):  # k_shared partials at once: [K, Gm] and [K, Gm, D] gathers
        k = k_shared
        valid, item, first = locate(merge_rows_ref[pl.ds(pl.multiple_of(j * k, k), k)])
        item = lax.broadcast_in_dim(item, (k, gm), (0,))
        row = lax.broadcast_in_dim(first, (k, gm), (0,)) + lax.broadcasted_iota(jnp.int32, (k, gm), 1)
        lse = jnp.where(valid[:, None], lse_sh_ref[item, row], -jnp.inf)  # [K, Gm]
        return fold_block(o_sh_ref[item, row, :], lse, carry)

    carry = (jnp.zeros((gm, d), jnp.float32), jnp.full((gm,), _MASK_VALUE, jnp.float32),
             jnp.zeros((gm,), jnp.float32))
    if k_private > 1:
        carry = lax.fori_loop(0, n_split // k_private, private_block, carry)
    else:
        carry = lax.fori_loop(0, n_split, private, carry)
    if n_merge and k_shared > 1:
        carry = lax.fori_loop(0, n_merge // k_shared, shared_block, carry)
    elif n_merge:
        carry = lax.fori_loop(0, n_merge, shared, carry)
    acc, m, den = carry
    out_ref[...] = (acc / jnp.where(den > 0, den, 1.0)[:, None]).astype(out_ref.dtype)
    if lse_out_ref is not None:
        lse_out_ref[...] = jnp.where(den > 0, m + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)


# -- launches ------------------------------------------------------------------------------------


def _padded_private_pages(pp: int, page_size: int, block_sizes: BlockSizes) -> int:
    """Private pages per request after padding: a multiple of split_pages, or a power of two
    below it, and at least one 16-token tile (Triton's smallest dot)."""
    pp = max(pp, block_sizes.pages_per_compute_block, -(-_MIN_DOT // page_size))
    sp = block_sizes.split_pages
    return _pow2_at_least(pp, 1) if pp <= sp else sp * -(-pp // sp)


def _split_pages(rows: int, pp: int, page_size: int, block_sizes: BlockSizes) -> int:
    """Pages per split of the split-KV launch for `rows` (requests x KV heads) programs per
    split and `pp` padded pages per request (`_padded_private_pages`).

    `split_pages`, halved while the launch has fewer than `min_split_programs` programs, down to
    one compute tile (`pages_per_compute_block` pages and 16 tokens). Powers of two all, so
    the split still divides `pp`.
    """
    sp = min(block_sizes.split_pages, pp)
    floor = max(block_sizes.pages_per_compute_block, -(-_MIN_DOT // page_size))
    while sp // 2 >= floor and rows * (pp // sp) < block_sizes.min_split_programs:
        sp //= 2
    return sp


def _compiler_params(block_sizes: BlockSizes):
    return plgpu.CompilerParams(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages)


def _kv_operands(k_pages, v_pages, flat: int, head):
    """The caches as a launch reads them and their BlockSpecs (one KV head's pages per program):
    [Hkv, NP, ps, D], or when `flat` (`BlockSizes.flat_kv` / `split_flat_kv`) [Hkv, NP * ps, D]
    (a reshape of contiguous memory, no copy). head: the grid indices -> the program's KV head."""
    if flat:
        hkv, n, ps, d = k_pages.shape
        k_pages, v_pages = k_pages.reshape(hkv, n * ps, d), v_pages.reshape(hkv, n * ps, d)
    rest = (0,) * (k_pages.ndim - 1)
    spec = pl.BlockSpec((None,) + k_pages.shape[1:], lambda *idx: (head(*idx),) + rest)
    return [k_pages, v_pages], [spec, spec]


def _private_partials(q_bhgd, k_pages, v_pages, pages, page_lens, *, block_sizes, sm_scale,
                      interpret, precision):
    """q_bhgd: [B, Hkv, Gp, D] -> o f32[B, S, Hkv, Gp, D], lse f32[B, S, Hkv, Gp]."""
    b, hkv, gp, d = q_bhgd.shape
    ps = k_pages.shape[2]
    block_sizes = block_sizes.split_launch()
    pp = _padded_private_pages(pages.shape[1], ps, block_sizes)
    if pp > pages.shape[1]:  # padding pages have length 0: never loaded
        pad = ((0, 0), (0, pp - pages.shape[1]))
        pages, page_lens = jnp.pad(pages, pad), jnp.pad(page_lens, pad)
    sp = _split_pages(b * hkv, pp, ps, block_sizes)
    n_split = pp // sp
    ppcb = min(block_sizes.pages_per_compute_block, sp)
    kernel = functools.partial(_split_kernel, sm_scale=sm_scale, pages_per_compute_block=ppcb,
                               page_size=ps, precision=precision, prefetch=bool(block_sizes.prefetch))
    kv, kv_specs = _kv_operands(k_pages, v_pages, block_sizes.split_flat_kv, lambda i, s, h: h)
    return pl.pallas_call(
        kernel,
        grid=(b, n_split, hkv),
        in_specs=[
            pl.BlockSpec((None, sp), lambda i, s, h: (i, s)),  # pages
            pl.BlockSpec((None, sp), lambda i, s, h: (i, s)),  # page_lens
            pl.BlockSpec((None, None, gp, d), lambda i, s, h: (i, h, 0, 0)),  # q
        ] + kv_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, gp, d), lambda i, s, h: (i, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, s, h: (i, s, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, n_split, hkv, gp, d), jnp.float32),
            jax.ShapeDtypeStruct((b, n_split, hkv, gp), jnp.float32),
        ],
        compiler_params=_compiler_params(block_sizes),
        interpret=interpret,
        name="shared_prefix_private_pages",
    )(pages, page_lens, q_bhgd, *kv)


def _shared_partials(q_bhgd, k_pages, v_pages, step: SharedPrefixStep, *, g, block_sizes,
                     sm_scale, interpret, precision):
    """Shared items. Returns o f32[W, Hkv, rows, D], lse f32[W, Hkv, rows]: slot s of item w in
    rows [s * G, s * G + Gm) (Gm = G padded to a power of two; `rows` leaves room for the last
    slot's Gm rows), read in place by the merge."""
    b, hkv, _, d = q_bhgd.shape
    w, c = step.item_pages.shape
    qb = step.item_queries.shape[1]
    gm = _pow2_at_least(g, 1)
    rows = _item_rows(qb, g)
    # [Hkv, (B + 1) * G, D]: request b's query heads in rows [b * G, b * G + G), then G zero rows
    q_rows = jnp.pad(jnp.transpose(q_bhgd[:, :, :g], (1, 0, 2, 3)), ((0, 0), (0, 1), (0, 0), (0, 0)))
    q_rows = q_rows.reshape(hkv, (b + 1) * g, d)
    # Triton blocks are powers of two: extra slots hold request B (zeros), as empty slots do
    queries = jnp.pad(step.item_queries, ((0, 0), (0, _pow2_at_least(qb, 1) - qb)), constant_values=b)
    ppcb = min(block_sizes.pages_per_compute_block, c)
    kernel = functools.partial(_item_kernel, group=g, rows=rows, slot_rows=gm,
                               row_tiers=block_sizes.row_tiers, sm_scale=sm_scale,
                               pages_per_compute_block=ppcb, page_size=k_pages.shape[2], precision=precision,
                               prefetch=bool(block_sizes.prefetch))
    kv, kv_specs = _kv_operands(k_pages, v_pages, block_sizes.flat_kv, lambda i, h: h)
    return pl.pallas_call(
        kernel,
        grid=(w, hkv),
        in_specs=[
            pl.BlockSpec((None, c), lambda i, h: (i, 0)),  # item_pages
            pl.BlockSpec((None, c), lambda i, h: (i, 0)),  # item_page_lens
            pl.BlockSpec((None, queries.shape[1]), lambda i, h: (i, 0)),  # item_queries
            pl.BlockSpec((None, (b + 1) * g, d), lambda i, h: (h, 0, 0)),  # every request's rows
        ] + kv_specs,
        out_specs=[
            pl.BlockSpec((None, None, rows, d), lambda i, h: (i, h, 0, 0)),
            pl.BlockSpec((None, None, rows), lambda i, h: (i, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((w, hkv, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((w, hkv, rows), jnp.float32),
        ],
        compiler_params=_compiler_params(block_sizes),
        interpret=interpret,
        name="shared_prefix_items",
    )(step.item_pages, step.item_page_lens, queries, q_rows, *kv)


def _merge(merge_rows, o_sh, lse_sh, o_pr, lse_pr, *, gm, out_dtype, block_sizes, interpret,
           return_lse=False, query_block=1, group=1):
    """-> [B, Hkv, Gm, D] (and, return_lse, f32[B, Hkv, Gm]). o_sh, lse_sh: `_shared_partials`'
    output (items of `query_block` slots, `group` query heads each), or None."""
    b, n_split, hkv, gp, d = o_pr.shape
    in_specs = [
        pl.BlockSpec((None, n_split, None, gp, d), lambda i, h: (i, 0, h, 0, 0)),
        pl.BlockSpec((None, n_split, None, gp), lambda i, h: (i, 0, h, 0)),
    ]
    args = [o_pr, lse_pr]
    if merge_rows is not None:
        w, _, rows, _ = o_sh.shape
        in_specs = [
            pl.BlockSpec((None, merge_rows.shape[1]), lambda i, h: (i, 0)),
            pl.BlockSpec((w, None, rows, d), lambda i, h: (0, h, 0, 0)),
            pl.BlockSpec((w, None, rows), lambda i, h: (0, h, 0)),
        ] + in_specs
        args = [merge_rows, o_sh, lse_sh] + args
        kernel = functools.partial(_merge_kernel, query_block=query_block, group=group,
                                   merge_block=block_sizes.merge_block)
    else:
        kernel = functools.partial(_merge_kernel, None, None, None, merge_block=block_sizes.merge_block)
    out_specs = pl.BlockSpec((None, None, gm, d), lambda i, h: (i, h, 0, 0))
    out_shape = jax.ShapeDtypeStruct((b, hkv, gm, d), out_dtype)
    if return_lse:
        out_specs = (out_specs, pl.BlockSpec((None, None, gm), lambda i, h: (i, h, 0)))
        out_shape = (out_shape, jax.ShapeDtypeStruct((b, hkv, gm), jnp.float32))
    return pl.pallas_call(
        kernel,
        grid=(b, hkv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(block_sizes),
        interpret=interpret,
        name="shared_prefix_merge",
    )(*args)


# -- public wrappers -----------------------------------------------------------------------------


def _queries(q, k_pages):
    """q [B, Hq, D] -> ([B, Hkv, Gp, D] in the KV dtype, zero-padded to Gp >= 16 rows; G)."""
    b, hq, d = q.shape
    hkv = k_pages.shape[0]
    g = hq // hkv
    gp = _pow2_at_least(g, _MIN_DOT)
    q_bhgd = q.astype(k_pages.dtype).reshape(b, hkv, g, d)
    return jnp.pad(q_bhgd, ((0, 0), (0, 0), (0, gp - g), (0, 0))), g


@functools.partial(jax.jit, static_argnames=("block_sizes", "sm_scale", "interpret", "return_lse",
                                             "fp32_dot"))
def shared_prefix_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                            step: SharedPrefixStep, *, block_sizes: BlockSizes,
                            sm_scale: float | None = None, interpret: bool = False,
                            return_lse: bool = False, fp32_dot: str = "auto"):
    """Decode attention over a prefix tree, each shared KV chunk loaded once (Pallas kernels).

    Args:
      q: [B, num_q_heads, head_dim] the step's query token of each request (B = padded batch,
        `step.private_pages.shape[0]`); query head h attends KV head h // G, G =
        num_q_heads // num_kv_heads.
      k_pages: [num_kv_heads, total_num_pages, page_size, head_dim] one layer's key cache.
      v_pages: [num_kv_heads, total_num_pages, page_size, head_dim] one layer's value cache.
      step: `SharedPrefixStep` from `balancer.plan_step` (int32 arrays):
        item_pages i32[W, C], item_page_lens i32[W, C], item_queries i32[W, Qb],
        private_pages i32[B, Pp], private_page_lens i32[B, Pp], merge_rows i32[B, M].
        W = 0 runs plain paged decode.
      block_sizes: `BlockSizes` (static); uses split_pages, pages_per_compute_block, num_warps,
        num_stages (C and Qb come from the step's shapes).
      sm_scale: softmax scale, default 1/sqrt(head_dim).
      interpret: run the kernels in the Pallas interpreter (CPU tests).
      return_lse: also return the log-sum-exp of the scaled scores, f32[B, num_q_heads] (-inf
        for a request with no KV), so a caller can merge in more keys (e.g. the new token).
      fp32_dot: how fp32 dots are computed when compiled: "tf32x3" (three TF32 tensor-core
        products, fp32 accuracy), "ieee" (FMA units, fp32 accuracy, slower), "tf32" (one TF32
        product, ~1e-3 relative: opt-in, the precision of JAX's decode_attention), or "auto"
        (3xTF32). The interpreter computes IEEE fp32 whatever the mode.

    Returns:
      [B, num_q_heads, head_dim] in q's dtype; padding requests (no pages) get zeros.
      With return_lse: (that, lse).
    """
    _validate(q, k_pages, v_pages, block_sizes, interpret)
    _validate_step(q, k_pages, step, block_sizes, interpret)
    precision = _dot_precision(fp32_dot, k_pages.dtype, interpret)
    b, hq, d = q.shape
    hkv = k_pages.shape[0]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    q_pad, g = _queries(q, k_pages)
    gm = _pow2_at_least(g, 1)
    o_pr, lse_pr = _private_partials(q_pad, k_pages, v_pages, step.private_pages,
                                     step.private_page_lens, block_sizes=block_sizes,
                                     sm_scale=scale, interpret=interpret, precision=precision)
    if step.item_pages.shape[0] > 0 and step.merge_rows.shape[1] > 0:
        o_sh, lse_sh = _shared_partials(q_pad, k_pages, v_pages, step, g=g,
                                        block_sizes=block_sizes, sm_scale=scale,
                                        interpret=interpret, precision=precision)
        out = _merge(step.merge_rows, o_sh, lse_sh, o_pr, lse_pr, gm=gm, out_dtype=q.dtype,
                     block_sizes=block_sizes, interpret=interpret, return_lse=return_lse,
                     query_block=step.item_queries.shape[1], group=g)
    else:
        out = _merge(None, None, None, o_pr, lse_pr, gm=gm, out_dtype=q.dtype,
                     block_sizes=block_sizes, interpret=interpret, return_lse=return_lse)
    if return_lse:
        out, lse = out
        return out[:, :, :g].reshape(b, hq, d), lse[:, :, :g].reshape(b, hq)
    return out[:, :, :g].reshape(b, hq, d)


@functools.partial(jax.jit, static_argnames=("block_sizes", "sm_scale", "interpret", "fp32_dot"))
def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_indices: jax.Array,
                    lengths: jax.Array, *, block_sizes: BlockSizes, sm_scale: float | None = None,
                    interpret: bool = False, fp32_dot: str = "auto") -> jax.Array:
    """Plain split-KV paged decode attention (no sharing), FlashDecoding-style (Pallas kernels).

    Args:
      q: [B, num_q_heads, head_dim].
      k_pages: [num_kv_heads, total_num_pages, page_size, head_dim].
      v_pages: [num_kv_heads, total_num_pages, page_size, head_dim].
      page_indices: i32[B, pages_per_sequence] physical pages of each request (padded here to
        a multiple of `block_sizes.split_pages`).
      lengths: i32[B] tokens of each request (0 for a padding request: zeros out).
      block_sizes: `BlockSizes` (static); uses split_pages, pages_per_compute_block, num_warps,
        num_stages.
      sm_scale: softmax scale, default 1/sqrt(head_dim).
      interpret: run the kernels in the Pallas interpreter (CPU tests).
      fp32_dot: as in `shared_prefix_attention`.

    Returns:
      [B, num_q_heads, head_dim] in q's dtype.
    """
    _validate(q, k_pages, v_pages, block_sizes, interpret)
    precision = _dot_precision(fp32_dot, k_pages.dtype, interpret)
    b, hq, d = q.shape
    ps = k_pages.shape[2]
    pp = page_indices.shape[1]
    if page_indices.shape[0] != b or lengths.shape != (b,):
        raise ValueError(f"page_indices {page_indices.shape} / lengths {lengths.shape} do not fit "
                         f"q {q.shape}")
    page_lens = jnp.clip(lengths[:, None] - ps * jnp.arange(pp, dtype=jnp.int32)[None, :], 0, ps)
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    q_pad, g = _queries(q, k_pages)
    o_pr, lse_pr = _private_partials(q_pad, k_pages, v_pages, page_indices.astype(jnp.int32),
                                     page_lens.astype(jnp.int32), block_sizes=block_sizes,
                                     sm_scale=scale, interpret=interpret, precision=precision)
    out = _merge(None, None, None, o_pr, lse_pr, gm=_pow2_at_least(g, 1), out_dtype=q.dtype,
                 block_sizes=block_sizes, interpret=interpret)
    return out[:, :, :g].reshape(b, hq, d)
