"""Shared-prefix decode attention: the XLA path and the Pallas kernels against the float32
reference over random prefix trees (the balancer's own properties: test_shared_prefix_balancer.py).

The Pallas kernels run in the interpreter on CPU. `make gpu-check` sets
JAXSYS_PALLAS_COMPILED=1 (and JAX_PLATFORMS=cuda), which compiles them for real: the same
sweeps then check the Triton kernels, and the `gpu`-marked tests add model-sized shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.pallas_kernels.shared_prefix_attention import (
    BlockSizes,
    CostModel,
    PrefixTree,
    StepShape,
    get_block_sizes,
    get_cost_model,
    paged_attention,
    paged_attention_reference,
    paged_attention_xla,
    plain_step,
    plan_step,
    shared_prefix_attention,
    shared_prefix_attention_reference,
    shared_prefix_attention_xla,
)
from jaxsys.pallas_kernels.shared_prefix_attention.kernel import (_queries, _row_tiers, _shared_partials,
                                                                  _split_pages, item_rows)

INTERPRET = os.environ.get("JAXSYS_PALLAS_COMPILED", "0") != "1"

# fp32: every path computes in fp32; differences are summation order only.
FP32_TOL = 1e-5
# bf16: q, k, v are the same bf16 numbers in every path (the reference upcasts them), and
# scores, softmax statistics and accumulators are fp32. Two roundings remain: probabilities are
# rounded to bf16 before the PV product (unit roundoff u = 2**-8 per weight, so the normalized
# output moves by at most u * max|v|), and the output is rounded to bf16 (u * |o|). Hence
# |out - ref| <= u * (max|v| + |ref|), checked elementwise, plus FP32_TOL for the fp32 part.
BF16_U = 2.0**-8

EVERY_FORCE = (None, "share", "plain")


def _tol_check(out, ref, v, dtype):
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(ref)
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out))
    if dtype == jnp.float32:
        np.testing.assert_allclose(out, ref, atol=FP32_TOL, rtol=FP32_TOL)
    else:
        vmax = float(np.max(np.abs(np.asarray(jnp.asarray(v, jnp.float32)))))
        bound = BF16_U * (vmax + np.abs(ref)) + FP32_TOL
        err = np.abs(out - ref)
        assert np.all(err <= bound), f"bf16 error {err.max()} exceeds bound at {np.argmax(err - bound)}"


# -- random prefix trees -------------------------------------------------------------------------


def make_tree(rng, *, depth, fanout, page_size, node_tokens=(1, 40), suffix_tokens=(1, 20),
              requests_at_internal=0, spare_pages=5):
    """A full `fanout`-ary tree of `depth` levels below the root, a private suffix node per
    leaf (one request each), optionally extra requests that end at internal nodes.
    Pages are a random permutation of a pool with spare (unused) pages."""
    parent, lens = [-1], [int(rng.integers(*node_tokens))]
    frontier = [0]
    internal = [0]
    for _ in range(depth):
        nxt = []
        for p in frontier:
            for _ in range(fanout):
                parent.append(p)
                lens.append(int(rng.integers(*node_tokens)))
                nxt.append(len(parent) - 1)
        frontier = nxt
        internal += nxt
    requests = []
    for leaf in frontier:
        parent.append(leaf)
        lens.append(int(rng.integers(*suffix_tokens)))
        requests.append(len(parent) - 1)
    for _ in range(requests_at_internal):
        requests.append(int(rng.choice(internal)))
    n_pages = [-(-n // page_size) for n in lens]
    pool = rng.permutation(sum(n_pages) + spare_pages)
    offsets = np.cumsum([0] + n_pages)
    pages = tuple(pool[offsets[i]:offsets[i + 1]] for i in range(len(lens)))
    return PrefixTree(page_size=page_size, node_parent=np.array(parent), node_pages=pages,
                      node_lens=np.array(lens), request_nodes=np.array(requests)), len(pool)


def make_inputs(rng, *, num_requests, total_pages, num_kv_heads, group, head_dim, page_size,
                dtype):
    hq = num_kv_heads * group
    q = rng.standard_normal((num_requests, hq, head_dim)).astype(np.float32)
    k = rng.standard_normal((num_kv_heads, total_pages, page_size, head_dim)).astype(np.float32)
    v = rng.uniform(-2, 2, (num_kv_heads, total_pages, page_size, head_dim)).astype(np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def kernel_block_sizes(page_size):
    """Kernel-valid tiles for a page size: 16-token compute tiles, chunks/splits of 2 tiles."""
    ppcb = max(1, 16 // page_size)
    return BlockSizes(chunk_pages=2 * ppcb, query_block=2, split_pages=2 * ppcb,
                      pages_per_compute_block=ppcb)


ALWAYS_SHARE = CostModel(shared_token_cost=((1, 1e-3),), source="tests: share every node")


# Named cases: (depth, fanout, num_kv_heads, group, page_size, dtype, extra)
CASES = {
    "fan4_gqa4": dict(depth=1, fanout=4, num_kv_heads=2, group=4, page_size=4),
    "deep3_fan2_gqa8": dict(depth=3, fanout=2, num_kv_heads=1, group=8, page_size=4),
    "fan3_mha_page8": dict(depth=2, fanout=3, num_kv_heads=2, group=1, page_size=8),
    "fan2_gqa3_page16": dict(depth=2, fanout=2, num_kv_heads=2, group=3, page_size=16),
    "chain_no_sharing": dict(depth=3, fanout=1, num_kv_heads=2, group=4, page_size=4),
    "single_request": dict(depth=0, fanout=1, num_kv_heads=2, group=2, page_size=4),
    "internal_requests_padded": dict(depth=2, fanout=2, num_kv_heads=2, group=2, page_size=4,
                                     requests_at_internal=3, pad_requests=3),
    "long_nodes_short_suffix": dict(depth=1, fanout=5, num_kv_heads=1, group=4, page_size=4,
                                    node_tokens=(60, 90), suffix_tokens=(1, 3)),
}
BF16_CASES = ("fan4_gqa4", "deep3_fan2_gqa8", "internal_requests_padded")


def _setup(name, dtype, seed=0):
    c = dict(CASES[name])
    pad = c.pop("pad_requests", 0)
    kv_heads, group = c.pop("num_kv_heads"), c.pop("group")
    rng = np.random.default_rng(seed + sum(map(ord, name)))
    tree, total_pages = make_tree(rng, **c)
    q, k, v = make_inputs(rng, num_requests=tree.num_requests + pad, total_pages=total_pages,
                          num_kv_heads=kv_heads, group=group, head_dim=16,
                          page_size=c["page_size"], dtype=dtype)
    return tree, q, k, v


def _plan(tree, q, force, block_sizes):
    plan = plan_step(tree, block_sizes=block_sizes, cost_model=ALWAYS_SHARE, force=force,
                     min_requests=q.shape[0])
    b = plan.shape.num_requests
    q = jnp.concatenate([q, jnp.zeros((b - q.shape[0],) + q.shape[1:], q.dtype)]) if b > q.shape[0] else q
    return plan, q


def _reference(tree, q, k, v):
    return np.asarray(shared_prefix_attention_reference(q, k, v, tree))


@pytest.mark.parametrize("force", EVERY_FORCE)
@pytest.mark.parametrize("name", list(CASES))
def test_xla_matches_reference(name, force):
    tree, q, k, v = _setup(name, jnp.float32)
    bs = kernel_block_sizes(tree.page_size)
    plan, q = _plan(tree, q, force, bs)
    if force == "plain" or (force == "share" and name in ("chain_no_sharing", "single_request")):
        assert not plan.use_sharing
    out = shared_prefix_attention_xla(q, k, v, plan.step, block_sizes=bs)
    _tol_check(out, _reference(tree, q, k, v), v, jnp.float32)


@pytest.mark.parametrize("name", BF16_CASES)
def test_xla_matches_reference_bf16(name):
    tree, q, k, v = _setup(name, jnp.bfloat16)
    bs = kernel_block_sizes(tree.page_size)
    plan, q = _plan(tree, q, "share", bs)
    out = shared_prefix_attention_xla(q, k, v, plan.step, block_sizes=bs)
    assert out.dtype == jnp.bfloat16
    _tol_check(out, _reference(tree, q, k, v), v, jnp.bfloat16)


@pytest.mark.parametrize("name,force", [(n, "share") for n in CASES] + [("fan4_gqa4", "plain"),
                                                                         ("internal_requests_padded", "plain")])
def test_kernel_matches_reference(name, force):
    tree, q, k, v = _setup(name, jnp.float32)
    bs = kernel_block_sizes(tree.page_size)
    plan, q = _plan(tree, q, force, bs)
    out = shared_prefix_attention(q, k, v, plan.step, block_sizes=bs, interpret=INTERPRET)
    _tol_check(out, _reference(tree, q, k, v), v, jnp.float32)


@pytest.mark.parametrize("name,force,split_tile", [("long_nodes_short_suffix", "plain", 1),
                                                   ("long_nodes_short_suffix", "share", 2),
                                                   ("chain_no_sharing", None, 1)])
def test_kernel_with_more_splits_matches_reference(name, force, split_tile):
    """`min_split_programs` halves the split-KV launch's split down to one compute tile (here
    from 32 pages to 4, or to 8 with the split launch's own 8-page tile): more partials per
    request, merged by LSE, the same attention."""
    tree, q, k, v = _setup(name, jnp.float32)
    base = kernel_block_sizes(tree.page_size)
    bs = dataclasses.replace(base, split_pages=8 * base.split_pages, min_split_programs=10**6,
                             split_pages_per_compute_block=split_tile * base.pages_per_compute_block)
    plan, q = _plan(tree, q, force, bs)
    out = shared_prefix_attention(q, k, v, plan.step, block_sizes=bs, interpret=INTERPRET)
    _tol_check(out, _reference(tree, q, k, v), v, jnp.float32)


@pytest.mark.parametrize("name,force", [("long_nodes_short_suffix", "share"),
                                        ("internal_requests_padded", "share"),
                                        ("fan4_gqa4", "plain")])
def test_kernel_with_prefetch_matches_reference(name, force):
    """`prefetch`: the next tile's loads ride in the loop carry; padding programs and requests
    (no pages) still load nothing and get empty partials."""
    tree, q, k, v = _setup(name, jnp.float32)
    bs = dataclasses.replace(kernel_block_sizes(tree.page_size), prefetch=1)
    plan, q = _plan(tree, q, force, bs)
    out = shared_prefix_attention(q, k, v, plan.step, block_sizes=bs, interpret=INTERPRET)
    _tol_check(out, _reference(tree, q, k, v), v, jnp.float32)


@pytest.mark.parametrize("name,merge_block", [("deep3_fan2_gqa8", 2), ("internal_requests_padded", 4),
                                              ("long_nodes_short_suffix", 64)])
def test_kernel_with_block_merge_matches_reference(name, merge_block):
    """`merge_block`: the merge gathers that many shared partials per step (padding merge rows
    and empty partials weigh 0; a block wider than the step's merge rows is cut to them)."""
    tree, q, k, v = _setup(name, jnp.float32)
    bs = dataclasses.replace(kernel_block_sizes(tree.page_size), merge_block=merge_block)
    plan, q = _plan(tree, q, "share", bs)
    assert plan.use_sharing and plan.step.merge_rows.shape[1] >= 2
    out = shared_prefix_attention(q, k, v, plan.step, block_sizes=bs, interpret=INTERPRET)
    _tol_check(out, _reference(tree, q, k, v), v, jnp.float32)


@pytest.mark.parametrize("pages_per_seq,merge_block", [(16, 4), (32, 2), (12, 4), (9, 8)])
def test_kernel_with_block_merge_of_private_partials_matches_reference(pages_per_seq, merge_block):
    """`merge_block` also folds a request's private partials that many at a time: 4 splits of 4
    pages 4 at a time, 8 two at a time; 3 splits one at a time (the block must divide them)."""
    rng = np.random.default_rng(pages_per_seq)
    page_size, split = 4, 4
    lengths = np.array([0, 1, page_size * pages_per_seq, 5 * page_size + 3, page_size * pages_per_seq - 2], np.int32)
    page_indices = np.stack([rng.permutation(64)[:pages_per_seq] for _ in lengths]).astype(np.int32)
    q, k, v = make_inputs(rng, num_requests=len(lengths), total_pages=64, num_kv_heads=2,
                          group=4, head_dim=16, page_size=page_size, dtype=jnp.float32)
    bs = BlockSizes(chunk_pages=split, query_block=1, split_pages=split, pages_per_compute_block=4,
                    merge_block=merge_block)
    out = paged_attention(q, k, v, jnp.asarray(page_indices), jnp.asarray(lengths), block_sizes=bs,
                          interpret=INTERPRET)
    _tol_check(out, np.asarray(paged_attention_reference(q, k, v, page_indices, lengths)), v, jnp.float32)


@pytest.mark.parametrize("name,force,prefetch", [("fan2_gqa3_page16", "share", 0), ("deep3_fan2_gqa8", "share", 1),
                                                  ("internal_requests_padded", "plain", 0)])
@pytest.mark.parametrize("flat,split_flat", [(1, 1), (1, 0), (0, 1)])
def test_kernel_with_flat_kv_tiles_matches_reference(name, force, prefetch, flat, split_flat):
    """`flat_kv` / `split_flat_kv`: a launch reads the cache as [pages x page_size, D] token rows
    and gathers each tile as one 2D block; the same attention (padding pages never loaded)."""
    tree, q, k, v = _setup(name, jnp.float32)
    bs = dataclasses.replace(kernel_block_sizes(tree.page_size), flat_kv=flat, split_flat_kv=split_flat,
                             prefetch=prefetch)
    plan, q = _plan(tree, q, force, bs)
    out = shared_prefix_attention(q, k, v, plan.step, block_sizes=bs, interpret=INTERPRET)
    _tol_check(out, _reference(tree, q, k, v), v, jnp.float32)


def test_row_tiers():
    assert _row_tiers(128, 1) == [128]
    assert _row_tiers(128, 3) == [32, 64, 128]
    assert _row_tiers(32, 4) == [16, 32]  # never below Triton's 16-row dot


@pytest.mark.parametrize("name,group,query_block", [("deep3_fan2_gqa8", 8, 8), ("fan3_gqa5", 5, 8)])
def test_kernel_with_row_tiers_matches_reference(name, group, query_block):
    """`row_tiers`: an item runs on the fewest rows that hold its requests. Nodes shared by 8, 4
    and 2 requests (G = 8: 64, 32 and 16 rows), or, with G = 5 (Gm = 8), by 9 = 8 + 1 and 3: a
    3-request item needs rows 0..17 (the last slot's Gm rows from 10), so it takes 32 rows, not
    16. Rows past an item's tier are never written (NaN in the interpreter): the merge must not
    read them."""
    if name == "fan3_gqa5":
        rng = np.random.default_rng(7)
        tree, total_pages = make_tree(rng, depth=2, fanout=3, page_size=4)
        q, k, v = make_inputs(rng, num_requests=tree.num_requests, total_pages=total_pages,
                              num_kv_heads=2, group=group, head_dim=16, page_size=4, dtype=jnp.float32)
    else:
        tree, q, k, v = _setup(name, jnp.float32)
    bs = dataclasses.replace(kernel_block_sizes(tree.page_size), query_block=query_block, row_tiers=4)
    plan, q = _plan(tree, q, "share", bs)
    ref = _reference(tree, q, k, v)
    _tol_check(shared_prefix_attention(q, k, v, plan.step, block_sizes=bs, interpret=INTERPRET), ref, v,
               jnp.float32)
    if INTERPRET:  # the tiers are used (some rows unwritten), and cover every row the merge reads
        q_pad, g = _queries(q, k)
        _, lse_sh = _shared_partials(q_pad, k, v, jax.tree.map(jnp.asarray, plan.step), g=g, block_sizes=bs,
                                     sm_scale=1.0, interpret=True, precision=None)
        lse_sh = np.asarray(lse_sh)  # [W, Hkv, rows]
        gm = 1 << (group - 1).bit_length()
        assert np.isnan(lse_sh).any()
        tiers = set()
        for row in plan.step.merge_rows[plan.step.merge_rows < lse_sh.shape[0] * query_block]:
            item, slot = divmod(int(row), query_block)
            assert not np.isnan(lse_sh[item, :, slot * group:slot * group + gm]).any()
            tiers.add(int((~np.isnan(lse_sh[item, 0])).sum()))
        assert len(tiers) >= 2
    # the host-side account of the same tiers (benchmark JSON): each item's rows x its tokens
    acct = item_rows(plan.step, group, bs)
    tokens = plan.step.item_page_lens.sum(axis=1)
    filled = (plan.step.item_queries != plan.step.private_pages.shape[0]).sum(axis=1)
    assert acct["useful"] == int((filled * group * tokens).sum()) <= acct["computed"] < acct["full"]
    assert item_rows(plan.step, group, dataclasses.replace(bs, row_tiers=1))["computed"] == acct["full"]
    if INTERPRET:
        assert acct["computed"] == int(((~np.isnan(lse_sh[:, 0])).sum(axis=1) * tokens).sum())


@pytest.mark.parametrize("name", ["long_nodes_short_suffix", "deep3_fan2_gqa8"])
def test_short_items_match_reference(name):
    """`min_shared_items`: shared nodes cut into items shorter than `chunk_pages` (the rest of each
    item padding, never loaded), more merge rows per request; the kernels, with a block merge,
    and the XLA path give the same attention."""
    tree, q, k, v = _setup(name, jnp.float32)
    base = kernel_block_sizes(tree.page_size)
    bs = dataclasses.replace(base, min_shared_items=10**6, merge_block=4)
    plan, q = _plan(tree, q, "share", bs)
    longer, _ = _plan(tree, q, "share", base)
    assert plan.step.item_pages.shape[0] > longer.step.item_pages.shape[0]
    ref = _reference(tree, q, k, v)
    _tol_check(shared_prefix_attention(q, k, v, plan.step, block_sizes=bs, interpret=INTERPRET), ref, v, jnp.float32)
    _tol_check(shared_prefix_attention_xla(q, k, v, plan.step, block_sizes=bs), ref, v, jnp.float32)


def test_kernel_merge_reads_odd_groups_in_place():
    """G = 5 query heads per KV head in items of 3 requests: the merge reads each request's Gm = 8
    rows where the shared launch wrote them (rows 10..17 for the last slot: past 3 x 5 = 15, so
    the launch must hold 32 rows, not 16)."""
    rng = np.random.default_rng(5)
    tree, total_pages = make_tree(rng, depth=1, fanout=6, page_size=4)
    q, k, v = make_inputs(rng, num_requests=tree.num_requests, total_pages=total_pages,
                          num_kv_heads=2, group=5, head_dim=16, page_size=4, dtype=jnp.float32)
    bs = dataclasses.replace(kernel_block_sizes(4), query_block=3)
    plan, q = _plan(tree, q, "share", bs)
    assert plan.step.item_queries.shape[1] == 3 and plan.use_sharing
    out = shared_prefix_attention(q, k, v, plan.step, block_sizes=bs, interpret=INTERPRET)
    _tol_check(out, _reference(tree, q, k, v), v, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_with_every_launch_option_matches_reference(dtype):
    """Prefetch, more and shorter splits with their own tile, a block merge, a non-power-of-two
    query block, row tiers and flat KV tiles, together, with return_lse: one configuration the
    GPU sweep may pick."""
    tree, q, k, v = _setup("internal_requests_padded", dtype)
    base = kernel_block_sizes(tree.page_size)
    bs = dataclasses.replace(base, query_block=3, split_pages=4 * base.split_pages, prefetch=1, merge_block=2,
                             min_split_programs=10**6, split_pages_per_compute_block=2 * base.pages_per_compute_block,
                             row_tiers=2, flat_kv=1, split_flat_kv=1)
    plan, q = _plan(tree, q, "share", bs)
    out, lse = shared_prefix_attention(q, k, v, plan.step, block_sizes=bs, interpret=INTERPRET, return_lse=True)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    _tol_check(out, _reference(tree, q, k, v), v, dtype)
    plain = shared_prefix_attention(q, k, v, plan.step, block_sizes=base, interpret=INTERPRET)
    _tol_check(out, plain.astype(jnp.float32), v, dtype)


def test_split_count_fills_the_launch():
    bs = BlockSizes(chunk_pages=64, query_block=16, split_pages=32, pages_per_compute_block=2)
    split = functools.partial(_split_pages, pp=64, page_size=16)
    assert split(32, block_sizes=bs) == 32  # min_split_programs=0: fixed
    more = dataclasses.replace(bs, min_split_programs=512)
    assert split(4 * 8, block_sizes=more) == 4  # 32 rows x 16 splits >= 512 > 32 x 8
    assert split(128 * 8, block_sizes=more) == 32  # already 2048 programs
    assert split(4 * 8, block_sizes=dataclasses.replace(bs, min_split_programs=513)) == 2
    assert split(1, block_sizes=more) == 2  # down to one tile of pages_per_compute_block pages
    assert _split_pages(1, 64, 4, more) == 4  # ... and 16 tokens: 4 pages of 4
    assert _split_pages(1, 8, 16, more) == 2  # never above the padded private pages
    with pytest.raises(ValueError, match="min_split_programs"):
        BlockSizes(chunk_pages=2, query_block=2, split_pages=2, min_split_programs=-1)


@pytest.mark.parametrize("name", BF16_CASES[:2])
def test_kernel_matches_reference_bf16(name):
    tree, q, k, v = _setup(name, jnp.bfloat16)
    bs = kernel_block_sizes(tree.page_size)
    plan, q = _plan(tree, q, "share", bs)
    out = shared_prefix_attention(q, k, v, plan.step, block_sizes=bs, interpret=INTERPRET)
    assert out.dtype == jnp.bfloat16
    _tol_check(out, _reference(tree, q, k, v), v, jnp.bfloat16)


def test_padding_requests_get_zeros():
    tree, q, k, v = _setup("internal_requests_padded", jnp.float32)
    bs = kernel_block_sizes(tree.page_size)
    plan, qp = _plan(tree, q, "share", bs)
    assert plan.shape.num_requests > tree.num_requests
    for out in (shared_prefix_attention_xla(qp, k, v, plan.step, block_sizes=bs),
                shared_prefix_attention(qp, k, v, plan.step, block_sizes=bs, interpret=INTERPRET)):
        np.testing.assert_array_equal(np.asarray(out[tree.num_requests:]), 0.0)


# -- plain paged decode (the fallback and the split-KV baseline) ----------------------------------


@pytest.mark.parametrize("page_size,group,split", [(4, 4, 2), (16, 1, 4), (8, 3, 1)])
@pytest.mark.parametrize("path", ["xla", "kernel"])
def test_paged_attention_matches_reference(page_size, group, split, path):
    rng = np.random.default_rng(page_size * 7 + group)
    num_pages, pages_per_seq = 64, 9  # not a multiple of the split: padded inside
    lengths = np.array([0, 1, page_size, page_size * pages_per_seq, 5 * page_size + 3], np.int32)
    page_indices = np.stack([rng.permutation(num_pages)[:pages_per_seq] for _ in lengths]).astype(np.int32)
    q, k, v = make_inputs(rng, num_requests=len(lengths), total_pages=num_pages, num_kv_heads=2,
                          group=group, head_dim=16, page_size=page_size, dtype=jnp.float32)
    ppcb = max(1, 16 // page_size)
    bs = BlockSizes(chunk_pages=ppcb, query_block=1, split_pages=max(split, ppcb),
                    pages_per_compute_block=ppcb)
    if path == "xla":
        out = paged_attention_xla(q, k, v, jnp.asarray(page_indices), jnp.asarray(lengths),
                                  block_sizes=BlockSizes(chunk_pages=1, query_block=1, split_pages=split))
    else:
        out = paged_attention(q, k, v, jnp.asarray(page_indices), jnp.asarray(lengths),
                              block_sizes=bs, interpret=INTERPRET)
    ref = np.asarray(paged_attention_reference(q, k, v, page_indices, lengths))
    _tol_check(out, ref, v, jnp.float32)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)  # zero-length request


def test_plain_step_equals_paged_attention():
    rng = np.random.default_rng(3)
    lengths = np.array([3, 17, 0, 8], np.int32)
    page_indices = rng.permutation(32)[:16].reshape(4, 4).astype(np.int32)
    q, k, v = make_inputs(rng, num_requests=4, total_pages=32, num_kv_heads=1, group=2,
                          head_dim=16, page_size=8, dtype=jnp.float32)
    bs = BlockSizes(chunk_pages=2, query_block=2, split_pages=2, pages_per_compute_block=2)
    step = plain_step(page_indices, lengths, 8, block_sizes=bs)
    a = shared_prefix_attention_xla(q, k, v, step, block_sizes=bs)
    b = paged_attention_xla(q, k, v, jnp.asarray(page_indices), jnp.asarray(lengths), block_sizes=bs)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=FP32_TOL, rtol=FP32_TOL)


# -- static shapes: one compiled function per step bucket ---------------------------------------


def test_same_bucket_does_not_recompile():
    bs = kernel_block_sizes(4)
    shape = StepShape(num_requests=8, num_items=32, private_pages=16, merge_slots=16)
    outs = []
    before = None
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        tree, _ = make_tree(rng, depth=1 + seed % 2, fanout=2, page_size=4, node_tokens=(1, 20),
                            spare_pages=5)
        q, k, v = make_inputs(rng, num_requests=8, total_pages=200, num_kv_heads=1, group=2,
                              head_dim=16, page_size=4, dtype=jnp.float32)
        plan = plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE, shape=shape)
        assert plan.shape == shape
        outs.append(shared_prefix_attention_xla(q, k, v, plan.step, block_sizes=bs))
        if before is None:
            before = shared_prefix_attention_xla._cache_size()
    assert shared_prefix_attention_xla._cache_size() == before


# -- model-sized shapes, compiled (GPU only) ------------------------------------------------------


def _on_gpu():
    return jax.devices()[0].platform == "gpu"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,fp32_dot", [(jnp.float32, "auto"), (jnp.float32, "ieee"),
                                            (jnp.float32, "tf32"), (jnp.bfloat16, "auto")])
def test_kernel_model_shapes_gpu(dtype, fp32_dot):
    """Model-sized shapes compiled; fp32 both accurate ways (3xTF32 tensor-core products, the
    default, and IEEE) within the fp32 tolerance. The opt-in single-TF32 mode rounds products
    to 10 mantissa bits: it is held to the bf16 bound (7 bits), which it must pass easily."""
    if not _on_gpu() or INTERPRET:
        pytest.skip("needs a GPU and JAXSYS_PALLAS_COMPILED=1 (make gpu-check)")
    rng = np.random.default_rng(0)
    ps = 16
    tree, total_pages = make_tree(rng, depth=2, fanout=4, page_size=ps, node_tokens=(200, 900),
                                  suffix_tokens=(1, 300))
    q, k, v = make_inputs(rng, num_requests=tree.num_requests, total_pages=total_pages,
                          num_kv_heads=8, group=4, head_dim=128, page_size=ps, dtype=dtype)
    bs = get_block_sizes("gpu", 4, 128, ps, jnp.dtype(dtype).name, fp32_dot)
    for force in EVERY_FORCE:
        plan = plan_step(tree, block_sizes=bs, cost_model=get_cost_model("gpu"), force=force)
        out = shared_prefix_attention(q, k, v, plan.step, block_sizes=bs, fp32_dot=fp32_dot)
        _tol_check(out, _reference(tree, q, k, v), v, jnp.bfloat16 if fp32_dot == "tf32" else dtype)


def test_fp32_dot_is_validated():
    tree, q, k, v = _setup("fan4_gqa4", jnp.float32)
    bs = kernel_block_sizes(tree.page_size)
    plan, q = _plan(tree, q, "share", bs)
    with pytest.raises(ValueError, match="fp32_dot"):
        shared_prefix_attention(q, k, v, plan.step, block_sizes=bs, interpret=True, fp32_dot="fp16")


def test_kernel_rejects_caches_past_int32_offsets():
    """The compiled kernels address pages with int32 offsets: a cache of >= 2**31 elements per
    layer must be refused before it is read wrongly (checked at trace time: nothing allocated)."""
    bs = BlockSizes(chunk_pages=2, query_block=2, split_pages=2, pages_per_compute_block=1)
    q = jax.ShapeDtypeStruct((2, 8, 128), jnp.float32)
    kv = jax.ShapeDtypeStruct((8, 2**31 // (8 * 16 * 128), 16, 128), jnp.float32)
    pages = jax.ShapeDtypeStruct((2, 4), jnp.int32)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        jax.eval_shape(lambda *a: paged_attention(*a, block_sizes=bs), q, kv, kv, pages, lengths)
