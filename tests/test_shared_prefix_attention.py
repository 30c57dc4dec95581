"""Shared-prefix decode attention: the XLA path and the Pallas kernels against the float32
reference over random prefix trees, through the package's public entry points (the balancer's
own properties: test_shared_prefix_balancer.py; the cases: shared_prefix_cases.py).

The Pallas kernels run in the interpreter on CPU. `make gpu-check` sets
JAXSYS_PALLAS_COMPILED=1 (and JAX_PLATFORMS=cuda), which compiles them for real: the same
sweeps then check the Triton kernels, and the `gpu`-marked tests add model-sized shapes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shared_prefix_cases import (
    BF16_CASES,
    CASES,
    EVERY_DECISION,
    FP32_TOL,
    INTERPRET,
    NO_SHARING,
    block_sizes,
    check_close,
    make_inputs,
    make_tree,
    plan,
    reference,
    setup,
)

from jaxsys.pallas_kernels.shared_prefix_attention import (
    BlockSizes,
    ItemsLaunch,
    MergeLaunch,
    SplitLaunch,
    StepShape,
    forced_plan,
    get_default,
    paged_attention,
    paged_attention_reference,
    paged_attention_xla,
    plain_step,
    shared_prefix_attention,
    shared_prefix_attention_xla,
)
from jaxsys.pallas_kernels.shared_prefix_attention.kernel import item_rows, launches


def _with(bs: BlockSizes, *, items=None, split=None, merge=None) -> BlockSizes:
    """bs with some fields of its launches replaced."""
    return BlockSizes(items=dataclasses.replace(bs.items, **(items or {})),
                      split=dataclasses.replace(bs.split, **(split or {})),
                      merge=dataclasses.replace(bs.merge, **(merge or {})))


def _kernel(q, k, v, step, bs, **kw):
    return shared_prefix_attention(q, k, v, step, block_sizes=bs, interpret=INTERPRET, **kw)


@pytest.mark.parametrize("decision", EVERY_DECISION)
@pytest.mark.parametrize("name", list(CASES))
def test_xla_matches_reference(name, decision):
    tree, q, k, v = setup(name, jnp.float32)
    bs = block_sizes(tree.page_size)
    p, q = plan(tree, q, decision, bs)
    if decision == "plain" or name in NO_SHARING:
        assert not p.use_sharing
    out = shared_prefix_attention_xla(q, k, v, p.step, block_sizes=bs)
    check_close(out, reference(tree, q, k, v), v, jnp.float32)


@pytest.mark.parametrize("name", BF16_CASES)
def test_xla_matches_reference_bf16(name):
    tree, q, k, v = setup(name, jnp.bfloat16)
    bs = block_sizes(tree.page_size)
    p, q = plan(tree, q, "share", bs)
    out = shared_prefix_attention_xla(q, k, v, p.step, block_sizes=bs)
    assert out.dtype == jnp.bfloat16
    check_close(out, reference(tree, q, k, v), v, jnp.bfloat16)


@pytest.mark.parametrize("name,decision", [(n, "share") for n in CASES] + [("fan4_gqa4", "plain"),
                                                                            ("internal_requests_padded", "plain")])
def test_kernel_matches_reference(name, decision):
    tree, q, k, v = setup(name, jnp.float32)
    bs = block_sizes(tree.page_size)
    p, q = plan(tree, q, decision, bs)
    check_close(_kernel(q, k, v, p.step, bs), reference(tree, q, k, v), v, jnp.float32)


@pytest.mark.parametrize("name,decision,split_tile", [("long_nodes_short_suffix", "plain", 1),
                                                      ("long_nodes_short_suffix", "share", 2),
                                                      ("chain_no_sharing", None, 1)])
def test_kernel_with_more_splits_matches_reference(name, decision, split_tile):
    """`SplitLaunch.min_programs` halves the split down to one compute tile (here from 32 pages to
    4, or to 8 with the split launch's own 8-page tile): more partials per request, merged by
    LSE, the same attention."""
    tree, q, k, v = setup(name, jnp.float32)
    base = block_sizes(tree.page_size)
    ppcb = base.split.pages_per_compute_block
    bs = _with(base, split=dict(pages_per_split=8 * base.split.pages_per_split, min_programs=10**6,
                                pages_per_compute_block=split_tile * ppcb))
    p, q = plan(tree, q, decision, bs)
    check_close(_kernel(q, k, v, p.step, bs), reference(tree, q, k, v), v, jnp.float32)


def test_more_splits_fill_the_launch():
    """The split-KV launch takes the split count from the batch: `min_programs` halves the split
    until requests x splits x KV heads reach it, never below one 16-token tile nor above the
    padded private pages."""
    rng = np.random.default_rng(0)
    q, k, v = make_inputs(rng, num_requests=4, total_pages=80, num_kv_heads=8, group=1, head_dim=16,
                          page_size=16, dtype=jnp.float32)
    step = plain_step(rng.permutation(80)[:64].reshape(1, 64).repeat(4, 0), np.full(4, 64 * 16), 16,
                      block_sizes=block_sizes(16, split_tiles=32))

    def splits(pages_per_split, ppcb, min_programs, batch=4):
        bs = BlockSizes(items=ItemsLaunch(chunk_pages=2, query_block=2),
                        split=SplitLaunch(pages_per_split=pages_per_split, pages_per_compute_block=ppcb,
                                          min_programs=min_programs))
        run = launches(block_sizes=bs, group=1, sm_scale=1.0, interpret=True)
        o, _ = jax.eval_shape(run.private_pages, q[:batch], k, v, jax.tree.map(lambda x: x[:batch], step))
        return o.shape[1]

    assert splits(32, 2, 0) == 2  # 64 pages in fixed splits of 32
    assert splits(32, 2, 512) == 16  # 4 requests x 8 heads x 16 splits = 512 (4-page splits)
    assert splits(32, 2, 513) == 32  # ... one more: 2-page splits, one tile each
    assert splits(32, 2, 10**6) == 32  # never below one tile
    assert splits(32, 4, 10**6) == 16  # the split launch's own 4-page tile
    assert splits(32, 1, 10**6) == 64  # 1-page tiles of 16 tokens
    assert splits(128, 2, 0) == 1  # a split longer than the pages: one split of all of them


@pytest.mark.parametrize("name,partials", [("deep3_fan2_gqa8", 2), ("internal_requests_padded", 4),
                                           ("long_nodes_short_suffix", 64)])
def test_kernel_with_block_merge_matches_reference(name, partials):
    """`MergeLaunch.partials_per_step`: the merge gathers that many shared partials per step
    (padding merge rows and empty partials weigh 0; a block wider than the step's merge rows is
    cut to them)."""
    tree, q, k, v = setup(name, jnp.float32)
    bs = _with(block_sizes(tree.page_size), merge=dict(partials_per_step=partials))
    p, q = plan(tree, q, "share", bs)
    assert p.use_sharing and p.step.merge_rows.shape[1] >= 2
    check_close(_kernel(q, k, v, p.step, bs), reference(tree, q, k, v), v, jnp.float32)


@pytest.mark.parametrize("pages_per_seq,partials", [(16, 4), (32, 2), (12, 4), (9, 8)])
def test_kernel_with_block_merge_of_private_partials_matches_reference(pages_per_seq, partials):
    """`partials_per_step` also folds a request's private partials that many at a time: 4 splits of
    4 pages 4 at a time, 8 two at a time; 3 splits one at a time (the block must divide them)."""
    rng = np.random.default_rng(pages_per_seq)
    page_size, split = 4, 4
    lengths = np.array([0, 1, page_size * pages_per_seq, 5 * page_size + 3, page_size * pages_per_seq - 2], np.int32)
    page_indices = np.stack([rng.permutation(64)[:pages_per_seq] for _ in lengths]).astype(np.int32)
    q, k, v = make_inputs(rng, num_requests=len(lengths), total_pages=64, num_kv_heads=2,
                          group=4, head_dim=16, page_size=page_size, dtype=jnp.float32)
    bs = BlockSizes(items=ItemsLaunch(chunk_pages=4, query_block=1, pages_per_compute_block=4),
                    split=SplitLaunch(pages_per_split=split, pages_per_compute_block=4),
                    merge=MergeLaunch(partials_per_step=partials))
    out = paged_attention(q, k, v, jnp.asarray(page_indices), jnp.asarray(lengths), block_sizes=bs,
                          interpret=INTERPRET)
    check_close(out, np.asarray(paged_attention_reference(q, k, v, page_indices, lengths)), v, jnp.float32)


@pytest.mark.parametrize("name,decision", [("fan2_gqa3_page16", "share"), ("deep3_fan2_gqa8", "share"),
                                           ("internal_requests_padded", "plain")])
@pytest.mark.parametrize("flat,split_flat", [(True, True), (True, False), (False, True)])
def test_kernel_with_flat_kv_tiles_matches_reference(name, decision, flat, split_flat):
    """`flat_kv` of either launch: it reads the cache as [pages x page_size, D] token rows and
    gathers each tile as one 2D block; the same attention (padding pages never loaded)."""
    tree, q, k, v = setup(name, jnp.float32)
    bs = _with(block_sizes(tree.page_size), items=dict(flat_kv=flat), split=dict(flat_kv=split_flat))
    p, q = plan(tree, q, decision, bs)
    check_close(_kernel(q, k, v, p.step, bs), reference(tree, q, k, v), v, jnp.float32)


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
        tree, q, k, v = setup(name, jnp.float32)
    bs = block_sizes(tree.page_size, query_block=query_block, row_tiers=4)
    p, q = plan(tree, q, "share", bs)
    ref = reference(tree, q, k, v)
    check_close(_kernel(q, k, v, p.step, bs), ref, v, jnp.float32)
    step = jax.tree.map(jnp.asarray, p.step)
    if INTERPRET:  # the tiers are used (some rows unwritten), and cover every row the merge reads
        _, lse_sh = launches(block_sizes=bs, group=group, sm_scale=1.0, interpret=True).items(q, k, v, step)
        lse_sh = np.asarray(lse_sh)  # [W, Hkv, rows]
        gm = 1 << (group - 1).bit_length()
        assert np.isnan(lse_sh).any()
        tiers = set()
        for row in p.step.merge_rows[p.step.merge_rows < lse_sh.shape[0] * query_block]:
            item, slot = divmod(int(row), query_block)
            assert not np.isnan(lse_sh[item, :, slot * group:slot * group + gm]).any()
            tiers.add(int((~np.isnan(lse_sh[item, 0])).sum()))
        assert len(tiers) >= 2
    # the host-side account of the same tiers (benchmark JSON): each item's rows x its tokens
    acct = item_rows(p.step, group, bs)
    tokens = p.step.item_page_lens.sum(axis=1)
    filled = (p.step.item_queries != p.step.private_pages.shape[0]).sum(axis=1)
    assert acct["useful"] == int((filled * group * tokens).sum()) <= acct["computed"] < acct["full"]
    assert item_rows(p.step, group, _with(bs, items=dict(row_tiers=1)))["computed"] == acct["full"]
    if INTERPRET:
        assert acct["computed"] == int(((~np.isnan(lse_sh[:, 0])).sum(axis=1) * tokens).sum())


def test_kernel_merge_reads_odd_groups_in_place():
    """G = 5 query heads per KV head in items of 3 requests: the merge reads each request's Gm = 8
    rows where the shared launch wrote them (rows 10..17 for the last slot: past 3 x 5 = 15, so
    the launch must hold 32 rows, not 16)."""
    rng = np.random.default_rng(5)
    tree, total_pages = make_tree(rng, depth=1, fanout=6, page_size=4)
    q, k, v = make_inputs(rng, num_requests=tree.num_requests, total_pages=total_pages,
                          num_kv_heads=2, group=5, head_dim=16, page_size=4, dtype=jnp.float32)
    bs = block_sizes(4, query_block=3)
    p, q = plan(tree, q, "share", bs)
    assert p.step.item_queries.shape[1] == 3 and p.use_sharing
    check_close(_kernel(q, k, v, p.step, bs), reference(tree, q, k, v), v, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_with_every_launch_option_matches_reference(dtype):
    """More and shorter splits with their own tile, a block merge, a non-power-of-two query block,
    row tiers and flat KV tiles, together, with return_lse: one configuration the GPU sweep may
    pick."""
    tree, q, k, v = setup("internal_requests_padded", dtype)
    base = block_sizes(tree.page_size)
    ppcb = base.split.pages_per_compute_block
    bs = _with(base, items=dict(query_block=3, row_tiers=2, flat_kv=True),
               split=dict(pages_per_split=4 * base.split.pages_per_split, min_programs=10**6,
                          pages_per_compute_block=2 * ppcb, flat_kv=True),
               merge=dict(partials_per_step=2))
    p, q = plan(tree, q, "share", bs)
    out, lse = _kernel(q, k, v, p.step, bs, return_lse=True)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    check_close(out, reference(tree, q, k, v), v, dtype)
    check_close(out, _kernel(q, k, v, p.step, base).astype(jnp.float32), v, dtype)


@pytest.mark.parametrize("name,decision", [("deep3_fan2_gqa8", "share"), ("fan4_gqa4", "plain")])
def test_launches_compose_to_the_kernel(name, decision):
    """`kernel.launches` (what the benchmark times one by one), called in order, computes what
    `shared_prefix_attention` computes."""
    tree, q, k, v = setup(name, jnp.float32)
    bs = block_sizes(tree.page_size)
    p, q = plan(tree, q, decision, bs)
    step = jax.tree.map(jnp.asarray, p.step)
    g = q.shape[1] // k.shape[0]
    run = launches(block_sizes=bs, group=g, sm_scale=1 / math.sqrt(q.shape[2]), interpret=INTERPRET)
    items = run.items(q, k, v, step) if p.use_sharing else None
    out = run.merge(run.private_pages(q, k, v, step), items, step)[:, :, :g].reshape(q.shape)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_kernel(q, k, v, p.step, bs)), atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("name", BF16_CASES[:2])
def test_kernel_matches_reference_bf16(name):
    tree, q, k, v = setup(name, jnp.bfloat16)
    bs = block_sizes(tree.page_size)
    p, q = plan(tree, q, "share", bs)
    out = _kernel(q, k, v, p.step, bs)
    assert out.dtype == jnp.bfloat16
    check_close(out, reference(tree, q, k, v), v, jnp.bfloat16)


def test_padding_requests_get_zeros():
    tree, q, k, v = setup("internal_requests_padded", jnp.float32)
    bs = block_sizes(tree.page_size)
    p, qp = plan(tree, q, "share", bs)
    assert p.shape.num_requests > tree.num_requests
    for out in (shared_prefix_attention_xla(qp, k, v, p.step, block_sizes=bs), _kernel(qp, k, v, p.step, bs)):
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
    if path == "xla":
        bs = BlockSizes(items=ItemsLaunch(chunk_pages=1, query_block=1), split=SplitLaunch(pages_per_split=split))
        out = paged_attention_xla(q, k, v, jnp.asarray(page_indices), jnp.asarray(lengths), block_sizes=bs)
    else:
        bs = BlockSizes(items=ItemsLaunch(chunk_pages=ppcb, query_block=1, pages_per_compute_block=ppcb),
                        split=SplitLaunch(pages_per_split=max(split, ppcb), pages_per_compute_block=ppcb))
        out = paged_attention(q, k, v, jnp.asarray(page_indices), jnp.asarray(lengths), block_sizes=bs,
                              interpret=INTERPRET)
    ref = np.asarray(paged_attention_reference(q, k, v, page_indices, lengths))
    check_close(out, ref, v, jnp.float32)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)  # zero-length request


def test_plain_step_equals_paged_attention():
    rng = np.random.default_rng(3)
    lengths = np.array([3, 17, 0, 8], np.int32)
    page_indices = rng.permutation(32)[:16].reshape(4, 4).astype(np.int32)
    q, k, v = make_inputs(rng, num_requests=4, total_pages=32, num_kv_heads=1, group=2,
                          head_dim=16, page_size=8, dtype=jnp.float32)
    bs = BlockSizes(items=ItemsLaunch(chunk_pages=2, query_block=2, pages_per_compute_block=2),
                    split=SplitLaunch(pages_per_split=2, pages_per_compute_block=2))
    step = plain_step(page_indices, lengths, 8, block_sizes=bs)
    a = shared_prefix_attention_xla(q, k, v, step, block_sizes=bs)
    b = paged_attention_xla(q, k, v, jnp.asarray(page_indices), jnp.asarray(lengths), block_sizes=bs)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=FP32_TOL, rtol=FP32_TOL)


# -- one input validation for every path ----------------------------------------------------------


def _paths():
    return {"xla": shared_prefix_attention_xla, "kernel": lambda *a, **kw: shared_prefix_attention(*a, interpret=True, **kw)}


@pytest.mark.parametrize("path", ["xla", "kernel"])
def test_bad_inputs_fail_alike_on_every_path(path):
    """Both paths share one validation: the same bad input gives the same clear error, at trace
    time (nothing is computed)."""
    tree, q, k, v = setup("fan4_gqa4", jnp.float32)
    bs = block_sizes(tree.page_size)
    p, q = plan(tree, q, "share", bs)
    f = _paths()[path]
    with pytest.raises(ValueError, match="num_q_heads 7 must be a multiple of num_kv_heads 2"):
        f(q[:, :7], k, v, p.step, block_sizes=bs)
    with pytest.raises(ValueError, match="head_dim of q"):
        f(q[..., :8], k, v, p.step, block_sizes=bs)
    with pytest.raises(ValueError, match="dtypes differ"):
        f(q, k, v.astype(jnp.bfloat16), p.step, block_sizes=bs)
    with pytest.raises(ValueError, match="step shapes do not fit"):
        f(q[:-1], k, v, p.step, block_sizes=bs)
    with pytest.raises(TypeError, match="block_sizes must be a BlockSizes"):
        f(q, k, v, p.step, block_sizes=bs.items)
    with pytest.raises(TypeError, match="step must be a SharedPrefixStep"):
        f(q, k, v, tuple(p.step), block_sizes=bs)
    paged = {"xla": paged_attention_xla, "kernel": lambda *a, **kw: paged_attention(*a, interpret=True, **kw)}[path]
    table, lengths = jnp.zeros((q.shape[0], 4), jnp.int32), jnp.zeros((q.shape[0],), jnp.int32)
    with pytest.raises(ValueError, match="do not fit q"):
        paged(q, k, v, table[:-1], lengths, block_sizes=bs)


# -- static shapes: one compiled function per step bucket ---------------------------------------


def test_same_bucket_does_not_recompile():
    bs = block_sizes(4)
    shape = StepShape(num_requests=8, num_items=32, private_pages=16, merge_slots=16)
    before = None
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        tree, _ = make_tree(rng, depth=1 + seed % 2, fanout=2, page_size=4, node_tokens=(1, 20), spare_pages=5)
        q, k, v = make_inputs(rng, num_requests=8, total_pages=200, num_kv_heads=1, group=2,
                              head_dim=16, page_size=4, dtype=jnp.float32)
        p = forced_plan(tree, share=True, block_sizes=bs, shape=shape)
        assert p.shape == shape
        shared_prefix_attention_xla(q, k, v, p.step, block_sizes=bs)
        if before is None:
            before = shared_prefix_attention_xla._cache_size()
    assert shared_prefix_attention_xla._cache_size() == before


# -- model-sized shapes, compiled (GPU only) ------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,precision", [(jnp.float32, "tf32x3"), (jnp.float32, "ieee"),
                                             (jnp.float32, "tf32"), (jnp.bfloat16, "tf32x3")])
def test_kernel_model_shapes_gpu(dtype, precision):
    """Model-sized shapes compiled with the tables' tiles; fp32 both accurate ways (3xTF32
    tensor-core products, the default, and IEEE) within the fp32 tolerance. The single-TF32
    mode rounds products to 10 mantissa bits: it is held to the bf16 bound (7 bits), which it
    must pass easily."""
    if jax.devices()[0].platform != "gpu" or INTERPRET:
        pytest.skip("needs a GPU and JAXSYS_PALLAS_COMPILED=1 (make gpu-check)")
    rng = np.random.default_rng(0)
    ps = 16
    tree, total_pages = make_tree(rng, depth=2, fanout=4, page_size=ps, node_tokens=(200, 900),
                                  suffix_tokens=(1, 300))
    q, k, v = make_inputs(rng, num_requests=tree.num_requests, total_pages=total_pages,
                          num_kv_heads=8, group=4, head_dim=128, page_size=ps, dtype=dtype)
    tuned = get_default(jax.devices()[0].device_kind, jnp.dtype(dtype).name, precision, q_per_kv=4, head_dim=128,
                        page_size=ps)
    ref = reference(tree, q, k, v)
    for decision in EVERY_DECISION:
        p, _ = plan(tree, q, decision, tuned.block_sizes, tuned.cost_model)
        out = shared_prefix_attention(q, k, v, p.step, block_sizes=tuned.block_sizes, precision=precision)
        check_close(out, ref, v, jnp.bfloat16 if precision == "tf32" else dtype)


def test_precision_is_validated():
    tree, q, k, v = setup("fan4_gqa4", jnp.float32)
    bs = block_sizes(tree.page_size)
    p, q = plan(tree, q, "share", bs)
    with pytest.raises(ValueError, match="precision must be one of"):
        shared_prefix_attention(q, k, v, p.step, block_sizes=bs, interpret=True, precision="fp16")


def test_kernel_rejects_caches_past_int32_offsets():
    """The compiled kernels address pages with int32 offsets: a cache of >= 2**31 elements per
    layer must be refused before it is read wrongly (checked at trace time: nothing allocated)."""
    bs = BlockSizes(items=ItemsLaunch(chunk_pages=2, query_block=2), split=SplitLaunch(pages_per_split=2))
    q = jax.ShapeDtypeStruct((2, 8, 128), jnp.float32)
    kv = jax.ShapeDtypeStruct((8, 2**31 // (8 * 16 * 128), 16, 128), jnp.float32)
    pages = jax.ShapeDtypeStruct((2, 4), jnp.int32)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        jax.eval_shape(lambda *a: paged_attention(*a, block_sizes=bs), q, kv, kv, pages, lengths)


def test_kernel_rejects_tiles_triton_cannot_run():
    """Compiled (not interpreted), a tile of fewer than 16 tokens cannot be a Triton dot: refused
    with the launch's name."""
    bs = BlockSizes(items=ItemsLaunch(chunk_pages=2, query_block=2), split=SplitLaunch(pages_per_split=2))
    q = jax.ShapeDtypeStruct((2, 8, 64), jnp.float32)
    kv = jax.ShapeDtypeStruct((8, 64, 4, 64), jnp.float32)  # 1 page of 4 tokens per tile
    with pytest.raises(ValueError, match="SplitLaunch.pages_per_compute_block"):
        jax.eval_shape(lambda *a: paged_attention(*a, block_sizes=bs), q, kv, kv,
                       jax.ShapeDtypeStruct((2, 4), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32))

