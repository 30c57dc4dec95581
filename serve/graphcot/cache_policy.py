"""Priority eviction for the radix prefix cache: what a KV page holds decides how long it stays.

Plugs into `jaxsys.serve.scheduler.radix.EvictionPolicy` (`key(node)`, lower evicted first). LRU
keys a node by its last access alone; under many concurrent agents that evicts the shared system
prompt and an in-flight question's notebook as readily as the private pages of a question that
finished long ago. Here the key is

    key(node) = node.last_access + horizon_s * priority(node)

so a node of priority p is kept as if it had been used p * horizon_s seconds later (GreedyDual-
style aging: nothing is pinned forever). By default `horizon_s` follows the workload: twice the
mean time between two consecutive calls of one question (an exponential average, 10 s until the
first gap is seen), so an in-flight question's pages outlive the pages of questions that finished
since its last call whether a call takes 50 ms on a GPU or 30 s on a CPU. `priority(node)` is the
highest priority of its pages:

    system prompt            4
    agent template           3
    vertex facts             1 + log2(1 + number of questions that used the vertex), at most 3
    question / private state 2.5 while the question is in flight, 0 once it finished
    anything unregistered    0 (plain LRU)

The radix tree stores token ids only, so the client tells the policy what each page holds: before
submitting a prompt it calls `register(tokens, spans, qid)` with the prompt's segments; pages are
identified by a hash chained over the whole prefix up to the page (a node's pages are found by
walking its parents), so a page is recognised wherever the tree splits it. `question_done(qid)`
drops a finished question's private pages to priority 0. Calls come from many client threads while
`key` runs on the scheduler thread, hence the lock.

Scheduler hook that would make this exact and cheaper: per-request priority metadata carried by
the request and copied onto the radix nodes it inserts (`RadixNode.priority` exists for this), so
the policy would not have to rebuild page identities from token hashes.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Sequence

STAGE_PRIORITY = {"system": 4.0, "template": 3.0, "question": 2.5, "private": 2.5}
VERTEX_BASE, VERTEX_CAP = 1.0, 3.0


@dataclasses.dataclass
class Span:
    start: int
    end: int
    kind: str  # system | template | vertex | question | private
    vertex: str | None = None


@dataclasses.dataclass
class _PageInfo:
    kinds: set[str]
    vertices: set[str]
    qids: set[str]


def _chain(prev: int, page: Sequence[int]) -> int:
    return hash((prev, tuple(page)))


class VertexPriorityPolicy:
    def __init__(self, page_size: int, *, horizon_s: float | None = None):
        if page_size <= 0 or (horizon_s is not None and horizon_s < 0):
            raise ValueError("page_size must be positive and horizon_s non-negative")
        self.page_size = page_size
        self.fixed_horizon_s = horizon_s
        self._gap_s = 5.0  # mean time between two calls of a question (exponential average)
        self._last_call: dict[str, float] = {}
        self._pages: dict[int, _PageInfo] = {}
        self._vertex_questions: dict[str, set[str]] = {}
        self._active: set[str] = set()
        self._node_hashes: dict[tuple[int, int, int], list[int]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ client side
    def register(self, tokens: Sequence[int], spans: Sequence[Span], qid: str) -> None:
        """Record what each whole page of `tokens` holds (`spans` cover the prompt in order)."""
        ps = self.page_size
        now = time.monotonic()
        with self._lock:
            self._active.add(qid)
            if qid in self._last_call:
                self._gap_s += 0.1 * (now - self._last_call[qid] - self._gap_s)
            self._last_call[qid] = now
            h = 0
            j = 0
            for p in range(len(tokens) // ps):
                lo, hi = p * ps, (p + 1) * ps
                h = _chain(h, tokens[lo:hi])
                info = self._pages.setdefault(h, _PageInfo(set(), set(), set()))
                while j < len(spans) and spans[j].end <= lo:
                    j += 1
                k = j
                while k < len(spans) and spans[k].start < hi:
                    s = spans[k]
                    info.kinds.add(s.kind)
                    if s.vertex is not None:
                        info.vertices.add(s.vertex)
                        self._vertex_questions.setdefault(s.vertex, set()).add(qid)
                    if s.kind in ("question", "private"):
                        info.qids.add(qid)
                    k += 1

    def question_done(self, qid: str) -> None:
        with self._lock:
            self._active.discard(qid)
            self._last_call.pop(qid, None)
            stale = [h for h, info in self._pages.items()
                     if info.qids and not info.qids & self._active and info.kinds <= {"question", "private"}]
            for h in stale:
                del self._pages[h]

    # ------------------------------------------------------------------ EvictionPolicy
    def _page_priority(self, info: _PageInfo) -> float:
        best = 0.0
        for kind in info.kinds:
            if kind == "vertex":
                continue
            if kind in ("question", "private"):
                if info.qids & self._active:
                    best = max(best, STAGE_PRIORITY[kind])
            else:
                best = max(best, STAGE_PRIORITY.get(kind, 0.0))
        for v in info.vertices:
            reuse = len(self._vertex_questions.get(v, ()))
            best = max(best, min(VERTEX_CAP, VERTEX_BASE + math.log2(1 + reuse)))
        return best

    def _hashes(self, node) -> list[int]:
        key = (node.id, node.depth_tokens, len(node.tokens))
        hashes = self._node_hashes.get(key)
        if hashes is None:
            parent = node.parent
            h = self._hashes(parent)[-1] if parent is not None and parent.parent is not None else 0
            hashes = []
            ps = self.page_size
            for p in range(len(node.tokens) // ps):
                h = _chain(h, node.tokens[p * ps:(p + 1) * ps])
                hashes.append(h)
            if len(self._node_hashes) > 200_000:
                self._node_hashes.clear()
            self._node_hashes[key] = hashes
        return hashes

    def priority(self, node) -> float:
        with self._lock:
            infos = [self._pages.get(h) for h in self._hashes(node)]
            return max((self._page_priority(i) for i in infos if i is not None), default=0.0)

    @property
    def horizon_s(self) -> float:
        return self.fixed_horizon_s if self.fixed_horizon_s is not None else 2.0 * self._gap_s

    def key(self, node) -> float:
        return node.last_access + self.horizon_s * self.priority(node)
