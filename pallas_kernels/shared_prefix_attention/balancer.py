"""Host side of shared-prefix decode attention: the prefix tree, the workload balancer, the builder.

A serving engine calls this once per decode step, on the host, with numpy only (no jax, no
device round trip), and the step it builds serves every layer. It turns the batch's prefix tree
into a `SharedPrefixStep`: a handful of int32 arrays padded to static buckets, which
`shared_prefix_attention_xla` (CPU) and `shared_prefix_attention` (Pallas, GPU) consume inside
one compiled function.

The tree (`PrefixTree`) is what a radix prefix cache already has: nodes that own a run of KV
tokens in physical pages, their parents, and the deepest node of each request. A request's
KV is the concatenation of the nodes on its root-to-leaf path. Attention over a set of keys
does not depend on their order, so a node's keys can be attended separately and the partial
results (normalized output, log-sum-exp) merged later. That is the whole trick:

* a node shared by R requests is read once for all R (one matrix product of the node's KV
  against the R x G stacked queries), instead of R times;
* nodes longer than `ItemsLaunch.chunk_pages` pages are split into KV chunks, and blocks of at
  most `ItemsLaunch.query_block` requests share one work item (balance: every item has the
  same static size, so one compiled program serves every tree);
* everything a request does not share (its suffix, and shared nodes that do not pay) goes to
  its *private* page table, run by the plain split-KV paged decode;
* a request's output is the LSE merge of its private partials and of every shared partial on
  its path (`merge_rows`).

`plan_step` runs in stages, each a function below: walk the tree (every request's path, the
requests below each node, in depth-first order), price the sharable nodes with the `CostModel`,
choose what to share (node by node, then within a pinned shape, then whether the step's saving
pays the sharing path's fixed cost), and build the padded step. When sharing does not pay the
step is plain paged decode (`use_sharing=False`, no work items) and runs exactly the fallback
kernel. `forced_plan` builds the step of a given decision instead, for tests and benchmarks that
check or time one path.

Every stage is vectorised numpy over the requests' paths: a handful of array operations per tree
level, not per request, so a 64-request step plans in well under a millisecond.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxsys.pallas_kernels.shapes import pow2_bucket

from .config import BlockSizes, CostModel

__all__ = ["PrefixTree", "SharedPrefixStep", "StepShape", "StepPlan", "plan_step", "forced_plan", "plain_step"]


class SharedPrefixStep(NamedTuple):
    """Device-side description of one decode step: int32 arrays with static (bucketed) shapes.

    A NamedTuple, so jax treats it as a pytree of arrays (no registration, no jax import here).

    Shapes: W work items, C = `ItemsLaunch.chunk_pages`, Qb = `ItemsLaunch.query_block`, B
    padded requests, Pp private pages per request, M shared partials per request. W = M = 0 for a
    step that does not share.

    Attributes:
      item_pages: i32[W, C] physical page of each page slot of each shared work item.
      item_page_lens: i32[W, C] valid tokens in that page (0 for padding slots).
      item_queries: i32[W, Qb] request (row of `q`) of each query slot; B marks an empty slot.
      private_pages: i32[B, Pp] each request's unshared pages (its page table minus shared nodes);
        the attention functions pad Pp to whole splits of `SplitLaunch.pages_per_split`.
      private_page_lens: i32[B, Pp] valid tokens in each private page (0 for padding).
      merge_rows: i32[B, M] the shared partials a request merges, as `item * Qb + slot`;
        W * Qb marks an empty slot.
    """

    item_pages: np.ndarray
    item_page_lens: np.ndarray
    item_queries: np.ndarray
    private_pages: np.ndarray
    private_page_lens: np.ndarray
    merge_rows: np.ndarray


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The static shape of a `SharedPrefixStep` (one compiled function per distinct shape)."""

    num_requests: int  # B
    num_items: int  # W
    private_pages: int  # Pp
    merge_slots: int  # M


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(x.shape[0], np.int64)
    np.cumsum(x[:-1], out=out[1:])
    return out


def _depths(parent: np.ndarray) -> np.ndarray:
    """Depth of every node (roots 0) by pointer jumping: O(N log N) numpy, and a ValueError on a
    cycle (its nodes never reach a root)."""
    depth = (parent >= 0).astype(np.int64)  # distance to `up`, or the depth once `up` is past the root
    up = parent.astype(np.int64)
    for _ in range(max(parent.shape[0], 1).bit_length() + 1):
        live = up >= 0
        if not live.any():
            return depth
        hop = up[live]
        depth[live] += depth[hop]
        up[live] = up[hop]
    raise ValueError(f"node_parent has a cycle through node {int(np.flatnonzero(up >= 0)[0])}")


@dataclasses.dataclass(frozen=True, eq=False)
class PrefixTree:
    """A decode batch's prefix tree (host side, numpy).

    Attributes:
      page_size: tokens per KV page.
      node_parent: i32[N] parent of each node, -1 for a root.
      node_pages: N int arrays; node n's tokens live in these physical pages, in order. Every
        page but the last is full; the last holds `node_lens[n] - (len - 1) * page_size` tokens.
        A child node starts on a fresh page.
      node_lens: i32[N] tokens of each node (0 allowed, then it has no pages).
      request_nodes: i32[B] the deepest node of each request; its KV is the concatenation of
        the nodes on the path from the root to this node.
    """

    page_size: int
    node_parent: np.ndarray
    node_pages: tuple[np.ndarray, ...]
    node_lens: np.ndarray
    request_nodes: np.ndarray

    def __post_init__(self):
        parent = np.asarray(self.node_parent, np.int64).reshape(-1)
        lens = np.asarray(self.node_lens, np.int64).reshape(-1)
        reqs = np.asarray(self.request_nodes, np.int64).reshape(-1)
        pages = tuple(self.node_pages)
        if not all(type(p) is np.ndarray and p.dtype == np.int32 and p.ndim == 1 for p in pages):
            pages = tuple(np.asarray(p, np.int64).reshape(-1) for p in pages)
        n = parent.shape[0]
        if self.page_size <= 0:
            raise ValueError(f"page_size must be positive, got {self.page_size}")
        if lens.shape[0] != n or len(pages) != n:
            raise ValueError(f"node_parent ({n}), node_lens ({lens.shape[0]}) and node_pages "
                             f"({len(pages)}) must describe the same nodes")
        if np.any((parent < -1) | (parent >= n)):
            raise ValueError("node_parent entries must be -1 or a node id")
        if np.any(lens < 0):
            raise ValueError("node_lens must be >= 0")
        counts = np.fromiter(map(len, pages), np.int64, count=n)
        bad = np.flatnonzero(counts != -(-lens // self.page_size))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"node {i} has {lens[i]} tokens but {counts[i]} pages (page_size {self.page_size})")
        flat = np.concatenate(pages) if n else np.zeros(0, np.int64)
        if np.any(flat < 0):
            i = int(np.searchsorted(np.cumsum(counts), int(np.flatnonzero(flat < 0)[0]), side="right"))
            raise ValueError(f"node {i} has a negative page id")
        if np.any((reqs < 0) | (reqs >= n)):
            raise ValueError("request_nodes entries must be node ids")
        depth = _depths(parent)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        # every page's valid tokens: full pages, then each node's last page holds the rest
        fill = np.full(flat.shape[0], self.page_size, np.int64)
        last = offsets[1:][counts > 0] - 1
        fill[last] = lens[counts > 0] - self.page_size * (counts[counts > 0] - 1)
        set_ = functools.partial(object.__setattr__, self)
        set_("node_parent", parent.astype(np.int32))
        set_("node_lens", lens.astype(np.int32))
        set_("request_nodes", reqs.astype(np.int32))
        if flat.dtype != np.int32:
            pages = tuple(p.astype(np.int32) for p in pages)
        set_("node_pages", pages)
        # flat views for the vectorised planner: node n's pages are flat_pages[page_offsets[n]:
        # page_offsets[n + 1]], with page_fill valid tokens each
        set_("node_depth", depth.astype(np.int32))
        set_("flat_pages", flat.astype(np.int32))
        set_("page_fill", fill.astype(np.int32))
        set_("page_offsets", offsets)

    @property
    def num_nodes(self) -> int:
        return int(self.node_parent.shape[0])

    @property
    def num_requests(self) -> int:
        return int(self.request_nodes.shape[0])

    def path(self, request: int) -> list[int]:
        """Node ids on a request's root-to-leaf path."""
        row = self.paths[request]
        return [int(n) for n in row[row >= 0]]

    @functools.cached_property
    def paths(self) -> np.ndarray:
        """i32[B, D] each request's root-to-leaf node ids (column = depth), -1 past its end."""
        b = self.num_requests
        depth_b = self.node_depth[self.request_nodes].astype(np.int64)
        out = np.full((b, int(depth_b.max(initial=-1)) + 1), -1, np.int32)
        rows = np.arange(b)
        node = self.request_nodes.astype(np.int64)
        for k in range(out.shape[1]):  # leaf first, one tree level per step
            live = node >= 0
            out[rows[live], depth_b[live] - k] = node[live]
            node = np.where(live, self.node_parent[np.maximum(node, 0)], -1)
        return out

    def node_page_lens(self, node: int) -> np.ndarray:
        """i32[pages] valid tokens of each page of a node."""
        return self.page_fill[self.page_offsets[node]:self.page_offsets[node + 1]]

    def request_lengths(self) -> np.ndarray:
        """i32[B] total KV tokens of each request."""
        return np.where(self.paths >= 0, self.node_lens[self.paths], 0).sum(axis=1).astype(np.int32)

    @classmethod
    def from_page_tables(cls, page_tables, lengths: Sequence[int], page_size: int) -> "PrefixTree":
        """Infers the tree from per-request page tables: equal physical pages are shared KV.

        Request i's KV is `lengths[i]` tokens in pages `page_tables[i][:ceil(lengths[i] /
        page_size)]`. Two requests share a node where their page tables agree page for page
        from the start, with the same number of valid tokens in each page (a paged radix cache
        shares only such pages). Anything else is private to a request, which is always
        correct (it is only read more often).

        Sorting the requests' page sequences and taking the longest common prefix of
        neighbours gives the tree in one stack pass (like a suffix tree from a suffix array):
        O(B * P) numpy work plus O(B) Python, so it can run every decode step.

        Args:
          page_tables: i32[B, P] array, or B sequences of physical page ids (longer than
            needed is fine).
          lengths: B token counts.
          page_size: tokens per page.
        """
        lengths = np.asarray(lengths, np.int64).reshape(-1)
        b = lengths.shape[0]
        n_pages = -(-lengths // page_size)
        width = max(int(n_pages.max(initial=0)), 1)
        tab = np.zeros((b, width), np.int64)
        if isinstance(page_tables, np.ndarray) and page_tables.ndim == 2:
            if page_tables.shape[0] != b or page_tables.shape[1] < int(n_pages.max(initial=0)):
                raise ValueError(f"page_tables {page_tables.shape} too small for {b} requests of "
                                 f"up to {int(n_pages.max(initial=0))} pages")
            tab[:] = page_tables[:, :width]
        else:
            if len(page_tables) != b:
                raise ValueError("page_tables and lengths must have one entry per request")
            for r, pt in enumerate(page_tables):
                if len(pt) < n_pages[r]:
                    raise ValueError(f"a page table has {len(pt)} pages for {lengths[r]} tokens")
                tab[r, :n_pages[r]] = np.asarray(pt[:n_pages[r]], np.int64)
        col = np.arange(width)
        fill = np.clip(lengths[:, None] - page_size * col[None, :], 0, page_size)
        valid = col[None, :] < n_pages[:, None]
        # One key per (page, valid tokens); past a request's end a key no other row has.
        key = np.where(valid, tab * (page_size + 1) + fill, -1 - np.arange(b)[:, None])
        order = np.lexsort(key.T[::-1])
        eq = key[order[1:]] == key[order[:-1]]
        lcp = np.where(eq.all(axis=1), width, eq.argmin(axis=1))
        parent: list[int] = []
        rep: list[int] = []
        lo: list[int] = []
        hi: list[int] = []

        def new_node(par, row, a, z):
            parent.append(par)
            rep.append(row)
            lo.append(a)
            hi.append(z)
            return len(parent) - 1

        stack: list[int] = []  # the previous request's path, root first
        leaf = np.zeros(b, np.int64)
        empty = -1
        for i, r in enumerate(order):
            n = int(n_pages[r])
            shared = 0 if i == 0 else min(int(lcp[i - 1]), n)
            while stack and lo[stack[-1]] >= shared:
                stack.pop()
            if stack and hi[stack[-1]] > shared:  # split the last common node at `shared`
                top = stack[-1]
                up = new_node(parent[top], rep[top], lo[top], shared)
                parent[top] = up
                lo[top] = shared
                stack[-1] = up
            if n > shared:
                node = new_node(stack[-1] if stack else -1, int(r), shared, n)
                stack.append(node)
                leaf[r] = node
            elif stack:
                leaf[r] = stack[-1]
            else:  # an empty request
                if empty < 0:
                    empty = new_node(-1, int(r), 0, 0)
                leaf[r] = empty
        if not parent:
            new_node(-1, 0, 0, 0)
        node_pages = tuple(tab[rep[j], lo[j]:hi[j]] for j in range(len(parent)))
        node_lens = np.array([int(fill[rep[j], lo[j]:hi[j]].sum()) for j in range(len(parent))])
        return cls(page_size=page_size, node_parent=np.array(parent), node_pages=node_pages,
                   node_lens=node_lens, request_nodes=leaf)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What `plan_step` decided, with the step to pass to the device.

    Attributes:
      step: the padded `SharedPrefixStep`.
      use_sharing: False when the step falls back to plain paged decode (no work items).
      shared_nodes: tree nodes read once for all their requests.
      num_requests: real requests (rows of `step` past this are padding).
      cost_plain: cost of plain paged decode, in request-tokens (`CostModel` units).
      cost_chosen: predicted cost of the chosen plan, same units; None for a `forced_plan`.
      kv_tokens_read: KV tokens the chosen plan streams (per KV head), padding excluded.
    """

    step: SharedPrefixStep
    use_sharing: bool
    shared_nodes: tuple[int, ...]
    num_requests: int
    cost_plain: float
    cost_chosen: float | None
    kv_tokens_read: int

    @property
    def shape(self) -> StepShape:
        s = self.step
        return StepShape(num_requests=s.private_pages.shape[0], num_items=s.item_pages.shape[0],
                         private_pages=s.private_pages.shape[1], merge_slots=s.merge_rows.shape[1])


# -- stage 1: walk the tree ------------------------------------------------------------------------


class _Sharable(NamedTuple):
    """The nodes worth considering for sharing (>= 2 requests below, >= 1 token), in the order a
    depth-first walk first meets them, with the requests below each."""

    nodes: np.ndarray  # i64[S] node ids
    order: np.ndarray  # i64[B] requests in depth-first order: each node's requests are contiguous
    first: np.ndarray  # i64[S] where each node's requests start in `order`
    count: np.ndarray  # i64[S] how many requests are below each node


def _sharable(tree: PrefixTree) -> _Sharable:
    paths = tree.paths
    # lexicographic order of the root-first paths is a depth-first walk (children by id; a
    # request that ends at a node comes before the node's children, as -1 sorts first)
    order = np.lexsort(paths.T[::-1]) if paths.shape[1] else np.arange(paths.shape[0])
    walk = paths[order].ravel()
    below = np.bincount(walk[walk >= 0], minlength=tree.num_nodes)
    ok = np.zeros(tree.num_nodes + 1, bool)  # the extra entry is -1's: never sharable
    ok[:-1] = (below >= 2) & (tree.node_lens > 0)
    hits = np.flatnonzero(ok[walk])
    nodes, at = np.unique(walk[hits], return_index=True)
    seen = np.argsort(hits[at], kind="stable")  # in the order the walk first meets them
    nodes, first = nodes[seen].astype(np.int64), hits[at][seen] // max(paths.shape[1], 1)
    return _Sharable(nodes=nodes, order=order, first=first, count=below[nodes])


# -- stage 2: price the sharable nodes --------------------------------------------------------------


class _Prices(NamedTuple):
    chunks: np.ndarray  # i64[S] KV chunks of each node
    blocks: np.ndarray  # i64[S] query blocks of each node
    items: np.ndarray  # i64[S] work items (chunks x blocks)
    cost: np.ndarray | None  # f64[S] shared cost (request-tokens), None without a cost model
    saving: np.ndarray | None  # f64[S] plain cost - shared cost


def _price(tree: PrefixTree, sharable: _Sharable, block_sizes: BlockSizes, cost_model: CostModel | None) -> _Prices:
    cp, qb, ps = block_sizes.items.chunk_pages, block_sizes.items.query_block, tree.page_size
    n_pages = tree.page_offsets[sharable.nodes + 1] - tree.page_offsets[sharable.nodes]
    chunks = -(-n_pages // cp)
    blocks = -(-sharable.count // qb)
    if cost_model is None:
        return _Prices(chunks, blocks, chunks * blocks, None, None)
    last = sharable.count - (blocks - 1) * qb  # requests in each node's last block
    per_item = {int(s): cp * ps * cost_model.token_cost(int(s)) + cost_model.item_overhead
                for s in np.unique(np.append(last, qb))}
    cost = chunks * ((blocks - 1) * per_item[qb] + np.array([per_item[int(s)] for s in last], np.float64))
    saving = sharable.count * tree.node_lens[sharable.nodes].astype(np.float64) - cost
    return _Prices(chunks, blocks, chunks * blocks, cost, saving)


# -- stage 3: choose what to share -----------------------------------------------------------------


def _merge_need(tree: PrefixTree, nodes: np.ndarray, chunks: np.ndarray) -> int:
    """Shared partials of the request that merges the most, sharing `nodes` (of `chunks` each)."""
    per_node = np.zeros(tree.num_nodes, np.int64)
    per_node[nodes] = chunks
    paths = tree.paths
    return int(np.where(paths >= 0, per_node[paths], 0).sum(axis=1).max(initial=0))


def _choose(tree: PrefixTree, sharable: _Sharable, prices: _Prices, block_sizes: BlockSizes,
            cost_model: CostModel, shape: StepShape | None) -> tuple[np.ndarray, float]:
    """Indices (into `sharable`) of the nodes to share, and the step overhead they pay.

    A node is shared where it saves; a pinned shape then unshares the nodes that save the least
    per work item until the items and merge slots fit; the step shares at all only if the
    summed saving exceeds the overhead of its largest item (`CostModel.overhead`)."""
    chosen = [int(i) for i in np.flatnonzero(prices.saving > 0)]
    if shape is not None:
        def fits():
            idx = np.asarray(chosen, np.int64)
            return (int(prices.items[idx].sum()) <= shape.num_items
                    and _merge_need(tree, sharable.nodes[idx], prices.chunks[idx]) <= shape.merge_slots)

        while chosen and not fits():
            chosen.remove(min(chosen, key=lambda i: prices.saving[i] / prices.items[i]))
    qb = block_sizes.items.query_block
    overhead = cost_model.overhead(max([min(qb, int(sharable.count[i])) for i in chosen] + [0]))
    if not chosen or sum(float(prices.saving[i]) for i in chosen) <= overhead:
        return np.zeros(0, np.int64), overhead
    return np.asarray(chosen, np.int64), overhead


# -- stage 4: build the padded step ---------------------------------------------------------------


def _items(tree: PrefixTree, sharable: _Sharable, prices: _Prices, chosen: np.ndarray, block_sizes: BlockSizes):
    """Work items of the chosen nodes, node-major, then query block, then KV chunk: (pages
    i32[W, C], page lens i32[W, C], requests i64[W, Qb] with -1 for an empty slot)."""
    cp, qb = block_sizes.items.chunk_pages, block_sizes.items.query_block
    per_node = prices.items[chosen]
    w = int(per_node.sum())
    which = np.repeat(chosen, per_node)  # each item's index into `sharable`
    k = np.arange(w) - np.repeat(_exclusive_cumsum(per_node), per_node)
    block, chunk = np.divmod(k, prices.chunks[which])
    node = sharable.nodes[which]
    page = chunk[:, None] * cp + np.arange(cp)[None, :]  # [W, C] page index within the node
    n_pages = (tree.page_offsets[node + 1] - tree.page_offsets[node])[:, None]
    src = np.minimum(tree.page_offsets[node][:, None] + page, max(tree.flat_pages.shape[0] - 1, 0))
    valid = page < n_pages
    pages = np.where(valid, tree.flat_pages[src] if w else 0, 0).astype(np.int32)
    lens = np.where(valid, tree.page_fill[src] if w else 0, 0).astype(np.int32)
    slot = block[:, None] * qb + np.arange(qb)[None, :]  # [W, Qb] position among the node's requests
    at = np.minimum(sharable.first[which][:, None] + slot, sharable.order.shape[0] - 1)
    requests = np.where(slot < sharable.count[which][:, None], sharable.order[at] if w else -1, -1)
    return pages, lens, requests


def _private(tree: PrefixTree, shared_nodes: np.ndarray):
    """Each request's pages outside the shared nodes, root first: (pages, lens, request, column)
    of every private page, flat."""
    paths = tree.paths
    is_shared = np.zeros(tree.num_nodes + 1, bool)  # the extra entry is -1's
    is_shared[shared_nodes] = True
    keep = (paths >= 0) & ~is_shared[paths]
    req, col_of_node = np.nonzero(keep)  # row-major: by request, then root first
    node = paths[req, col_of_node].astype(np.int64)
    count = tree.page_offsets[node + 1] - tree.page_offsets[node]
    starts = _exclusive_cumsum(count)
    total = int(count.sum())
    k = np.arange(total) - np.repeat(starts, count)
    src = np.repeat(tree.page_offsets[node], count) + k
    row = np.repeat(req, count)
    first_of_request = starts[np.searchsorted(req, req, side="left")]
    col = np.arange(total) - np.repeat(first_of_request, count)
    return tree.flat_pages[src], tree.page_fill[src], row, col


def _build(tree: PrefixTree, sharable: _Sharable, prices: _Prices, chosen: np.ndarray, block_sizes: BlockSizes,
           shape: StepShape | None, min_requests: int):
    """The padded `SharedPrefixStep` sharing `chosen`, and the KV tokens it reads."""
    qb, cp = block_sizes.items.query_block, block_sizes.items.chunk_pages
    n_req = tree.num_requests
    item_pages, item_lens, item_requests = _items(tree, sharable, prices, chosen, block_sizes)
    pages, lens, row, col = _private(tree, sharable.nodes[chosen])
    # merge rows: each request's (item, slot)s in item order
    w_idx, s_idx = np.nonzero(item_requests >= 0)
    r_idx = item_requests[w_idx, s_idx]
    by_request = np.argsort(r_idx, kind="stable")
    r_sorted = r_idx[by_request]
    m_col = np.arange(r_sorted.shape[0]) - np.searchsorted(r_sorted, r_sorted, side="left")
    need = StepShape(num_requests=n_req, num_items=item_pages.shape[0],
                     private_pages=int(col.max(initial=-1)) + 1, merge_slots=int(m_col.max(initial=-1)) + 1)
    if shape is None:
        shape = StepShape(num_requests=pow2_bucket(n_req, min_requests), num_items=pow2_bucket(need.num_items, 0),
                          private_pages=pow2_bucket(need.private_pages, 1),
                          merge_slots=pow2_bucket(need.merge_slots, 0))
    for f in dataclasses.fields(StepShape):
        if getattr(need, f.name) > getattr(shape, f.name):
            raise ValueError(f"step needs {f.name}={getattr(need, f.name)} but the shape has {getattr(shape, f.name)}")
    if shape.private_pages <= 0:
        raise ValueError(f"shape.private_pages={shape.private_pages} must be positive")
    if chosen.size and shape.num_items == 0:
        raise ValueError("a sharing step needs num_items > 0")
    B, W, Pp, M = shape.num_requests, shape.num_items, shape.private_pages, shape.merge_slots
    step = SharedPrefixStep(
        item_pages=np.zeros((W, cp), np.int32),
        item_page_lens=np.zeros((W, cp), np.int32),
        item_queries=np.full((W, qb), B, np.int32),
        private_pages=np.zeros((B, Pp), np.int32),
        private_page_lens=np.zeros((B, Pp), np.int32),
        merge_rows=np.full((B, M), W * qb, np.int32),
    )
    w = item_pages.shape[0]
    step.item_pages[:w] = item_pages
    step.item_page_lens[:w] = item_lens
    step.item_queries[:w] = np.where(item_requests >= 0, item_requests, B)
    step.private_pages[row, col] = pages
    step.private_page_lens[row, col] = lens
    step.merge_rows[r_sorted, m_col] = (w_idx * qb + s_idx)[by_request]
    return step, int(lens.sum()), int(item_lens.sum())


def _plan(tree: PrefixTree, sharable: _Sharable, prices: _Prices, chosen: np.ndarray, block_sizes: BlockSizes,
          shape: StepShape | None, min_requests: int, overhead: float | None) -> StepPlan:
    step, private_tokens, item_tokens = _build(tree, sharable, prices, chosen, block_sizes, shape, min_requests)
    cost_plain = float(tree.request_lengths().sum())
    if overhead is None:
        cost_chosen = None
    elif chosen.size:
        cost_chosen = float(private_tokens + sum(float(prices.cost[i]) for i in chosen) + overhead)
    else:
        cost_chosen = cost_plain
    return StepPlan(step=step, use_sharing=bool(chosen.size), shared_nodes=tuple(int(n) for n in sharable.nodes[chosen]),
                    num_requests=tree.num_requests, cost_plain=cost_plain, cost_chosen=cost_chosen,
                    kv_tokens_read=private_tokens + item_tokens)


def plan_step(tree: PrefixTree, *, block_sizes: BlockSizes, cost_model: CostModel, shape: StepShape | None = None,
              min_requests: int = 1) -> StepPlan:
    """Balances one decode step and builds its padded `SharedPrefixStep` (numpy, host side).

    Args:
      tree: the batch's `PrefixTree`; row r of the step (and of `q`) is request r.
      block_sizes: tiling; `items.chunk_pages` and `items.query_block` shape the step.
      cost_model: what a shared work item costs relative to plain paged decode.
      shape: pin these static sizes (the engine's precompiled bucket); by default each size is
        the next power of two. With a pinned shape the balancer unshares the nodes that save
        least per work item until the items and merge slots fit; ValueError if the requests or
        their private pages still do not fit.
      min_requests: smallest padded batch (the engine's smallest bucket).

    Returns:
      A `StepPlan`; pass `plan.step` to the attention functions.
    """
    sharable = _sharable(tree)
    prices = _price(tree, sharable, block_sizes, cost_model)
    chosen, overhead = _choose(tree, sharable, prices, block_sizes, cost_model, shape)
    return _plan(tree, sharable, prices, chosen, block_sizes, shape, min_requests, overhead)


def forced_plan(tree: PrefixTree, *, share: bool, block_sizes: BlockSizes, shape: StepShape | None = None,
                min_requests: int = 1) -> StepPlan:
    """The step of a given decision, for tests and benchmarks that check or time one path:
    `share=True` shares every node below >= 2 requests (whether it pays or not; ValueError where
    a pinned shape cannot hold them), `share=False` none. Arguments as `plan_step`'s; the plan
    has no predicted cost (`cost_chosen` is None)."""
    sharable = _sharable(tree)
    prices = _price(tree, sharable, block_sizes, None)
    chosen = np.arange(sharable.nodes.shape[0]) if share else np.zeros(0, np.int64)
    return _plan(tree, sharable, prices, chosen, block_sizes, shape, min_requests, None)


def plain_step(page_indices: np.ndarray, lengths: np.ndarray, page_size: int, *,
               block_sizes: BlockSizes) -> SharedPrefixStep:
    """A non-sharing `SharedPrefixStep` from classic page tables (i32[B, P]) and lengths (i32[B]).

    The private page table is the page table itself (padded to a multiple of
    `split.pages_per_split` when longer than one split).
    """
    page_indices = np.asarray(page_indices, np.int32)
    lengths = np.asarray(lengths, np.int32)
    b, p = page_indices.shape
    sp = block_sizes.split.pages_per_split
    pp = max(p, 1) if max(p, 1) <= sp else sp * math.ceil(p / sp)
    pages = np.zeros((b, pp), np.int32)
    pages[:, :p] = page_indices
    fill = np.clip(lengths[:, None] - page_size * np.arange(pp)[None, :], 0, page_size)
    return SharedPrefixStep(
        item_pages=np.zeros((0, block_sizes.items.chunk_pages), np.int32),
        item_page_lens=np.zeros((0, block_sizes.items.chunk_pages), np.int32),
        item_queries=np.zeros((0, block_sizes.items.query_block), np.int32),
        private_pages=pages,
        private_page_lens=fill.astype(np.int32),
        merge_rows=np.zeros((b, 0), np.int32),
    )
