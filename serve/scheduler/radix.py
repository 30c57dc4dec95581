"""Radix prefix cache over token ids at page granularity.

Each node holds a run of whole pages: `tokens` (a multiple of page_size) and the physical `pages`
holding their KV. Children are keyed by their first page of tokens, so lookup walks page by page.
Only full pages are shared; a request's trailing partial page stays private.

Reference counts say how many running requests use a node (and so all its ancestors). Nodes with
no references stay cached until the allocator needs pages; then `evict` frees leaves in the order an
`EvictionPolicy` gives (LRU by default; the Graph-CoT system plugs in a priority policy).

Priority metadata. A request may say what each whole page of its prompt holds (`Request.cache_tags`:
one set of hashable tags per page, e.g. `("vertex", "book-12")`); `insert` merges them into
`RadixNode.page_tags` on every node of the request's path, matched or new, and splits carry them
with their pages. An eviction policy then reads what a node holds straight from the node (GLM's
`VertexPriorityPolicy` ranks system prompt, agent template, graph vertices and a question's private
state this way); the tree never interprets the tags.
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Callable, Hashable, Iterable, Protocol, Sequence

PageTags = frozenset  # the tags of one page (hashables; meaning is the eviction policy's business)


class RadixNode:
    __slots__ = ("id", "parent", "children", "tokens", "pages", "ref", "last_access", "priority", "depth_tokens",
                 "ready", "page_tags")

    def __init__(self, node_id: int, parent: "RadixNode | None", tokens: tuple[int, ...], pages: list[int]):
        self.id = node_id
        self.parent = parent
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.tokens = tokens
        self.pages = pages
        self.ref = 0
        self.last_access = time.monotonic()
        self.priority = 0.0  # free for eviction policies (e.g. Graph-CoT node importance)
        self.ready = True  # False while the request that inserted it is still computing its KV
        self.page_tags: list[PageTags] = [PageTags()] * len(pages)  # per page: what requests said it holds
        self.depth_tokens = (parent.depth_tokens + len(parent.tokens)) if parent is not None else 0

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        return f"RadixNode(id={self.id}, tokens={len(self.tokens)}, pages={self.pages}, ref={self.ref})"


class EvictionPolicy(Protocol):
    def key(self, node: RadixNode) -> float:
        """Lower keys are evicted first."""


class LRUPolicy:
    def key(self, node: RadixNode) -> float:
        return node.last_access


class RadixCache:
    def __init__(self, page_size: int, policy: EvictionPolicy | None = None,
                 free_pages: Callable[[list[int]], None] | None = None):
        self.page_size = page_size
        self.policy = policy or LRUPolicy()
        self._ids = itertools.count(1)
        self.root = RadixNode(0, None, (), [])
        self._free_pages = free_pages or (lambda pages: None)
        self.num_cached_pages = 0
        # statistics for the prefix-cache hit rate
        self.lookup_tokens = 0
        self.hit_tokens = 0

    # ------------------------------------------------------------------ lookup / insert
    def _page_keys(self, tokens: Sequence[int]) -> list[tuple[int, ...]]:
        ps = self.page_size
        n = len(tokens) // ps
        return [tuple(tokens[i * ps:(i + 1) * ps]) for i in range(n)]

    def match(self, tokens: Sequence[int], *, count: bool = True) -> tuple[list[RadixNode], list[int]]:
        """Longest cached prefix (whole pages). Returns the nodes on the path (the last one may be
        matched partially: then it is split so the path ends exactly at the match) and its pages."""
        keys = self._page_keys(tokens)
        node, path, pages, i = self.root, [], [], 0
        now = time.monotonic()
        while i < len(keys):
            child = node.children.get(keys[i])
            if child is None:
                break
            n_pages = len(child.pages)
            j = 0
            while j < n_pages and i + j < len(keys) and \
                    tuple(child.tokens[j * self.page_size:(j + 1) * self.page_size]) == keys[i + j]:
                j += 1
            if j < n_pages:
                child = self._split(child, j)
            child.last_access = now
            path.append(child)
            pages += child.pages
            i += j
            node = child
        if count:
            self.lookup_tokens += len(tokens)
            self.hit_tokens += len(pages) * self.page_size
        return path, pages

    def _split(self, node: RadixNode, n_pages: int) -> RadixNode:
        """Cut `node` after n_pages pages; returns the new upper part (which keeps node's parent)."""
        ps = self.page_size
        upper = RadixNode(next(self._ids), node.parent, node.tokens[:n_pages * ps], node.pages[:n_pages])
        upper.ref = node.ref
        upper.last_access = node.last_access
        upper.priority = node.priority
        upper.ready = node.ready
        upper.page_tags = node.page_tags[:n_pages]
        node.page_tags = node.page_tags[n_pages:]
        parent = node.parent
        parent.children[upper.tokens[:ps]] = upper
        node.tokens, node.pages = node.tokens[n_pages * ps:], node.pages[n_pages:]
        node.parent = upper
        node.depth_tokens = upper.depth_tokens + len(upper.tokens)
        upper.children[node.tokens[:ps]] = node
        return upper

    def insert(self, tokens: Sequence[int], pages: Sequence[int], *, ready: bool = True,
               tags: Sequence[Iterable[Hashable]] | None = None) -> tuple[list[RadixNode], list[int]]:
        """Cache the whole pages of `tokens` (KV in `pages`). Where a prefix is already cached, the
        cached pages win and the caller's duplicates are returned (they stay the caller's).
        `ready=False` inserts a node whose KV is still being computed: requests that match it wait.
        `tags[i]`, when given, are merged into the tags of the path's page i (see the module
        docstring); pages past the end of `tags` get none.
        Returns (the nodes on the path, duplicate pages)."""
        keys = self._page_keys(tokens)
        pages = list(pages)[:len(keys)]
        path, cached = self.match(tokens[:len(keys) * self.page_size], count=False)
        n_cached = len(cached)
        duplicates = [p for p, c in zip(pages[:n_cached], cached) if p != c]
        if n_cached < len(keys):
            parent = path[-1] if path else self.root
            ps = self.page_size
            new_tokens = tuple(tokens[n_cached * ps:len(keys) * ps])
            node = RadixNode(next(self._ids), parent, new_tokens, pages[n_cached:])
            node.ready = ready
            parent.children[new_tokens[:ps]] = node
            self.num_cached_pages += len(node.pages)
            path.append(node)
        if tags:
            self._merge_tags(path, tags)
        return path, duplicates

    @staticmethod
    def _merge_tags(path: Sequence[RadixNode], tags: Sequence[Iterable[Hashable]]) -> None:
        i = 0
        for node in path:
            if i >= len(tags):
                break
            mine = node.page_tags
            for j in range(min(len(node.pages), len(tags) - i)):
                extra = PageTags(tags[i + j])
                if not extra <= mine[j]:
                    mine[j] = mine[j] | extra
            i += len(node.pages)

    # ------------------------------------------------------------------ references
    def acquire(self, node: RadixNode | None) -> None:
        """A request starts using `node` and everything above it. Requests hold only their deepest
        node: splits insert nodes above it, and walking the parents always finds them."""
        now = time.monotonic()
        while node is not None and node is not self.root:
            node.ref += 1
            node.last_access = now
            node = node.parent

    def release(self, node: RadixNode | None) -> None:
        now = time.monotonic()
        while node is not None and node is not self.root:
            if node.ref <= 0:
                raise RuntimeError(f"radix node {node.id} released more often than acquired")
            node.ref -= 1
            node.last_access = now
            node = node.parent

    def path_to(self, node: RadixNode | None) -> list[RadixNode]:
        out = []
        while node is not None and node is not self.root:
            out.append(node)
            node = node.parent
        return out[::-1]

    # ------------------------------------------------------------------ eviction
    def evictable_pages(self) -> int:
        total, stack = 0, [self.root]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if n is not self.root and n.ref == 0:
                total += len(n.pages)
        return total

    def evict(self, num_pages: int) -> int:
        """Free at least `num_pages` pages from unreferenced leaves (policy order). Returns freed."""
        heap, counter = [], itertools.count()
        stack = [self.root]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if n is not self.root and n.is_leaf and n.ref == 0:
                heapq.heappush(heap, (self.policy.key(n), next(counter), n))
        freed = 0
        while heap and freed < num_pages:
            _, _, n = heapq.heappop(heap)
            parent = n.parent
            del parent.children[n.tokens[:self.page_size]]
            self._free_pages(n.pages)
            freed += len(n.pages)
            self.num_cached_pages -= len(n.pages)
            if parent is not self.root and parent.is_leaf and parent.ref == 0:
                heapq.heappush(heap, (self.policy.key(parent), next(counter), parent))
        return freed

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    def nodes(self) -> list[RadixNode]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out
