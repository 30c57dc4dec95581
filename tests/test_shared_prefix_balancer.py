"""Shared-prefix attention's host-side balancer: coverage (every KV token of every request read
exactly once), bounded chunks, query blocks below their node, the fallback decision, the tree
builder, static shapes. numpy only, except one end-to-end check through the XLA path."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_prefix_cases import ALWAYS_SHARE, EVERY_DECISION, block_sizes, check_close, make_inputs, make_tree, star

from jaxsys.pallas_kernels.shapes import pow2_bucket
from jaxsys.pallas_kernels.shared_prefix_attention import (
    BlockSizes,
    CostModel,
    ItemsLaunch,
    MergeLaunch,
    PrefixTree,
    SplitLaunch,
    StepShape,
    forced_plan,
    paged_attention_reference,
    plan_step,
    shared_prefix_attention_xla,
)


def _bs(chunk, qblock, split=2):
    return BlockSizes(items=ItemsLaunch(chunk_pages=chunk, query_block=qblock), split=SplitLaunch(pages_per_split=split))


def _plan(tree, decision, bs, cost_model=ALWAYS_SHARE, **kw):
    if decision is None:
        return plan_step(tree, block_sizes=bs, cost_model=cost_model, **kw)
    return forced_plan(tree, share=decision == "share", block_sizes=bs, **kw)


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
    assert c == block_sizes.items.chunk_pages and qb == block_sizes.items.query_block
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
        assert valid.sum() <= block_sizes.items.chunk_pages
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
       qblock=st.integers(1, 5), internal=st.integers(0, 2), decision=st.sampled_from(EVERY_DECISION))
def test_plan_covers_every_token_once(seed, depth, fanout, page_size, chunk, qblock, internal, decision):
    rng = np.random.default_rng(seed)
    tree, _ = make_tree(rng, depth=depth, fanout=fanout, page_size=page_size, node_tokens=(0, 50),
                        suffix_tokens=(0, 10), requests_at_internal=internal)
    bs = _bs(chunk, qblock)
    cost = CostModel(shared_token_cost=((1, float(rng.uniform(0.2, 3))),), item_overhead=1.0)
    plan = _plan(tree, decision, bs, cost, min_requests=int(rng.integers(1, 9)))
    check_plan_invariants(tree, plan, bs)
    if decision == "plain":
        assert not plan.use_sharing
    if decision == "share":  # every node below >= 2 requests with tokens, paying or not
        sharable = {n for n in range(tree.num_nodes) if tree.node_lens[n] > 0
                    and sum(n in tree.path(r) for r in range(tree.num_requests)) >= 2}
        assert set(plan.shared_nodes) == sharable and plan.cost_chosen is None


def test_padded_batch_is_the_engine_bucket():
    """The step's batch is the requests' power-of-two bucket, or `min_requests` (the engine's
    bucket) where that is larger."""
    tree = star(3, 64, 8)
    bs = _bs(2, 2)
    assert plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE).shape.num_requests == 4
    assert plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE, min_requests=16).shape.num_requests == 16
    assert plan_step(star(9, 64, 8), block_sizes=bs, cost_model=ALWAYS_SHARE,
                     min_requests=4).shape.num_requests == 16


def test_fallback_decision():
    bs = _bs(64, 16, 64)
    cost = CostModel(shared_token_cost=((2, 2.5), (4, 3.0), (16, 6.0)), item_overhead=8.0,
                     step_overhead=512.0)
    assert cost.sharing_threshold() == 4
    # Long prefix, many requests: sharing pays.
    plan = plan_step(star(16, 8192, 128), block_sizes=bs, cost_model=cost)
    assert plan.use_sharing and plan.shared_nodes == (0,)
    assert plan.cost_chosen < plan.cost_plain
    # Two requests: an item of 2 costs 2.5 plain tokens per token, more than reading twice.
    plan = plan_step(star(2, 8192, 128), block_sizes=bs, cost_model=cost)
    assert not plan.use_sharing and plan.step.item_pages.shape[0] == 0
    assert plan.cost_chosen == plan.cost_plain
    # Three requests (an item of 4 rows: cost 3.0) break even; four clear the threshold.
    assert not plan_step(star(3, 8192, 128), block_sizes=bs, cost_model=cost).use_sharing
    assert plan_step(star(4, 8192, 128), block_sizes=bs, cost_model=cost).use_sharing
    # A short shared prefix does not pay for the step overhead.
    assert not plan_step(star(8, 32, 128), block_sizes=bs, cost_model=cost).use_sharing
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
    bs = _bs(64, 16, 64)
    # 4 requests below 4096 tokens: saving 4 * 4096 - 4096 = 12288 > 1000
    plan = plan_step(star(4, 4096, 64), block_sizes=bs, cost_model=cost)
    assert plan.use_sharing and plan.cost_chosen == plan.cost_plain - 12288 + 1000
    # 16 requests below 1024: saving 15 * 1024 = 15360, under the 16-request item's 50000
    assert not plan_step(star(16, 1024, 64), block_sizes=bs, cost_model=cost).use_sharing
    # ...and 16 below 4096 (61440) clear it
    assert plan_step(star(16, 4096, 64), block_sizes=bs, cost_model=cost).use_sharing
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
    tree = star(3, 10 * ps, 5, page_size=ps)  # page-aligned shared prefix, ragged suffixes
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
    bs = _bs(2, 2)
    check_plan_invariants(got, plan_step(got, block_sizes=bs, cost_model=ALWAYS_SHARE), bs)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), items=st.integers(0, 12), slots=st.integers(0, 6))
def test_pinned_shape_drops_least_valuable_nodes(seed, items, slots):
    rng = np.random.default_rng(seed)
    tree, _ = make_tree(rng, depth=2, fanout=3, page_size=4, node_tokens=(1, 40), suffix_tokens=(1, 9))
    bs = _bs(2, 2)
    cost = CostModel(shared_token_cost=((1, 0.5), (2, 0.9)))
    free = plan_step(tree, block_sizes=bs, cost_model=cost)
    shape = StepShape(num_requests=free.shape.num_requests, num_items=items,
                      private_pages=pow2_bucket(int(tree.request_lengths().max())), merge_slots=slots)
    plan = plan_step(tree, block_sizes=bs, cost_model=cost, shape=shape)
    assert plan.shape == shape
    assert set(plan.shared_nodes) <= set(free.shared_nodes)
    assert int((plan.step.item_page_lens.sum(axis=1) > 0).sum()) <= items
    check_plan_invariants(tree, plan, bs)
    if free.shape.num_items <= items and free.shape.merge_slots <= slots:
        assert plan.shared_nodes == free.shared_nodes


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
    bs = block_sizes(ps)
    plan = plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE)
    assert plan.use_sharing and len(plan.shared_nodes) == 2
    q, k, v = make_inputs(rng, num_requests=plan.shape.num_requests, total_pages=100, num_kv_heads=2,
                          group=2, head_dim=16, page_size=ps, dtype=jnp.float32)
    out = shared_prefix_attention_xla(q, k, v, plan.step, block_sizes=bs)
    table = np.stack([np.pad(t, (0, 16 - len(t))) for t in tables])
    ref = paged_attention_reference(q[:5], k, v, table, np.array(lengths))
    check_close(out[:5], np.asarray(ref)[:5], v, jnp.float32)


def test_shape_pinning_and_validation():
    tree = star(3, 64, 8, page_size=16)
    bs = _bs(2, 2)
    plan = plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE)
    big = StepShape(num_requests=8, num_items=16, private_pages=8, merge_slots=8)
    assert plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE, shape=big).shape == big
    # A pinned shape too small for every shared item: the balancer unshares instead of failing.
    small = StepShape(num_requests=4, num_items=1, private_pages=8, merge_slots=8)
    fitted = plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE, shape=small)
    assert fitted.shape == small and not fitted.use_sharing
    check_plan_invariants(tree, fitted, bs)
    # ... a forced plan does not: it fails
    with pytest.raises(ValueError, match="num_items"):
        forced_plan(tree, share=True, block_sizes=bs, shape=small)
    with pytest.raises(ValueError, match="private_pages"):
        plan_step(tree, block_sizes=bs, cost_model=ALWAYS_SHARE,
                  shape=StepShape(num_requests=4, num_items=1, private_pages=2, merge_slots=8))
    assert plan.shape.num_items == pow2_bucket(plan.shape.num_items)


def test_block_sizes_are_validated():
    with pytest.raises(ValueError, match="chunk_pages must be a power of two"):
        ItemsLaunch(chunk_pages=3, query_block=2)
    with pytest.raises(ValueError, match="pages_per_compute_block=4 must divide chunk_pages=2"):
        ItemsLaunch(chunk_pages=2, query_block=2, pages_per_compute_block=4)
    with pytest.raises(ValueError, match="query_block must be a positive int"):
        ItemsLaunch(chunk_pages=2, query_block=0)
    with pytest.raises(ValueError, match="flat_kv must be a bool"):
        ItemsLaunch(chunk_pages=2, query_block=2, flat_kv=1)
    with pytest.raises(ValueError, match="row_tiers must be a positive int"):
        ItemsLaunch(chunk_pages=2, query_block=2, row_tiers=True)
    with pytest.raises(ValueError, match="pages_per_compute_block=4 must divide pages_per_split=2"):
        SplitLaunch(pages_per_split=2, pages_per_compute_block=4)
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        SplitLaunch(pages_per_split=2, num_warps=3)
    with pytest.raises(ValueError, match="min_programs must be an int >= 0"):
        SplitLaunch(pages_per_split=2, min_programs=-1)
    with pytest.raises(ValueError, match="partials_per_step must be a power of two"):
        MergeLaunch(partials_per_step=3)
    with pytest.raises(TypeError, match="BlockSizes.split must be a SplitLaunch"):
        BlockSizes(items=ItemsLaunch(chunk_pages=2, query_block=2), split=ItemsLaunch(chunk_pages=2, query_block=2))
    # each launch its own tile: the split-KV tile divides pages_per_split, not chunk_pages
    bs = BlockSizes(items=ItemsLaunch(chunk_pages=2, query_block=2, pages_per_compute_block=2),
                    split=SplitLaunch(pages_per_split=8, pages_per_compute_block=8, num_stages=1))
    assert BlockSizes.from_dict(bs.to_dict()) == bs and hash(BlockSizes.from_dict(bs.to_dict())) == hash(bs)


def test_prefix_tree_is_validated():
    with pytest.raises(ValueError, match="cycle"):
        PrefixTree(page_size=4, node_parent=np.array([1, 0]), node_pages=(np.arange(1), np.arange(1, 2)),
                   node_lens=np.array([3, 3]), request_nodes=np.array([0]))
    with pytest.raises(ValueError, match="cycle through node 1"):  # a root, and a cycle beside it
        PrefixTree(page_size=4, node_parent=np.array([-1, 2, 1]), node_pages=(np.arange(1),) * 3,
                   node_lens=np.array([3, 3, 3]), request_nodes=np.array([0]))
    with pytest.raises(ValueError, match="node 0 has 9 tokens but 1 pages"):
        PrefixTree(page_size=4, node_parent=np.array([-1]), node_pages=(np.arange(1),),
                   node_lens=np.array([9]), request_nodes=np.array([0]))
    with pytest.raises(ValueError, match="node 1 has a negative page id"):
        PrefixTree(page_size=4, node_parent=np.array([-1, 0]), node_pages=(np.arange(1), np.array([-3])),
                   node_lens=np.array([4, 2]), request_nodes=np.array([1]))
    # a deep chain: depth by pointer jumping, paths root first
    n = 300
    chain = PrefixTree(page_size=4, node_parent=np.arange(-1, n - 1), node_pages=tuple(np.array([i]) for i in range(n)),
                       node_lens=np.full(n, 4), request_nodes=np.array([n - 1, 5]))
    assert chain.path(0) == list(range(n)) and chain.path(1) == list(range(6))
    assert chain.request_lengths().tolist() == [4 * n, 24]
