"""Shared-prefix attention's host-side balancer: coverage (every KV token of every request read
exactly once), bounded chunks, query blocks below their node, the fallback decision, the tree
builder, static shapes. numpy only, except one end-to-end check through the XLA path."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_shared_prefix_attention import (
    ALWAYS_SHARE,
    EVERY_FORCE,
    _tol_check,
    kernel_block_sizes,
    make_inputs,
    make_tree,
)

from jaxsys.pallas_kernels.shared_prefix_attention import (
    BlockSizes,
    CostModel,
    PrefixTree,
    StepShape,
    bucket,
    get_block_sizes,
    get_cost_model,
    paged_attention_reference,
    plan_step,
    shared_prefix_attention_xla,
)


def _tokens_of_request(tree, r):
    out = []
    for n in tree.path(r):
        for p, fill in zip(tree.node_pages[n], tree.node_page_lens(n)):
            out += [(int(p), s) for s in range(int(fill))]
    return sorted(out)


def _covered_tokens(plan, r, page_size):
    s = plan.step
    qb = s.item_queries.shape[1]
    out = []
    for p, fill in zip(s.private_pages[r], s.private_page_lens[r]):
        out += [(int(p), t) for t in range(int(fill))]
    for row in s.merge_rows[r]:
        if row == s.item_pages.shape[0] * qb:
            continue
        w, slot = divmod(int(row), qb)
        assert s.item_queries[w, slot] == r
        for p, fill in zip(s.item_pages[w], s.item_page_lens[w]):
            out += [(int(p), t) for t in range(int(fill))]
    return sorted(out)


def check_plan_invariants(tree, plan, block_sizes):
    s = plan.step
    w, c = s.item_pages.shape
    qb = s.item_queries.shape[1]
    b = s.private_pages.shape[0]
    assert c == block_sizes.chunk_pages and qb == block_sizes.query_block
    assert all(x.dtype == np.int32 for x in s)
    # Every KV token of every request is covered exactly once.
    for r in range(tree.num_requests):
        assert _covered_tokens(plan, r, tree.page_size) == _tokens_of_request(tree, r)
    # Padding requests read nothing.
    assert np.all(s.private_page_lens[tree.num_requests:] == 0)
    assert np.all(s.merge_rows[tree.num_requests:] == w * qb)
    # Chunks are bounded, hold pages of one node, and only requests below that node use them.
    page_node = {int(p): n for n in range(tree.num_nodes) for p in tree.node_pages[n]}
    for i in range(w):
        valid = s.item_page_lens[i] > 0
        if not valid.any():
            assert np.all(s.item_queries[i] == b)
            continue
        assert np.all(valid[:valid.sum()]), "padding pages only at the end of a chunk"
        assert valid.sum() <= block_sizes.chunk_pages
        nodes = {page_node[int(p)] for p in s.item_pages[i][valid]}
        assert len(nodes) == 1
        (node,) = nodes
        assert node in plan.shared_nodes
        for r in s.item_queries[i]:
            if r < b:
                assert node in tree.path(int(r))
        assert np.all(s.item_page_lens[i][valid] <= tree.page_size)
    # A shared node is shared by >= 2 requests; the private part never holds a shared node.
    for n in plan.shared_nodes:
        assert sum(n in tree.path(r) for r in range(tree.num_requests)) >= 2
    shared_pages = {int(p) for n in plan.shared_nodes for p in tree.node_pages[n]}
    for r in range(tree.num_requests):
        assert not (set(s.private_pages[r][s.private_page_lens[r] > 0].tolist()) & shared_pages)
    assert plan.use_sharing == bool(plan.shared_nodes)
    assert plan.use_sharing == bool(np.any(s.item_page_lens > 0))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), depth=st.integers(0, 3), fanout=st.integers(1, 4),
       page_size=st.sampled_from([1, 4, 16]), chunk=st.sampled_from([1, 2, 4]),
       qblock=st.integers(1, 5), internal=st.integers(0, 2), force=st.sampled_from(EVERY_FORCE),
       min_items=st.sampled_from([0, 0, 8, 64]))
def test_plan_covers_every_token_once(seed, depth, fanout, page_size, chunk, qblock, internal, force, min_items):
    rng = np.random.default_rng(seed)
    tree, _ = make_tree(rng, depth=depth, fanout=fanout, page_size=page_size, node_tokens=(0, 50),
                        suffix_tokens=(0, 10), requests_at_internal=internal)
    bs = BlockSizes(chunk_pages=chunk, query_block=qblock, split_pages=2, min_shared_items=min_items)
    cost = CostModel(shared_token_cost=((1, float(rng.uniform(0.2, 3))),), item_overhead=1.0)
    plan = plan_step(tree, block_sizes=bs, cost_model=cost, force=force, min_requests=int(rng.integers(1, 9)))
    check_plan_invariants(tree, plan, bs)


def _star(num_requests, prefix, suffix, page_size=16):
    pages_prefix = np.arange(-(-prefix // page_size))
    nxt = pages_prefix.shape[0]
    node_pages, lens, parent = [pages_prefix], [prefix], [-1]
    for _ in range(num_requests):
        n = -(-suffix // page_size)
        node_pages.append(np.arange(nxt, nxt + n))
        nxt += n
        lens.append(suffix)
        parent.append(0)
    return PrefixTree(page_size=page_size, node_parent=np.array(parent), node_pages=tuple(node_pages),
                      node_lens=np.array(lens), request_nodes=np.arange(1, num_requests + 1))


def test_fallback_decision():
    bs = BlockSizes(chunk_pages=64, query_block=16, split_pages=64)
    cost = CostModel(shared_token_cost=((2, 2.5), (4, 3.0), (16, 6.0)), item_overhead=8.0,
                     step_overhead=512.0)
    assert cost.sharing_threshold() == 4
    # Long prefix, many requests: sharing pays.
    plan = plan_step(_star(16, 8192, 128), block_sizes=bs, cost_model=cost)
    assert plan.use_sharing and plan.shared_nodes == (0,)
    assert plan.cost_chosen < plan.cost_plain
    # Two requests: an item of 2 costs 2.5 plain tokens per token, more than reading twice.
    plan = plan_step(_star(2, 8192, 128), block_sizes=bs, cost_model=cost)
    assert not plan.use_sharing and plan.step.item_pages.shape[0] == 0
    assert plan.cost_chosen == plan.cost_plain
    # Three requests (an item of 4 rows: cost 3.0) break even; four clear the threshold.
    assert not plan_step(_star(3, 8192, 128), block_sizes=bs, cost_model=cost).use_sharing
    assert plan_step(_star(4, 8192, 128), block_sizes=bs, cost_model=cost).use_sharing
    # A short shared prefix does not pay for the step overhead.
    assert not plan_step(_star(8, 32, 128), block_sizes=bs, cost_model=cost).use_sharing
    # No sharing in the tree at all: plain.
    chain = PrefixTree(page_size=16, node_parent=np.array([-1, 0]), node_pages=(np.arange(4), np.arange(4, 6)),
                       node_lens=np.array([64, 20]), request_nodes=np.array([1]))
    assert not plan_step(chain, block_sizes=bs, cost_model=cost).use_sharing


def test_step_overhead_by_the_largest_item():
    """With `step_overhead_by_size`, a step pays the overhead of its largest work item: the same
    saving shares under small items and not under big ones (the items launch of more rows has the
    higher floor), and a step past the largest size pays the largest entry."""
    cost = CostModel(shared_token_cost=((4, 1.0), (16, 1.0)), step_overhead=1e9,
                     step_overhead_by_size=((4, 1000.0), (16, 50000.0)))
    assert cost.overhead(2) == cost.overhead(4) == 1000.0 and cost.overhead(5) == cost.overhead(64) == 50000.0
    assert CostModel(shared_token_cost=((4, 1.0),), step_overhead=7.0).overhead(64) == 7.0
    bs = BlockSizes(chunk_pages=64, query_block=16, split_pages=64)
    # 4 requests below 4096 tokens: saving 4 * 4096 - 4096 = 12288 > 1000
    plan = plan_step(_star(4, 4096, 64), block_sizes=bs, cost_model=cost)
    assert plan.use_sharing and plan.cost_chosen == plan.cost_plain - 12288 + 1000
    # 16 requests below 1024: saving 15 * 1024 = 15360, under the 16-request item's 50000
    assert not plan_step(_star(16, 1024, 64), block_sizes=bs, cost_model=cost).use_sharing
    # ...and 16 below 4096 (61440) clear it
    assert plan_step(_star(16, 4096, 64), block_sizes=bs, cost_model=cost).use_sharing
    for bad in (((0, 1.0),), ((4, -1.0),)):
        with pytest.raises(ValueError, match="step_overhead_by_size"):
            CostModel(shared_token_cost=((4, 1.0),), step_overhead_by_size=bad)


def test_cost_model_lookup():
    cost = CostModel(shared_token_cost=((4, 1.0), (16, 4.0)))
    assert cost.token_cost(4) == 1.0 and cost.token_cost(16) == 4.0
    assert cost.token_cost(10) == 4.0  # rounds up to the next measured block
    assert cost.token_cost(1) == 1.0
    assert cost.token_cost(32) == pytest.approx(8.0)
    assert CostModel(shared_token_cost=((64, 100.0),)).sharing_threshold() is None


def test_from_page_tables_recovers_the_tree():
    ps = 4
    tree = _star(3, 10 * ps, 5, page_size=ps)  # page-aligned shared prefix, ragged suffixes
    tables = [np.concatenate([tree.node_pages[n] for n in tree.path(r)]) for r in range(3)]
    got = PrefixTree.from_page_tables(tables, tree.request_lengths(), ps)
    assert sorted(got.node_lens.tolist()) == sorted(tree.node_lens.tolist())
    assert np.all(got.request_lengths() == tree.request_lengths())
    root = [n for n in range(got.num_nodes) if got.node_parent[n] < 0]
    assert len(root) == 1 and got.node_lens[root[0]] == 10 * ps
    # Identical requests share everything; an empty request is allowed.
    got = PrefixTree.from_page_tables([[5, 6], [5, 6], []], [7, 7, 0], ps)
    assert got.request_nodes[0] == got.request_nodes[1]
    assert got.request_lengths().tolist() == [7, 7, 0]


def _shared_tokens(tree, a, b):
    common = set(tree.path(a)) & set(tree.path(b))
    return sum(int(tree.node_lens[n]) for n in common)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), depth=st.integers(0, 3), fanout=st.integers(1, 4),
       page_size=st.sampled_from([1, 4, 16]), internal=st.integers(0, 2))
def test_from_page_tables_property(seed, depth, fanout, page_size, internal):
    """For page-aligned trees (a paged radix cache shares whole pages), the inferred tree gives
    every request the same tokens and every pair of requests the same shared prefix."""
    rng = np.random.default_rng(seed)
    tree, _ = make_tree(rng, depth=depth, fanout=fanout, page_size=page_size, node_tokens=(1, 9),
                        suffix_tokens=(0, 30), requests_at_internal=internal)
    # Make inner nodes page aligned (whole pages), keeping each node's first pages.
    lens = tree.node_lens.copy()
    is_leaf_node = np.ones(tree.num_nodes, bool)
    is_leaf_node[tree.node_parent[tree.node_parent >= 0]] = False
    for n in range(tree.num_nodes):
        if not is_leaf_node[n]:
            lens[n] = tree.node_pages[n].shape[0] * page_size
    tree = PrefixTree(page_size=page_size, node_parent=tree.node_parent, node_pages=tree.node_pages,
                      node_lens=lens, request_nodes=tree.request_nodes)
    tables = [np.concatenate([tree.node_pages[n] for n in tree.path(r)] + [np.zeros(0, np.int32)])
              for r in range(tree.num_requests)]
    got = PrefixTree.from_page_tables(tables, tree.request_lengths(), page_size)
    assert np.all(got.request_lengths() == tree.request_lengths())
    for r in range(tree.num_requests):
        assert _tokens_of_request(got, r) == _tokens_of_request(tree, r)
        for r2 in range(r + 1, tree.num_requests):
            assert _shared_tokens(got, r, r2) == _shared_tokens(tree, r, r2)
    padded = np.zeros((len(tables), max([len(t) for t in tables] + [1]) + 2), np.int32)
    for r, t in enumerate(tables):
        padded[r, :len(t)] = t
    again = PrefixTree.from_page_tables(padded, tree.request_lengths(), page_size)
    assert again.num_nodes == got.num_nodes
    bs = BlockSizes(chunk_pages=2, query_block=2, split_pages=2)
    check_plan_invariants(got, plan_step(got, block_sizes=bs, cost_model=ALWAYS_SHARE), bs)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), items=st.integers(0, 12), slots=st.integers(0, 6))
def test_pinned_shape_drops_least_valuable_nodes(seed, items, slots):
    rng = np.random.default_rng(seed)
    tree, _ = make_tree(rng, depth=2, fanout=3, page_size=4, node_tokens=(1, 40), suffix_tokens=(1, 9))
    bs = BlockSizes(chunk_pages=2, query_block=2, split_pages=2)
    cost = CostModel(shared_token_cost=((1, 0.5), (2, 0.9)))
    free = plan_step(tree, block_sizes=bs, cost_model=cost)
    shape = StepShape(num_requests=free.shape.num_requests, num_items=items,
                      private_pages=bucket(int(tree.request_lengths().max())), merge_slots=slots)
    plan = plan_step(tree, block_sizes=bs, cost_model=cost, shape=shape)
    assert plan.shape == shape
    assert set(plan.shared_nodes) <= set(free.shared_nodes)
    assert int((plan.step.item_page_lens.sum(axis=1) > 0).sum()) <= items
    check_plan_invariants(tree, plan, bs)
    if free.shape.num_items <= items and free.shape.merge_slots <= slots:
        assert plan.shared_nodes == free.shared_nodes


def test_min_shared_items_shortens_items():
    """A 64-page prefix shared by 4 requests is 2 items of 32 pages; asked for 8 items the balancer
    halves the pages per item twice (8 pages each, the rest of each item padding), never below one
    compute tile, and a pinned shape caps it."""
    tree = _star(4, prefix=64 * 16, suffix=16)
    base = BlockSizes(chunk_pages=32, query_block=4, split_pages=8, pages_per_compute_block=4)

    def items(bs, **kw):
        step = plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE, force="share", **kw).step
        valid = (step.item_page_lens > 0).sum(axis=1)
        return int((valid > 0).sum()), int(valid.max()), step

    assert items(base)[:2] == (2, 32)
    n, longest, step = items(dataclasses.replace(base, min_shared_items=8))
    assert (n, longest) == (8, 8) and step.item_pages.shape[1] == 32 and step.merge_rows.shape[1] == 8
    assert items(dataclasses.replace(base, min_shared_items=10**6))[:2] == (16, 4)  # one 4-page tile each
    pinned = StepShape(num_requests=4, num_items=4, private_pages=8, merge_slots=4)
    assert items(dataclasses.replace(base, min_shared_items=8), shape=pinned)[:2] == (4, 16)
    check_plan_invariants(tree, plan_step(tree, block_sizes=dataclasses.replace(base, min_shared_items=8),
                                          cost_model=ALWAYS_SHARE, force="share"), base)


def test_plan_from_page_tables_matches_reference():
    rng = np.random.default_rng(11)
    ps = 4
    shared = rng.permutation(40)
    tables, lengths = [], []
    for r in range(5):
        own = 40 + 10 * r + np.arange(10)
        split = 3 if r < 2 else 6  # requests 0,1 share 3 pages; 2..4 share 6
        tables.append(np.concatenate([shared[:split], own]))
        lengths.append(split * ps + int(rng.integers(1, 30)))
    tree = PrefixTree.from_page_tables(tables, lengths, ps)
    bs = kernel_block_sizes(ps)
    plan = plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE)
    assert plan.use_sharing and len(plan.shared_nodes) == 2
    q, k, v = make_inputs(rng, num_requests=plan.shape.num_requests, total_pages=100, num_kv_heads=2,
                          group=2, head_dim=16, page_size=ps, dtype=jnp.float32)
    out = shared_prefix_attention_xla(q, k, v, plan.step, block_sizes=bs)
    table = np.stack([np.pad(t, (0, 16 - len(t))) for t in tables])
    ref = paged_attention_reference(q[:5], k, v, table, np.array(lengths))
    _tol_check(out[:5], np.asarray(ref)[:5], v, jnp.float32)


def test_shape_forcing_and_validation():
    tree = _star(3, 64, 8, page_size=16)
    bs = BlockSizes(chunk_pages=2, query_block=2, split_pages=2)
    plan = plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE)
    big = StepShape(num_requests=8, num_items=16, private_pages=8, merge_slots=8)
    assert plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE, shape=big).shape == big
    # A pinned shape too small for every shared item: the balancer unshares instead of failing.
    small = StepShape(num_requests=4, num_items=1, private_pages=8, merge_slots=8)
    fitted = plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE, shape=small)
    assert fitted.shape == small and not fitted.use_sharing
    check_plan_invariants(tree, fitted, bs)
    with pytest.raises(ValueError, match="num_items"):
        plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE, shape=small, force="share")
    with pytest.raises(ValueError, match="private_pages"):
        plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE,
                  shape=StepShape(num_requests=4, num_items=1, private_pages=2, merge_slots=8))
    assert plan.shape.num_items == bucket(plan.shape.num_items)
    with pytest.raises(ValueError, match="force"):
        plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE, force="always")
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(chunk_pages=3, query_block=2, split_pages=2)
    with pytest.raises(ValueError, match="divide"):
        BlockSizes(chunk_pages=2, query_block=2, split_pages=2, pages_per_compute_block=4)
    with pytest.raises(ValueError, match="positive"):
        BlockSizes(chunk_pages=2, query_block=0, split_pages=2)
    with pytest.raises(ValueError, match="split_pages_per_compute_block=4 must divide split_pages=2"):
        BlockSizes(chunk_pages=4, query_block=2, split_pages=2, split_pages_per_compute_block=4)
    with pytest.raises(ValueError, match="prefetch must be 0 or 1"):
        BlockSizes(chunk_pages=2, query_block=2, split_pages=2, prefetch=2)
    with pytest.raises(ValueError, match="split_num_warps"):
        BlockSizes(chunk_pages=2, query_block=2, split_pages=2, split_num_warps=3)
    # the split-KV launch's own tile: it divides split_pages, not chunk_pages
    bs = BlockSizes(chunk_pages=2, query_block=2, split_pages=8, pages_per_compute_block=2,
                    split_pages_per_compute_block=8, split_num_stages=1)
    launch = bs.split_launch()
    assert (launch.pages_per_compute_block, launch.num_warps, launch.num_stages) == (8, 4, 1)
    assert BlockSizes(chunk_pages=2, query_block=2, split_pages=2).split_launch().pages_per_compute_block == 1
    with pytest.raises(ValueError, match="cycle"):
        PrefixTree(page_size=4, node_parent=np.array([1, 0]), node_pages=(np.arange(1), np.arange(1, 2)),
                   node_lens=np.array([3, 3]), request_nodes=np.array([0]))
    with pytest.raises(ValueError, match="pages"):
        PrefixTree(page_size=4, node_parent=np.array([-1]), node_pages=(np.arange(1),),
                   node_lens=np.array([9]), request_nodes=np.array([0]))


def test_tuned_tables_are_valid():
    for platform in ("cpu", "gpu", "tpu"):
        bs = get_block_sizes(platform, 4, 128, 16, "float32")
        assert isinstance(bs, BlockSizes)
        cost = get_cost_model(platform)
        assert cost.token_cost(bs.query_block) > 0
    assert "H200" in get_cost_model("gpu").source  # measured, not a guess
    # a dtype without its own calibration uses the platform's fp32 model
    assert get_cost_model("gpu", "bfloat16") is get_cost_model("gpu", "float32")
    # a dot mode with its own calibration has its own model; the others share the dtype's
    assert "TF32" in get_cost_model("gpu", "float32", "tf32").source
    assert get_cost_model("gpu", "float32", "tf32x3") is get_cost_model("gpu", "float32")
    assert get_cost_model("gpu", "bfloat16", "tf32") is get_cost_model("gpu", "float32")
    assert get_cost_model("tpu", "bfloat16") is get_cost_model("cpu")
    assert get_block_sizes("gpu", 4, 128, 16, "float32") != get_block_sizes("gpu", 4, 128, 16, "bfloat16")
    # a dot mode with tiles of its own; the others use the dtype's
    assert get_block_sizes("gpu", 4, 128, 16, "float32", "tf32").chunk_pages == 32
    for mode in ("auto", "tf32x3", "ieee"):
        assert get_block_sizes("gpu", 4, 128, 16, "float32", mode) == get_block_sizes("gpu", 4, 128, 16, "float32")


