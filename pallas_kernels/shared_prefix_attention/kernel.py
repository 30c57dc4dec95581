"""Shared-prefix decode attention as Pallas kernels (GPU, Triton backend; `interpret=True` on CPU).

Same algorithm as `xla.py`, in three launches:

1. Shared items, grid (W, Hkv): one program per (KV chunk, KV head) loads the chunk's pages
   ONCE and multiplies them with the stacked queries of every request in its query block
   ([Qb x G rows, D] padded to a power of two >= 16 for Triton's dot; the program gathers the
   rows itself), with an online softmax over `pages_per_compute_block`-page tiles. Writes a
   partial (output, LSE) per query row. Tiled by `BlockSizes.items`.
2. Private pages, grid (B, S, Hkv): split-KV paged decode ("FlashDecoding") of what each
   request does not share; one partial per (request, split, KV head). This launch alone is
   `paged_attention`, the plain fallback. Tiled by `BlockSizes.split`; with `min_programs` it
   takes more, shorter splits when the batch is small.
3. Merge, grid (B, Hkv): each program folds its request's private partials and the shared
   partials listed in `merge_rows` by log-sum-exp, reading both where the launches wrote them.
   Tiled by `BlockSizes.merge`.

So between the launches XLA only reshapes the queries (tens of KB). Programs whose pages are
all padding run no KV loop and write an empty partial (LSE = -inf), so padded buckets cost
almost nothing. Triton needs power-of-two tiles of >= 16 tokens: `head_dim`, the page size and
the tiles are validated before anything is traced.

fp32 products (`precision`, see `config.PRECISIONS`): "tf32x3" (default) splits each operand
into a TF32 high and low part and runs three tensor-core products, fp32 accuracy; "tf32" is one
TF32 product (~1e-3 relative); "ieee" runs on the FMA units. The interpreter computes IEEE fp32
(XLA:CPU has no TF32) whatever the setting; bf16 inputs use bf16 products either way.

File order follows jax's ragged_paged_attention: input validation, kernel bodies, launches,
public jitted wrappers.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxsys.pallas_kernels.shapes import pow2_bucket

from .balancer import SharedPrefixStep
from .config import DEFAULT_PRECISION, PRECISIONS, BlockSizes, ItemsLaunch, MergeLaunch, SplitLaunch
from .validation import check_paged_inputs, check_shared_prefix_inputs

__all__ = ["shared_prefix_attention", "paged_attention", "Launches", "launches", "item_rows"]

# Finite "minus infinity" for running maxima: exp(MASK - finite) == 0 without inf - inf NaNs.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_MIN_DOT = 16  # Triton's smallest dot tile
_FP32_DOTS = {"ieee": lax.Precision.HIGHEST, "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
              "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32}


def _dot_precision(precision: str, dtype, interpret: bool):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if jnp.dtype(dtype) != jnp.float32:
        return lax.Precision.HIGHEST  # bf16/fp16 operands: exact products, fp32 accumulation
    if interpret:  # XLA:CPU computes every fp32 dot in IEEE fp32
        return _FP32_DOTS["ieee"]
    return _FP32_DOTS[precision]


# -- input validation (what Triton adds to `validation.py`) --------------------------------------


def _check_triton(k_pages, head_dim: int, launches: tuple, interpret: bool) -> None:
    """Triton's constraints on the cache and the launches' tiles; the interpreter has none."""
    if interpret:
        return
    ps = k_pages.shape[2]
    for name, n in (("head_dim", head_dim), ("page_size", ps)):
        if n & (n - 1):
            raise ValueError(f"{name}={n} must be a power of two for the Triton kernel")
    if head_dim < _MIN_DOT:
        raise ValueError(f"head_dim={head_dim} must be >= {_MIN_DOT} for the Triton kernel")
    for launch in launches:
        if launch.pages_per_compute_block * ps < _MIN_DOT:
            raise ValueError(f"{type(launch).__name__}.pages_per_compute_block * page_size = "
                             f"{launch.pages_per_compute_block * ps} must be >= {_MIN_DOT} for the Triton kernel")
    if k_pages.size >= 2**31:
        # Pallas' Triton lowering computes element offsets in int32: a larger cache would wrap
        # around and read the wrong pages silently.
        raise ValueError(f"k/v_pages hold {k_pages.size} elements per layer; the Triton kernel addresses at "
                         f"most 2**31 - 1: use fewer pages per layer")


def _check_step_tiles(step: SharedPrefixStep, k_pages, items: ItemsLaunch, interpret: bool) -> None:
    w, c = step.item_pages.shape
    ppcb = min(items.pages_per_compute_block, c)
    if w and c % ppcb:
        raise ValueError(f"the step's chunk pages ({c}) must be a multiple of pages_per_compute_block ({ppcb})")
    if w and not interpret and ppcb * k_pages.shape[2] < _MIN_DOT:
        raise ValueError(f"the step's chunk pages ({c}) x page_size ({k_pages.shape[2]}) must give tiles of >= "
                         f"{_MIN_DOT} tokens for the Triton kernel")


# -- kernel bodies -------------------------------------------------------------------------------


def _attend(q, pages_ref, page_lens_ref, k_pages_ref, v_pages_ref, *, sm_scale: float,
            pages_per_compute_block: int, page_size: int, precision):
    """Attention of one program's query rows over one program's list of pages (one KV head).

    q: [rows, D] (loaded); pages_ref, page_lens_ref: i32[n_pages] (valid pages first, then
    padding with length 0); k/v_pages_ref: [NP, ps, D] (this KV head), or [NP * ps, D] (the
    same memory as token rows, `flat_kv`: a tile is then one 2D gather of token rows). Returns
    the partial: o f32[rows, D] (normalized) and lse f32[rows] (-inf for a row with no keys).

    The page table is read once, before the loop: each tile picks its pages from registers, so
    the only loads in the loop are the KV tiles, whose addresses depend on the loop index alone,
    and Triton's pipeliner can keep num_stages - 1 tiles in flight.
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

    def load(i):  # tile i: keys, values, and which tokens are valid
        pick = table_slot == i * ppcb + tile_page  # [ppcb, n_pages], one-hot rows
        pages = jnp.sum(jnp.where(pick, all_pages[None, :], 0), axis=1)
        lens = jnp.sum(jnp.where(pick, all_lens[None, :], 0), axis=1)
        valid = (in_page < lens[:, None]).reshape(block_k)
        if flat:
            tokens = (pages[:, None] * ps + in_page).reshape(block_k)
            return k_pages_ref[tokens], v_pages_ref[tokens], valid
        return k_pages_ref[pages].reshape(block_k, d), v_pages_ref[pages].reshape(block_k, d), valid

    def body(i, carry):
        o, m, l = carry
        k, v, valid = load(i)
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
    o, m, l = lax.fori_loop(0, lax.div(n_active + (ppcb - 1), ppcb), body, carry)
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
    return pow2_bucket(query_block * group + pow2_bucket(group) - group, _MIN_DOT)


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
    rows the kernel runs each item on, with `block_sizes.items.row_tiers`) and `full` (every item
    on all of its rows, row_tiers=1). computed / full is the launch's product work relative to
    untiered; useful / computed how much of it is not zero rows."""
    import numpy as np

    item_queries, page_lens = np.asarray(step.item_queries), np.asarray(step.item_page_lens)
    qb, b = item_queries.shape[1], np.asarray(step.private_pages).shape[0]
    rows = _item_rows(qb, group)
    tiers = _row_tiers(rows, block_sizes.items.row_tiers)
    tokens = page_lens.sum(axis=1)
    filled = item_queries != b
    n_slots = np.max(np.where(filled, np.arange(1, qb + 1)[None, :], 0), axis=1, initial=0)
    tier_rows = np.asarray(tiers)[_tier_index(n_slots, group, pow2_bucket(group), tiers, xp=np)]
    return {"useful": int((filled.sum(axis=1) * group * tokens).sum()), "computed": int((tier_rows * tokens).sum()),
            "full": int(rows * tokens.sum())}


def _item_kernel(pages_ref, page_lens_ref, queries_ref, q_ref, k_pages_ref, v_pages_ref, o_ref, lse_ref,
                 *, group: int, rows: int, slot_rows: int, row_tiers: int, **kw):
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
                  *, query_block=1, group=1, partials_per_step=1):
    """LSE-merge one request's partials for one KV head.

    merge_rows_ref: i32[M] shared partials as `item * query_block + slot` (>= W * query_block:
    padding, skipped); o_sh_ref: f32[W, rows, D], lse_sh_ref: f32[W, rows]: the shared launch's
    output as it wrote it, slot s of an item in rows [s * group, s * group + Gm); o_pr_ref:
    f32[S, Gp, D], lse_pr_ref: f32[S, Gp] (first Gm rows used); out_ref: [Gm, D]; lse_out_ref
    (optional): f32[Gm]. Rows past `group` (Gm > G) are another slot's: the caller drops them.
    partials_per_step (a power of two): partials folded per step; > 1 loads that many private
    partials with one [K, Gm(, D)] load each (K = the largest power of two <= partials_per_step
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

    k_private = min(partials_per_step, n_split & -n_split)

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

    k_shared = min(partials_per_step, n_merge & -n_merge)  # (a pinned step's M need not be a power of two)

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


def _padded_private_pages(pp: int, page_size: int, split: SplitLaunch) -> int:
    """Private pages per request after padding: a multiple of pages_per_split, or a power of two
    below it, and at least one 16-token tile (Triton's smallest dot)."""
    pp = max(pp, split.pages_per_compute_block, -(-_MIN_DOT // page_size))
    sp = split.pages_per_split
    return pow2_bucket(pp) if pp <= sp else sp * -(-pp // sp)


def _split_pages(rows: int, pp: int, page_size: int, split: SplitLaunch) -> int:
    """Pages per split of the split-KV launch for `rows` (requests x KV heads) programs per
    split and `pp` padded pages per request (`_padded_private_pages`).

    `pages_per_split`, halved while the launch has fewer than `min_programs` programs, down to
    one compute tile (`pages_per_compute_block` pages and 16 tokens). Powers of two all, so the
    split still divides `pp`.
    """
    sp = min(split.pages_per_split, pp)
    floor = max(split.pages_per_compute_block, -(-_MIN_DOT // page_size))
    while sp // 2 >= floor and rows * (pp // sp) < split.min_programs:
        sp //= 2
    return sp


def _compiler_params(launch: ItemsLaunch | SplitLaunch | MergeLaunch):
    return plgpu.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)


def _kv_operands(k_pages, v_pages, flat: bool, head):
    """The caches as a launch reads them and their BlockSpecs (one KV head's pages per program):
    [Hkv, NP, ps, D], or when `flat` [Hkv, NP * ps, D] (a reshape of contiguous memory, no
    copy). head: the grid indices -> the program's KV head."""
    if flat:
        hkv, n, ps, d = k_pages.shape
        k_pages, v_pages = k_pages.reshape(hkv, n * ps, d), v_pages.reshape(hkv, n * ps, d)
    rest = (0,) * (k_pages.ndim - 1)
    spec = pl.BlockSpec((None,) + k_pages.shape[1:], lambda *idx: (head(*idx),) + rest)
    return [k_pages, v_pages], [spec, spec]


def _private_partials(q_bhgd, k_pages, v_pages, pages, page_lens, *, split: SplitLaunch, sm_scale,
                      interpret, precision):
    """q_bhgd: [B, Hkv, Gp, D] -> o f32[B, S, Hkv, Gp, D], lse f32[B, S, Hkv, Gp]."""
    b, hkv, gp, d = q_bhgd.shape
    ps = k_pages.shape[2]
    pp = _padded_private_pages(pages.shape[1], ps, split)
    if pp > pages.shape[1]:  # padding pages have length 0: never loaded
        pad = ((0, 0), (0, pp - pages.shape[1]))
        pages, page_lens = jnp.pad(pages, pad), jnp.pad(page_lens, pad)
    sp = _split_pages(b * hkv, pp, ps, split)
    n_split = pp // sp
    kernel = functools.partial(_split_kernel, sm_scale=sm_scale, pages_per_compute_block=min(split.pages_per_compute_block, sp),
                               page_size=ps, precision=precision)
    kv, kv_specs = _kv_operands(k_pages, v_pages, split.flat_kv, lambda i, s, h: h)
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
        compiler_params=_compiler_params(split),
        interpret=interpret,
        name="shared_prefix_private_pages",
    )(pages, page_lens, q_bhgd, *kv)


def _shared_partials(q_bhgd, k_pages, v_pages, step: SharedPrefixStep, *, g, items: ItemsLaunch,
                     sm_scale, interpret, precision):
    """Shared items. Returns o f32[W, Hkv, rows, D], lse f32[W, Hkv, rows]: slot s of item w in
    rows [s * G, s * G + Gm) (Gm = G padded to a power of two; `rows` leaves room for the last
    slot's Gm rows), read in place by the merge."""
    b, hkv, _, d = q_bhgd.shape
    w, c = step.item_pages.shape
    qb = step.item_queries.shape[1]
    rows = _item_rows(qb, g)
    # [Hkv, (B + 1) * G, D]: request b's query heads in rows [b * G, b * G + G), then G zero rows
    q_rows = jnp.pad(jnp.transpose(q_bhgd[:, :, :g], (1, 0, 2, 3)), ((0, 0), (0, 1), (0, 0), (0, 0)))
    q_rows = q_rows.reshape(hkv, (b + 1) * g, d)
    # Triton blocks are powers of two: extra slots hold request B (zeros), as empty slots do
    queries = jnp.pad(step.item_queries, ((0, 0), (0, pow2_bucket(qb) - qb)), constant_values=b)
    kernel = functools.partial(_item_kernel, group=g, rows=rows, slot_rows=pow2_bucket(g), row_tiers=items.row_tiers,
                               sm_scale=sm_scale, pages_per_compute_block=min(items.pages_per_compute_block, c),
                               page_size=k_pages.shape[2], precision=precision)
    kv, kv_specs = _kv_operands(k_pages, v_pages, items.flat_kv, lambda i, h: h)
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
        compiler_params=_compiler_params(items),
        interpret=interpret,
        name="shared_prefix_items",
    )(step.item_pages, step.item_page_lens, queries, q_rows, *kv)


def _merge(merge_rows, o_sh, lse_sh, o_pr, lse_pr, *, gm, out_dtype, merge: MergeLaunch, interpret,
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
                                   partials_per_step=merge.partials_per_step)
    else:
        kernel = functools.partial(_merge_kernel, None, None, None, partials_per_step=merge.partials_per_step)
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
        compiler_params=_compiler_params(merge),
        interpret=interpret,
        name="shared_prefix_merge",
    )(*args)


def _queries(q, k_pages):
    """q [B, Hq, D] -> ([B, Hkv, Gp, D] in the KV dtype, zero-padded to Gp >= 16 rows; G)."""
    b, hq, d = q.shape
    hkv = k_pages.shape[0]
    g = hq // hkv
    q_bhgd = q.astype(k_pages.dtype).reshape(b, hkv, g, d)
    return jnp.pad(q_bhgd, ((0, 0), (0, 0), (0, pow2_bucket(g, _MIN_DOT) - g), (0, 0))), g


class Launches(NamedTuple):
    """The launches of `shared_prefix_attention`, one function each (see `launches`).

    private_pages(q, k_pages, v_pages, step) -> (o f32[B, S, Hkv, Gp, D], lse f32[B, S, Hkv, Gp]):
      the split-KV launch over the step's private pages.
    items(q, k_pages, v_pages, step) -> (o f32[W, Hkv, rows, D], lse f32[W, Hkv, rows]): the
      shared-items launch.
    merge(private, items, step, *, out_dtype, return_lse) -> [B, Hkv, Gm, D] (and, return_lse,
      f32[B, Hkv, Gm]): the merge of both launches' partials (`items` None for a step without
      items).
    """

    private_pages: Callable
    items: Callable
    merge: Callable


def launches(*, block_sizes: BlockSizes, group: int, sm_scale: float, precision: str = DEFAULT_PRECISION,
             interpret: bool = False) -> Launches:
    """`shared_prefix_attention`'s launches as separate functions (not jitted), so a benchmark or
    profiler can time each alone; called in order they compute what it computes (tested).

    group: query heads per KV head (G); the other arguments as `shared_prefix_attention`'s.
    """

    def private_pages(q, k_pages, v_pages, step):
        precise = _dot_precision(precision, k_pages.dtype, interpret)
        return _private_partials(_queries(q, k_pages)[0], k_pages, v_pages, step.private_pages, step.private_page_lens,
                                 split=block_sizes.split, sm_scale=sm_scale, interpret=interpret, precision=precise)

    def items(q, k_pages, v_pages, step):
        precise = _dot_precision(precision, k_pages.dtype, interpret)
        return _shared_partials(_queries(q, k_pages)[0], k_pages, v_pages, step, g=group, items=block_sizes.items,
                                sm_scale=sm_scale, interpret=interpret, precision=precise)

    def merge(private, shared, step, *, out_dtype=jnp.float32, return_lse=False):
        kw = dict(gm=pow2_bucket(group), out_dtype=out_dtype, merge=block_sizes.merge, interpret=interpret,
                  return_lse=return_lse)
        if shared is None:
            return _merge(None, None, None, *private, **kw)
        return _merge(step.merge_rows, *shared, *private, query_block=step.item_queries.shape[1], group=group, **kw)

    return Launches(private_pages=private_pages, items=items, merge=merge)


# -- public wrappers -----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("block_sizes", "sm_scale", "interpret", "return_lse", "precision"))
def shared_prefix_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, step: SharedPrefixStep, *,
                            block_sizes: BlockSizes, sm_scale: float | None = None, interpret: bool = False,
                            return_lse: bool = False, precision: str = DEFAULT_PRECISION):
    """Decode attention over a prefix tree, each shared KV chunk loaded once (Pallas kernels).

    Args:
      q: [B, num_q_heads, head_dim] the step's query token of each request (B = padded batch,
        `step.private_pages.shape[0]`); query head h attends KV head h // G, G =
        num_q_heads // num_kv_heads.
      k_pages: [num_kv_heads, total_num_pages, page_size, head_dim] one layer's key cache.
      v_pages: [num_kv_heads, total_num_pages, page_size, head_dim] one layer's value cache.
      step: `SharedPrefixStep` from `plan_step` (int32 arrays):
        item_pages i32[W, C], item_page_lens i32[W, C], item_queries i32[W, Qb],
        private_pages i32[B, Pp], private_page_lens i32[B, Pp], merge_rows i32[B, M].
        W = 0 runs plain paged decode.
      block_sizes: `BlockSizes` (static): each launch's tile, warps and stages (C and Qb come
        from the step's shapes).
      sm_scale: softmax scale, default 1/sqrt(head_dim).
      interpret: run the kernels in the Pallas interpreter (CPU tests).
      return_lse: also return the log-sum-exp of the scaled scores, f32[B, num_q_heads] (-inf
        for a request with no KV), so a caller can merge in more keys (e.g. the new token).
      precision: how fp32 dots are computed when compiled, one of `PRECISIONS`: "tf32x3"
        (default, fp32 accuracy), "tf32" (one TF32 product, ~1e-3 relative) or "ieee".

    Returns:
      [B, num_q_heads, head_dim] in q's dtype; padding requests (no pages) get zeros.
      With return_lse: (that, lse).
    """
    check_shared_prefix_inputs(q, k_pages, v_pages, step, block_sizes)
    _check_triton(k_pages, q.shape[2], (block_sizes.items, block_sizes.split), interpret)
    _check_step_tiles(step, k_pages, block_sizes.items, interpret)
    b, hq, d = q.shape
    g = hq // k_pages.shape[0]
    run = launches(block_sizes=block_sizes, group=g, sm_scale=1.0 / math.sqrt(d) if sm_scale is None else sm_scale,
                   precision=precision, interpret=interpret)
    private = run.private_pages(q, k_pages, v_pages, step)
    shared = run.items(q, k_pages, v_pages, step) if step.item_pages.shape[0] and step.merge_rows.shape[1] else None
    out = run.merge(private, shared, step, out_dtype=q.dtype, return_lse=return_lse)
    if return_lse:
        out, lse = out
        return out[:, :, :g].reshape(b, hq, d), lse[:, :, :g].reshape(b, hq)
    return out[:, :, :g].reshape(b, hq, d)


@functools.partial(jax.jit, static_argnames=("block_sizes", "sm_scale", "interpret", "precision"))
def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_indices: jax.Array,
                    lengths: jax.Array, *, block_sizes: BlockSizes, sm_scale: float | None = None,
                    interpret: bool = False, precision: str = DEFAULT_PRECISION) -> jax.Array:
    """Plain split-KV paged decode attention (no sharing), FlashDecoding-style (Pallas kernels).

    Args:
      q: [B, num_q_heads, head_dim].
      k_pages: [num_kv_heads, total_num_pages, page_size, head_dim].
      v_pages: [num_kv_heads, total_num_pages, page_size, head_dim].
      page_indices: i32[B, pages_per_sequence] physical pages of each request (padded here to
        a multiple of `block_sizes.split.pages_per_split`).
      lengths: i32[B] tokens of each request (0 for a padding request: zeros out).
      block_sizes: `BlockSizes` (static); uses `split` and `merge`.
      sm_scale: softmax scale, default 1/sqrt(head_dim).
      interpret: run the kernels in the Pallas interpreter (CPU tests).
      precision: as in `shared_prefix_attention`.

    Returns:
      [B, num_q_heads, head_dim] in q's dtype.
    """
    check_paged_inputs(q, k_pages, v_pages, page_indices, lengths, block_sizes)
    _check_triton(k_pages, q.shape[2], (block_sizes.split,), interpret)
    b, hq, d = q.shape
    ps = k_pages.shape[2]
    pp = page_indices.shape[1]
    page_lens = jnp.clip(lengths[:, None] - ps * jnp.arange(pp, dtype=jnp.int32)[None, :], 0, ps)
    q_pad, g = _queries(q, k_pages)
    private = _private_partials(q_pad, k_pages, v_pages, page_indices.astype(jnp.int32), page_lens.astype(jnp.int32),
                                split=block_sizes.split, sm_scale=1.0 / math.sqrt(d) if sm_scale is None else sm_scale,
                                interpret=interpret, precision=_dot_precision(precision, k_pages.dtype, interpret))
    out = _merge(None, None, None, *private, gm=pow2_bucket(g), out_dtype=q.dtype, merge=block_sizes.merge,
                 interpret=interpret)
    return out[:, :, :g].reshape(b, hq, d)
