"""Host side of shared-prefix decode attention: the prefix tree, the workload balancer, the builder.

A serving engine calls this once per decode step, on the host, with numpy only (no jax, no
device round trip). It turns the batch's prefix tree into a `SharedPrefixStep`: a handful of
int32 arrays padded to static buckets, which `shared_prefix_attention_xla` (CPU) and
`shared_prefix_attention` (Pallas, GPU) consume inside one compiled function.

The tree (`PrefixTree`) is what a radix prefix cache already has: nodes that own a run of KV
tokens in physical pages, their parents, and the deepest node of each request. A request's
KV is the concatenation of the nodes on its root-to-leaf path. Attention over a set of keys
does not depend on their order, so a node's keys can be attended separately and the partial
results (normalized output, log-sum-exp) merged later. That is the whole trick:

* a node shared by R requests is read once for all R (one matrix product of the node's KV
  against the R x G stacked queries), instead of R times;
* nodes longer than `BlockSizes.chunk_pages` pages are split into KV chunks, and blocks of at
  most `BlockSizes.query_block` requests share one work item (balance: every item has the
  same static size, so one compiled program serves every tree);
* everything a request does not share (its suffix, and shared nodes that do not pay) goes to
  its *private* page table, run by the plain split-KV paged decode;
* a request's output is the LSE merge of its private partials and of every shared partial on
  its path (`merge_rows`).

The cost model (`CostModel`, measured by `benchmarks/attention.py`) decides node by node
whether sharing pays (reading the KV once costs a padded, wider matrix product), and per
step whether the sharing path pays at all; when it does not, the step is plain paged decode
(`use_sharing=False`, no work items) and runs exactly the fallback kernel.

Cost: O(sum over requests of path length + pages touched), i.e. O(batch) for a bounded tree
depth, plus writing the page ids themselves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .tuned_block_sizes import BlockSizes, CostModel

__all__ = [
    "PrefixTree",
    "SharedPrefixStep",
    "StepShape",
    "StepPlan",
    "plan_step",
    "plain_step",
    "bucket",
]


class SharedPrefixStep(NamedTuple):
    """Device-side description of one decode step: int32 arrays with static (bucketed) shapes.

    A NamedTuple, so jax treats it as a pytree of arrays (no registration, no jax import here).

    Shapes: W work items, C = `BlockSizes.chunk_pages`, Qb = `BlockSizes.query_block`,
    B padded requests, Pp private pages per request, M shared partials per request. W = M = 0 for a step that does not share.

    Attributes:
      item_pages: i32[W, C] physical page of each page slot of each shared work item.
      item_page_lens: i32[W, C] valid tokens in that page (0 for padding slots).
      item_queries: i32[W, Qb] request (row of `q`) of each query slot; B marks an empty slot.
      private_pages: i32[B, Pp] each request's unshared pages (its page table minus shared nodes);
        the attention functions pad Pp to whole splits of `split_pages`.
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


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum) (0 stays 0 when minimum is 0)."""
    n = max(int(n), int(minimum))
    return 0 if n == 0 else 1 << (n - 1).bit_length()


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
        pages = tuple(np.asarray(p, np.int64).reshape(-1) for p in self.node_pages)
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
        for i, (p, length) in enumerate(zip(pages, lens)):
            if p.shape[0] != -(-int(length) // self.page_size):
                raise ValueError(f"node {i} has {length} tokens but {p.shape[0]} pages "
                                 f"(page_size {self.page_size})")
            if np.any(p < 0):
                raise ValueError(f"node {i} has a negative page id")
        if np.any((reqs < 0) | (reqs >= n)):
            raise ValueError("request_nodes entries must be node ids")
        depth = np.full(n, -1, np.int64)
        for i in range(n):  # cycle check; amortized O(N)
            chain = []
            j = i
            while j != -1 and depth[j] < 0:
                if j in chain:
                    raise ValueError(f"node_parent has a cycle through node {j}")
                chain.append(j)
                j = int(parent[j])
            base = -1 if j == -1 else int(depth[j])
            for k, c in enumerate(reversed(chain)):
                depth[c] = base + 1 + k
        object.__setattr__(self, "node_parent", parent.astype(np.int32))
        object.__setattr__(self, "node_lens", lens.astype(np.int32))
        object.__setattr__(self, "request_nodes", reqs.astype(np.int32))
        object.__setattr__(self, "node_pages", tuple(p.astype(np.int32) for p in pages))

    @property
    def num_nodes(self) -> int:
        return int(self.node_parent.shape[0])

    @property
    def num_requests(self) -> int:
        return int(self.request_nodes.shape[0])

    def path(self, request: int) -> list[int]:
        """Node ids on a request's root-to-leaf path."""
        out = []
        j = int(self.request_nodes[request])
        while j != -1:
            out.append(j)
            j = int(self.node_parent[j])
        return out[::-1]

    def node_page_lens(self, node: int) -> np.ndarray:
        """i32[pages] valid tokens of each page of a node."""
        n_pages = self.node_pages[node].shape[0]
        return np.minimum(self.page_size,
                          int(self.node_lens[node]) - self.page_size * np.arange(n_pages)
                          ).astype(np.int32)

    def request_lengths(self) -> np.ndarray:
        """i32[B] total KV tokens of each request."""
        return np.array([sum(int(self.node_lens[n]) for n in self.path(r))
                         for r in range(self.num_requests)], np.int32)

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
      cost_plain: predicted cost of plain paged decode, in request-tokens (`CostModel`).
      cost_chosen: predicted cost of the chosen plan, same units.
      kv_tokens_read: KV tokens the chosen plan streams (per KV head), padding excluded.
    """

    step: SharedPrefixStep
    use_sharing: bool
    shared_nodes: tuple[int, ...]
    num_requests: int
    cost_plain: float
    cost_chosen: float
    kv_tokens_read: int

    @property
    def shape(self) -> StepShape:
        s = self.step
        return StepShape(num_requests=s.private_pages.shape[0], num_items=s.item_pages.shape[0],
                         private_pages=s.private_pages.shape[1], merge_slots=s.merge_rows.shape[1])


def _requests_in_dfs_order(tree: PrefixTree) -> list[int]:
    """Requests ordered by a depth-first walk, so each node's requests are contiguous."""
    children: list[list[int]] = [[] for _ in range(tree.num_nodes)]
    roots = []
    for n, p in enumerate(tree.node_parent):
        (roots if p < 0 else children[int(p)]).append(n)
    at_node: list[list[int]] = [[] for _ in range(tree.num_nodes)]
    for r, n in enumerate(tree.request_nodes):
        at_node[int(n)].append(r)
    order: list[int] = []
    stack = roots[::-1]
    while stack:
        n = stack.pop()
        order.extend(at_node[n])
        stack.extend(children[n][::-1])
    return order


def plan_step(tree: PrefixTree, *, block_sizes: BlockSizes, cost_model: CostModel,
              shape: StepShape | None = None, force: str | None = None,
              min_requests: int = 1) -> StepPlan:
    """Balances one decode step and builds its padded `SharedPrefixStep` (numpy, host side).

    Args:
      tree: the batch's `PrefixTree`; row r of the step (and of `q`) is request r.
      block_sizes: tiling; `chunk_pages`, `query_block` and `split_pages` shape the step.
      cost_model: what a shared work item costs relative to plain paged decode.
      shape: pin these static sizes (the engine's precompiled bucket); by default each size is
        the next power of two (`bucket`). With a pinned shape the balancer unshares the nodes
        that save least per work item until the items and merge slots fit; ValueError if the
        requests or their private pages still do not fit.
      force: None (the cost model decides), "share" (share every node with >= 2 requests;
        for tests and benchmarks), or "plain" (no sharing).
      min_requests: smallest padded batch (the engine's smallest bucket).

    Returns:
      A `StepPlan`; pass `plan.step` to the attention functions.
    """
    if force not in (None, "share", "plain"):
        raise ValueError(f"force must be None, 'share' or 'plain', got {force!r}")
    ps = tree.page_size
    qb = block_sizes.query_block
    cp = block_sizes.chunk_pages
    n_req = tree.num_requests
    paths = [tree.path(r) for r in range(n_req)]
    below = np.zeros(tree.num_nodes, np.int64)
    for path in paths:
        for n in set(path):
            below[n] += 1
    order = _requests_in_dfs_order(tree)
    reqs_below: dict[int, list[int]] = {}
    for r in order:
        for n in paths[r]:
            if below[n] >= 2 and tree.node_lens[n] > 0:
                reqs_below.setdefault(n, []).append(r)

    cost_plain = float(sum(int(tree.node_lens[n]) for path in paths for n in path))
    n_chunks, n_items, saving = {}, {}, {}
    cost_sh: dict[int, float] = {}
    shared: list[int] = []
    for n, rs in reqs_below.items():
        n_chunks[n] = -(-tree.node_pages[n].shape[0] // cp)
        blocks = [min(qb, len(rs) - q0) for q0 in range(0, len(rs), qb)]
        n_items[n] = n_chunks[n] * len(blocks)
        cost_sh[n] = n_chunks[n] * sum(cp * ps * cost_model.token_cost(blk) + cost_model.item_overhead
                                       for blk in blocks)
        saving[n] = float(len(rs) * int(tree.node_lens[n])) - cost_sh[n]
        if force == "share" or (force is None and saving[n] > 0):
            shared.append(n)
    if shape is not None and force != "share":
        # A pinned shape bounds the work items and merge slots: drop the nodes that save the
        # least per work item until the step fits (their tokens go to the private tables).
        def merge_need(nodes):
            s = set(nodes)
            return max([sum(n_chunks[n] for n in path if n in s) for path in paths] + [0])

        while shared and (sum(n_items[n] for n in shared) > shape.num_items
                          or merge_need(shared) > shape.merge_slots):
            shared.remove(min(shared, key=lambda n: saving[n] / n_items[n]))
    # the step's fixed extra cost depends on its largest work item (`CostModel.overhead`)
    step_overhead = cost_model.overhead(max([min(qb, len(reqs_below[n])) for n in shared] + [0]))
    use_sharing = bool(shared) and force != "plain" and (
        force == "share" or sum(saving[n] for n in shared) > step_overhead)
    if not use_sharing:
        shared = []
    shared_set = set(shared)
    cost_shared_nodes = sum(cost_sh[n] for n in shared)

    # Pages per work item: `chunk_pages`, or shorter where the step has too few items to fill
    # the GPU (`BlockSizes.min_shared_items`), as long as a pinned shape still holds them.
    item_len = cp
    if block_sizes.min_shared_items and shared:
        def items_of(length):
            return sum(-(-tree.node_pages[n].shape[0] // length) * -(-len(reqs_below[n]) // qb) for n in shared)

        def merge_of(length):
            return max(sum(-(-tree.node_pages[n].shape[0] // length) for n in path if n in shared_set)
                       for path in paths)

        while (item_len // 2 >= block_sizes.pages_per_compute_block
               and items_of(item_len) < block_sizes.min_shared_items
               and (shape is None or (items_of(item_len // 2) <= shape.num_items
                                      and merge_of(item_len // 2) <= shape.merge_slots))):
            item_len //= 2

    # Work items: node-major, then query block, then KV chunk.
    item_pages, item_lens, item_queries = [], [], []
    merge: list[list[int]] = [[] for _ in range(n_req)]
    for n in shared:
        rs = reqs_below[n]
        pages = tree.node_pages[n]
        plens = tree.node_page_lens(n)
        for q0 in range(0, len(rs), qb):
            block = rs[q0:q0 + qb]
            for c0 in range(0, pages.shape[0], item_len):
                w = len(item_pages)
                item_pages.append(pages[c0:c0 + item_len])
                item_lens.append(plens[c0:c0 + item_len])
                item_queries.append(block)
                for slot, r in enumerate(block):
                    merge[r].append(w * qb + slot)
    private_pages, private_lens = [], []
    for path in paths:
        keep = [n for n in path if n not in shared_set]
        private_pages.append(np.concatenate([tree.node_pages[n] for n in keep] or [np.zeros(0, np.int32)]))
        private_lens.append(np.concatenate([tree.node_page_lens(n) for n in keep] or [np.zeros(0, np.int32)]))

    need = StepShape(
        num_requests=n_req,
        num_items=len(item_pages),
        private_pages=max([p.shape[0] for p in private_pages] + [0]),
        merge_slots=max([len(m) for m in merge] + [0]),
    )
    if shape is None:
        shape = StepShape(
            num_requests=bucket(n_req, min_requests),
            num_items=bucket(need.num_items, 0),
            private_pages=bucket(need.private_pages, 1),
            merge_slots=bucket(need.merge_slots, 0),
        )
    for f in dataclasses.fields(StepShape):
        if getattr(need, f.name) > getattr(shape, f.name):
            raise ValueError(f"step needs {f.name}={getattr(need, f.name)} but the shape has "
                             f"{getattr(shape, f.name)}")
    if shape.private_pages <= 0:
        raise ValueError(f"shape.private_pages={shape.private_pages} must be positive")
    if use_sharing and shape.num_items == 0:
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
    for w, (p, pl_, qs) in enumerate(zip(item_pages, item_lens, item_queries)):
        step.item_pages[w, :p.shape[0]] = p
        step.item_page_lens[w, :p.shape[0]] = pl_
        step.item_queries[w, :len(qs)] = qs
    for r in range(n_req):
        step.private_pages[r, :private_pages[r].shape[0]] = private_pages[r]
        step.private_page_lens[r, :private_lens[r].shape[0]] = private_lens[r]
        step.merge_rows[r, :len(merge[r])] = merge[r]

    private_tokens = float(sum(int(pl_.sum()) for pl_ in private_lens))
    cost_chosen = (private_tokens + cost_shared_nodes + step_overhead if use_sharing else cost_plain)
    kv_read = int(private_tokens) + int(sum(int(pl_.sum()) for pl_ in item_lens))
    return StepPlan(step=step, use_sharing=use_sharing, shared_nodes=tuple(shared),
                    num_requests=n_req, cost_plain=cost_plain, cost_chosen=float(cost_chosen),
                    kv_tokens_read=kv_read)


def plain_step(page_indices: np.ndarray, lengths: np.ndarray, page_size: int, *,
               block_sizes: BlockSizes) -> SharedPrefixStep:
    """A non-sharing `SharedPrefixStep` from classic page tables (i32[B, P]) and lengths (i32[B]).

    The private page table is the page table itself (padded to a multiple of `split_pages`
    when longer than one split).
    """
    page_indices = np.asarray(page_indices, np.int32)
    lengths = np.asarray(lengths, np.int32)
    b, p = page_indices.shape
    sp = block_sizes.split_pages
    pp = max(p, 1) if max(p, 1) <= sp else sp * math.ceil(p / sp)
    pages = np.zeros((b, pp), np.int32)
    pages[:, :p] = page_indices
    fill = np.clip(lengths[:, None] - page_size * np.arange(pp)[None, :], 0, page_size)
    return SharedPrefixStep(
        item_pages=np.zeros((0, block_sizes.chunk_pages), np.int32),
        item_page_lens=np.zeros((0, block_sizes.chunk_pages), np.int32),
        item_queries=np.zeros((0, block_sizes.query_block), np.int32),
        private_pages=pages,
        private_page_lens=fill.astype(np.int32),
        merge_rows=np.zeros((b, 0), np.int32),
    )
