"""Shared cases of the shared-prefix attention tests: random prefix trees, inputs, named cases,
tiles valid for the Triton kernels, and the dtype tolerances every path is held to.

The Pallas kernels run in the interpreter on CPU. `make gpu-check` sets JAXSYS_PALLAS_COMPILED=1
(and JAX_PLATFORMS=cuda), which compiles them for real: the same cases then check the Triton
kernels.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from jaxsys.pallas_kernels.shared_prefix_attention import (
    BlockSizes,
    CostModel,
    ItemsLaunch,
    PrefixTree,
    SplitLaunch,
    forced_plan,
    plan_step,
    shared_prefix_attention_reference,
)

INTERPRET = os.environ.get("JAXSYS_PALLAS_COMPILED", "0") != "1"

# fp32: every path computes in fp32; differences are summation order only.
FP32_TOL = 1e-5
# bf16: q, k, v are the same bf16 numbers in every path (the reference upcasts them), and
# scores, softmax statistics and accumulators are fp32. Two roundings remain: probabilities are
# rounded to bf16 before the PV product (unit roundoff u = 2**-8 per weight, so the normalized
# output moves by at most u * max|v|), and the output is rounded to bf16 (u * |o|). Hence
# |out - ref| <= u * (max|v| + |ref|), checked elementwise, plus FP32_TOL for the fp32 part.
BF16_U = 2.0**-8

# How a test plans a step: the cost model decides (None), or every sharable node is shared, or none.
EVERY_DECISION = (None, "share", "plain")

# A cost model under which every node below >= 2 requests pays.
ALWAYS_SHARE = CostModel(shared_token_cost=((1, 1e-3),))


def check_close(out, ref, v, dtype):
    """`out` against the float32 reference within the dtype's bound (see FP32_TOL, BF16_U)."""
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


def make_tree(rng, *, depth, fanout, page_size, node_tokens=(1, 40), suffix_tokens=(1, 20),
              requests_at_internal=0, spare_pages=5):
    """A full `fanout`-ary tree of `depth` levels below the root, a private suffix node per
    leaf (one request each), optionally extra requests that end at internal nodes.
    Pages are a random permutation of a pool with spare (unused) pages. Returns (tree, pool size)."""
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


def star(num_requests, prefix, suffix, page_size=16):
    """One root of `prefix` tokens with `num_requests` children of `suffix` tokens, pages in order."""
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


def make_inputs(rng, *, num_requests, total_pages, num_kv_heads, group, head_dim, page_size, dtype):
    """q [B, Hq, D], k/v_pages [Hkv, pages, page_size, D] in `dtype`."""
    hq = num_kv_heads * group
    q = rng.standard_normal((num_requests, hq, head_dim)).astype(np.float32)
    k = rng.standard_normal((num_kv_heads, total_pages, page_size, head_dim)).astype(np.float32)
    v = rng.uniform(-2, 2, (num_kv_heads, total_pages, page_size, head_dim)).astype(np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def block_sizes(page_size, *, chunk_tiles=2, query_block=2, split_tiles=2, **items) -> BlockSizes:
    """Kernel-valid tiles for a page size: 16-token compute tiles, chunks and splits of 2 tiles
    (more with `chunk_tiles` / `split_tiles`); `items` sets more `ItemsLaunch` fields."""
    ppcb = max(1, 16 // page_size)
    return BlockSizes(items=ItemsLaunch(chunk_pages=chunk_tiles * ppcb, query_block=query_block,
                                        pages_per_compute_block=ppcb, **items),
                      split=SplitLaunch(pages_per_split=split_tiles * ppcb, pages_per_compute_block=ppcb))


# Named cases: tree shape, heads, page size (and extra request rows of padding)
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
NO_SHARING = ("chain_no_sharing", "single_request")


def setup(name, dtype, seed=0):
    """(tree, q, k_pages, v_pages) of a named case."""
    c = dict(CASES[name])
    pad = c.pop("pad_requests", 0)
    kv_heads, group = c.pop("num_kv_heads"), c.pop("group")
    rng = np.random.default_rng(seed + sum(map(ord, name)))
    tree, total_pages = make_tree(rng, **c)
    q, k, v = make_inputs(rng, num_requests=tree.num_requests + pad, total_pages=total_pages,
                          num_kv_heads=kv_heads, group=group, head_dim=16,
                          page_size=c["page_size"], dtype=dtype)
    return tree, q, k, v


def plan(tree, q, decision, bs, cost_model=ALWAYS_SHARE):
    """The step of `decision` (EVERY_DECISION) for q's batch, and q padded to the step's batch."""
    if decision is None:
        p = plan_step(tree, block_sizes=bs, cost_model=cost_model, min_requests=q.shape[0])
    else:
        p = forced_plan(tree, share=decision == "share", block_sizes=bs, min_requests=q.shape[0])
    b = p.shape.num_requests
    q = jnp.concatenate([q, jnp.zeros((b - q.shape[0],) + q.shape[1:], q.dtype)]) if b > q.shape[0] else q
    return p, q


def reference(tree, q, k, v):
    return np.asarray(shared_prefix_attention_reference(q, k, v, tree))
