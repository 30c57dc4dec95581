"""The radix prefix cache and the page allocator (pure Python, no JAX).

Unit tests pin each contract (page granularity, splitting, refcounts, pending nodes, eviction order,
duplicates); a Hypothesis state machine then drives the cache the way the scheduler does (match the
shareable prefix, acquire, allocate, insert the prompt's whole pages, acquire the deepest node that
is this request's own, release the match; finish = release + free private pages; evict when short)
and checks after every step that

  * every page 1..N-1 is in exactly one place: the free list, the tree, or a live request's private
    pages (so no leak and no double free; page 0 is never handed out);
  * each node's refcount equals the number of live requests whose held node lies at or below it;
  * `match` returns exactly the longest cached whole-page prefix (a brute-force model of the tree);
  * the pages on a request's tree path are its own page table's prefix (it reads the right KV);
  * `evict` frees only unreferenced leaves, in policy order, and stops once it has freed enough.

Time is faked (a counter), so LRU order is exact and the runs are reproducible.
"""

from __future__ import annotations

import itertools
import math
import types
from unittest import mock

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxsys.serve.scheduler import radix as radix_mod
from jaxsys.serve.scheduler.pages import OutOfPages, PageAllocator
from jaxsys.serve.scheduler.radix import LRUPolicy, RadixCache, RadixNode


# ---------------------------------------------------------------------------------- helpers

class FakeClock:
    """A monotonic clock that ticks once per reading: no two readings are equal."""

    def __init__(self):
        self._t = itertools.count(1)

    def monotonic(self) -> float:
        return float(next(self._t))


@pytest.fixture
def fake_time():
    clock = FakeClock()
    with mock.patch.object(radix_mod, "time", types.SimpleNamespace(monotonic=clock.monotonic)):
        yield clock


def free_list(alloc: PageAllocator) -> list[int]:
    """The allocator's free list (private state, read here so that duplicates show)."""
    return list(alloc._free)


def tree_pages(cache: RadixCache) -> list[int]:
    return [p for n in cache.nodes() for p in n.pages]


def path_tokens(cache: RadixCache, node: RadixNode | None) -> tuple[int, ...]:
    return tuple(t for n in cache.path_to(node) for t in n.tokens)


def path_pages(cache: RadixCache, node: RadixNode | None) -> list[int]:
    return [p for n in cache.path_to(node) for p in n.pages]


class PriorityPolicy:
    """A custom policy: lowest `priority` first (what the Graph-CoT system plugs in)."""

    def key(self, node: RadixNode) -> float:
        return node.priority


def new_cache(page_size: int = 4, num_pages: int = 64, policy=None) -> tuple[RadixCache, PageAllocator, list]:
    alloc = PageAllocator(num_pages)
    freed: list[list[int]] = []

    def free(pages):
        freed.append(list(pages))
        alloc.free(pages)

    return RadixCache(page_size, policy, free_pages=free), alloc, freed


# ---------------------------------------------------------------------------------- allocator

def test_allocator_never_hands_out_scratch_page_and_counts_capacity():
    alloc = PageAllocator(9)
    assert alloc.capacity == 8 and alloc.num_free == 8
    got = alloc.alloc(8)
    assert sorted(got) == list(range(1, 9))
    assert alloc.num_free == 0
    with pytest.raises(OutOfPages):
        alloc.alloc(1)
    alloc.free(got[:3])
    assert alloc.num_free == 3
    assert sorted(alloc.alloc(3)) == sorted(got[:3])


def test_allocator_failed_alloc_takes_nothing():
    alloc = PageAllocator(5)
    alloc.alloc(2)
    with pytest.raises(OutOfPages):
        alloc.alloc(3)
    assert alloc.num_free == 2


@pytest.mark.parametrize("bad", [0, -1, 9, 100])
def test_allocator_rejects_freeing_scratch_or_foreign_pages(bad):
    alloc = PageAllocator(9)
    alloc.alloc(8)
    with pytest.raises(ValueError):
        alloc.free([bad])
    assert alloc.num_free == 0


def test_allocator_needs_two_pages():
    with pytest.raises(ValueError, match="at least 2"):
        PageAllocator(1)


# ---------------------------------------------------------------------------------- page granularity

def test_only_whole_pages_are_cached_and_matched():
    cache, alloc, _ = new_cache(page_size=4)
    toks = list(range(10))  # 2 whole pages + 2 tokens
    pages = alloc.alloc(3)
    path, dups = cache.insert(toks, pages)
    assert dups == []
    assert [n.pages for n in path] == [pages[:2]]  # the partial third page stays private
    assert cache.num_cached_pages == 2
    assert path[-1].tokens == tuple(range(8))

    assert cache.match(toks)[1] == pages[:2]
    assert cache.match(toks[:7])[1] == pages[:1]  # 7 tokens = 1 whole page
    assert cache.match(toks[:3])[1] == []  # less than a page: nothing shared
    assert cache.match(toks[:8] + [99, 98, 97, 96])[1] == pages[:2]
    # a page that differs in its last token does not match
    assert cache.match([0, 1, 2, 99, 4, 5, 6, 7])[1] == []


def test_match_counts_hit_rate():
    cache, alloc, _ = new_cache(page_size=4)
    cache.insert(list(range(8)), alloc.alloc(2))
    cache.match(list(range(10)))  # 8 of 10 tokens hit
    cache.match([50] * 6)  # 0 of 6
    cache.match(list(range(8)), count=False)  # not counted
    assert cache.lookup_tokens == 16 and cache.hit_tokens == 8
    assert cache.hit_rate == pytest.approx(0.5)


def test_insert_of_cached_prefix_returns_callers_duplicates():
    cache, alloc, _ = new_cache(page_size=2)
    first = alloc.alloc(3)
    cache.insert([1, 2, 3, 4, 5, 6], first)
    second = alloc.alloc(4)
    path, dups = cache.insert([1, 2, 3, 4, 7, 8, 9, 10], second)
    assert dups == second[:2]  # the cached pages win; the caller keeps its copies
    assert path_pages(cache, path[-1]) == first[:2] + second[2:]
    assert cache.num_cached_pages == 3 + 2
    assert sorted(tree_pages(cache)) == sorted(first + second[2:])


# ---------------------------------------------------------------------------------- splits and refcounts

def test_split_keeps_refcounts_and_release_returns_every_node_to_zero():
    cache, alloc, _ = new_cache(page_size=2)
    pages = alloc.alloc(4)
    path, _ = cache.insert([1, 1, 2, 2, 3, 3, 4, 4], pages)
    deepest = path[-1]
    cache.acquire(deepest)
    cache.acquire(deepest)  # two requests hold it
    assert len(cache.nodes()) == 1 and deepest.ref == 2

    # a match that diverges inside the node splits it twice (after page 1, then after page 2)
    p1, got1 = cache.match([1, 1, 9, 9])
    p2, got2 = cache.match([1, 1, 2, 2, 9, 9])
    assert got1 == pages[:1] and got2 == pages[:2]
    assert len(cache.nodes()) == 3
    chain = cache.path_to(deepest)
    assert [n.pages for n in chain] == [pages[:1], pages[1:2], pages[2:]]
    assert [n.ref for n in chain] == [2, 2, 2]
    assert [n.depth_tokens for n in chain] == [0, 2, 4]
    assert deepest.tokens == (3, 3, 4, 4)

    # a third request holds the upper part only
    cache.acquire(chain[1])
    assert [n.ref for n in chain] == [3, 3, 2]
    cache.release(deepest)
    cache.release(deepest)
    cache.release(chain[1])
    assert all(n.ref == 0 for n in cache.nodes())
    with pytest.raises(RuntimeError, match="released more often"):
        cache.release(deepest)


def test_split_then_insert_branch():
    cache, alloc, _ = new_cache(page_size=2)
    a = alloc.alloc(3)
    pa, _ = cache.insert([1, 1, 2, 2, 3, 3], a)
    cache.acquire(pa[-1])
    b = alloc.alloc(3)
    pb, dups = cache.insert([1, 1, 5, 5, 6, 6], b)
    assert dups == b[:1]
    assert path_pages(cache, pb[-1]) == [a[0]] + b[1:]
    assert path_pages(cache, pa[-1]) == a
    upper = cache.path_to(pa[-1])[0]
    assert upper.ref == 1 and set(upper.children) == {(2, 2), (5, 5)}
    cache.release(pa[-1])
    assert all(n.ref == 0 for n in cache.nodes())


# ---------------------------------------------------------------------------------- pending nodes

def test_pending_nodes_stay_pending_across_splits():
    cache, alloc, _ = new_cache(page_size=2)
    pages = alloc.alloc(3)
    path, _ = cache.insert([1, 1, 2, 2, 3, 3], pages, ready=False)
    assert [n.ready for n in path] == [False]
    mpath, got = cache.match([1, 1, 2, 2, 7, 7])  # splits the pending node
    assert got == pages[:2]
    assert [n.ready for n in mpath] == [False]
    assert all(not n.ready for n in cache.nodes())
    # a ready insert below a ready prefix is ready; a new pending branch leaves the rest alone
    other = alloc.alloc(2)
    opath, _ = cache.insert([4, 4, 5, 5], other)
    assert [n.ready for n in opath] == [True]
    assert sum(not n.ready for n in cache.nodes()) == 2


# ---------------------------------------------------------------------------------- eviction

def test_eviction_frees_only_unreferenced_leaves_lru_first(fake_time):
    cache, alloc, freed = new_cache(page_size=2, num_pages=32)
    a, b, c = alloc.alloc(2), alloc.alloc(2), alloc.alloc(2)
    cache.insert([1, 1, 1, 1], a)
    cache.insert([2, 2, 2, 2], b)
    nc = cache.insert([3, 3, 3, 3], c)[0][-1]
    cache.match([1, 1, 1, 1])  # a is now the most recently used
    cache.acquire(nc)  # c is in use
    assert cache.evictable_pages() == 4
    assert cache.evict(1) == 2  # whole nodes: the least recently used one
    assert freed == [b]
    assert cache.evict(10) == 2  # only a remains evictable
    assert freed == [b, a]
    assert cache.evict(10) == 0
    assert [n is nc for n in cache.nodes()] == [True]
    cache.release(nc)
    assert cache.evict(1) == 2 and freed[-1] == c
    assert cache.num_cached_pages == 0 and alloc.num_free == alloc.capacity


def test_eviction_climbs_to_parents_that_become_leaves(fake_time):
    cache, alloc, freed = new_cache(page_size=2, num_pages=32)
    base = alloc.alloc(3)
    cache.insert([1, 1, 2, 2, 3, 3], base)
    br = alloc.alloc(3)
    held = cache.insert([1, 1, 2, 2, 4, 4], br)[0][-1]  # splits base after 2 pages
    cache.acquire(held)
    # evicting everything frees base's tail but neither the shared upper part nor the held branch
    assert cache.evict(100) == 1
    assert freed == [base[2:]]
    cache.release(held)
    assert cache.evict(100) == 3
    assert freed[1:] == [br[2:], base[:2]]  # the leaf, then its parent once it became a leaf
    assert cache.nodes() == [] and cache.num_cached_pages == 0


def test_custom_policy_sets_eviction_order():
    cache, alloc, freed = new_cache(page_size=2, num_pages=32, policy=PriorityPolicy())
    nodes = []
    for i, prio in enumerate([5.0, 1.0, 3.0, 0.5]):
        n = cache.insert([10 + i] * 2, alloc.alloc(1))[0][-1]
        n.priority = prio
        nodes.append(n)
    cache.acquire(nodes[3])  # lowest priority but referenced
    assert cache.evict(2) == 2
    assert freed == [nodes[1].pages, nodes[2].pages]
    assert cache.evict(5) == 1 and freed[-1] == nodes[0].pages
    assert cache.nodes() == [nodes[3]]


def test_lru_policy_key_is_last_access():
    node = RadixNode(1, None, (), [])
    node.last_access = 42.0
    assert LRUPolicy().key(node) == 42.0


# ---------------------------------------------------------------------------------- state machine

class RadixMachine(RuleBasedStateMachine):
    """Drives the cache the way the scheduler's admission and completion do."""

    PAGE_SIZE = 2
    NUM_PAGES = 24
    policy_factory = LRUPolicy

    def __init__(self):
        super().__init__()
        self._patch = mock.patch.object(radix_mod, "time", types.SimpleNamespace(monotonic=FakeClock().monotonic))
        self._patch.start()
        self.policy = self.policy_factory()
        self.alloc = PageAllocator(self.NUM_PAGES)
        self.freed_log: list[list[int]] = []
        self.cache = RadixCache(self.PAGE_SIZE, self.policy, free_pages=self._free)
        self.live: dict[int, dict] = {}  # request id -> {tokens, pages, own, node, pending}
        self._ids = itertools.count()
        self._priorities = itertools.count()

    def teardown(self):
        self._patch.stop()

    def _free(self, pages):
        self.freed_log.append(list(pages))
        self.alloc.free(pages)

    # ---- rules
    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=11), extra=st.integers(0, 3),
          ready=st.booleans())
    def admit(self, tokens, extra, ready):
        ps, cache = self.PAGE_SIZE, self.cache
        shareable = ((len(tokens) - 1) // ps) * ps
        path, cached = cache.match(tokens[:shareable], count=False)
        if any(not n.ready for n in path):
            return  # blocked on a prefix another request is computing
        matched = path[-1] if path else None
        cache.acquire(matched)
        need = math.ceil((len(tokens) + extra) / ps) - len(cached)
        if need > self.alloc.num_free:
            self._checked_evict(need - self.alloc.num_free)
        if need > self.alloc.num_free:
            cache.release(matched)
            return
        own = self.alloc.alloc(need)
        pages = cached + own
        full = len(tokens) // ps
        new_path, dups = cache.insert(tokens[:full * ps], pages[:full], ready=ready)
        assert set(dups) <= set(own), "duplicates must be the caller's own pages"
        deepest, n_ok, in_tree = None, 0, set()
        for n in new_path:
            if pages[n_ok:n_ok + len(n.pages)] != n.pages:
                break
            n_ok += len(n.pages)
            deepest = n
            in_tree.update(n.pages)
        for n in new_path:
            if n.priority == 0.0:
                n.priority = float(next(self._priorities))
        cache.acquire(deepest)
        cache.release(matched)
        rid = next(self._ids)
        self.live[rid] = dict(tokens=tokens, pages=pages, own=[p for p in own if p not in in_tree],
                              node=deepest, pending=deepest if deepest is not None and not deepest.ready else None)

    @precondition(lambda self: any(r["pending"] is not None for r in self.live.values()))
    @rule(data=st.data())
    def complete_prefill(self, data):
        rid = data.draw(st.sampled_from(sorted(r for r, v in self.live.items() if v["pending"] is not None)))
        node = self.live[rid]["pending"]
        while node is not None and not node.ready:
            node.ready = True
            node = node.parent
        self.live[rid]["pending"] = None

    @precondition(lambda self: any(r["pending"] is None for r in self.live.values()))
    @rule(data=st.data())
    def finish(self, data):
        rid = data.draw(st.sampled_from(sorted(r for r, v in self.live.items() if v["pending"] is None)))
        r = self.live.pop(rid)
        self.cache.release(r["node"])
        self.alloc.free(r["own"])

    @rule(tokens=st.lists(st.integers(0, 2), min_size=0, max_size=12))
    def lookup(self, tokens):
        expected = self._model_match(tokens)
        path, pages = self.cache.match(tokens)
        assert pages == expected
        assert path_pages(self.cache, path[-1] if path else None) == pages
        assert path_tokens(self.cache, path[-1] if path else None) == tuple(tokens[:len(pages) * self.PAGE_SIZE])

    @rule(n=st.integers(1, 12))
    def evict(self, n):
        self._checked_evict(n)

    # ---- the eviction check
    def _checked_evict(self, n):
        cache = self.cache
        nodes = cache.nodes()
        parent = {id(x): (id(x.parent) if x.parent is not cache.root else None) for x in nodes}
        children = {id(x): 0 for x in nodes}
        for x in nodes:
            if parent[id(x)] is not None:
                children[parent[id(x)]] += 1
        ref = {id(x): x.ref for x in nodes}
        key = {id(x): self.policy.key(x) for x in nodes}
        by_page = {x.pages[0]: x for x in nodes}
        evictable = cache.evictable_pages()
        assert evictable == sum(len(x.pages) for x in nodes if x.ref == 0)
        start = len(self.freed_log)
        freed = cache.evict(n)
        events = self.freed_log[start:]
        total = 0
        for pages in events:
            assert total < n, "evicted more nodes than needed"
            x = by_page[pages[0]]
            assert pages == x.pages
            cand = [i for i in children if children[i] == 0 and ref[i] == 0]
            assert id(x) in cand, "evicted a referenced or inner node"
            assert key[id(x)] == min(key[i] for i in cand), "eviction out of policy order"
            del children[id(x)]
            if parent[id(x)] is not None:
                children[parent[id(x)]] -= 1
            total += len(pages)
        assert freed == total
        assert freed >= min(n, evictable)
        assert all(x not in cache.nodes() for x in (by_page[p[0]] for p in events))

    # ---- the brute-force model of the tree
    def _model_match(self, tokens) -> list[int]:
        ps = self.PAGE_SIZE
        table: dict[tuple[int, ...], int] = {}
        for x in self.cache.nodes():
            pre = path_tokens(self.cache, x.parent if x.parent is not self.cache.root else None)
            for j, p in enumerate(x.pages):
                table[pre + x.tokens[:(j + 1) * ps]] = p
        out = []
        for k in range(1, len(tokens) // ps + 1):
            p = table.get(tuple(tokens[:k * ps]))
            if p is None:
                break
            out.append(p)
        return out

    # ---- invariants
    @invariant()
    def every_page_in_exactly_one_place(self):
        owned = [p for r in self.live.values() for p in r["own"]]
        everything = free_list(self.alloc) + tree_pages(self.cache) + owned
        assert sorted(everything) == list(range(1, self.NUM_PAGES)), "page leaked or double-freed"
        assert self.cache.num_cached_pages == len(tree_pages(self.cache))
        assert self.alloc.num_free + self.cache.num_cached_pages + len(owned) == self.alloc.capacity

    @invariant()
    def nodes_are_well_formed(self):
        ps = self.PAGE_SIZE
        for x in self.cache.nodes():
            assert len(x.pages) >= 1 and len(x.tokens) == len(x.pages) * ps
            assert x.parent.children[x.tokens[:ps]] is x
            assert x.depth_tokens == x.parent.depth_tokens + len(x.parent.tokens)
            if x.ref:
                assert x.parent is self.cache.root or x.parent.ref >= x.ref

    @invariant()
    def refcounts_count_live_holders(self):
        for x in self.cache.nodes():
            holders = sum(1 for r in self.live.values() if x in self.cache.path_to(r["node"]))
            assert x.ref == holders, f"{x} has ref {x.ref}, held by {holders}"

    @invariant()
    def requests_read_their_own_pages(self):
        for r in self.live.values():
            tree = path_pages(self.cache, r["node"])
            assert r["pages"][:len(tree)] == tree
            assert path_tokens(self.cache, r["node"]) == tuple(r["tokens"][:len(tree) * self.PAGE_SIZE])
            assert not set(r["own"]) & set(tree_pages(self.cache))


class PriorityRadixMachine(RadixMachine):
    policy_factory = PriorityPolicy


_SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestRadixLRU = RadixMachine.TestCase
TestRadixLRU.settings = _SETTINGS
TestRadixPriority = PriorityRadixMachine.TestCase
TestRadixPriority.settings = _SETTINGS
