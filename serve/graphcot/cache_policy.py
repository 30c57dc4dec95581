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

The client tells the tree what each page holds: before submitting a prompt it calls
`register(tokens, spans, qid)` with the prompt's segments and gets back one tag set per whole page
(`("system",)`, `("template",)`, `("vertex", id)`, `("question", qid)`, `("private", qid)`), which
travel with the request (`Request.cache_tags`) and land on the radix nodes of its path
(`RadixNode.page_tags`, merged when another request shares the page, split with the node). `key`
reads the tags straight from the node, so a page is known wherever the tree splits or shares it.
`question_done(qid)` drops a finished question's private pages to priority 0. The reuse counts and
the set of questions in flight change on client threads while `key` runs on the scheduler thread,
hence the lock.
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


class VertexPriorityPolicy:
    """GLM's priority eviction policy (see the module docstring) for `RadixCache(policy=...)`."""

    def __init__(self, page_size: int, *, horizon_s: float | None = None):
        if page_size <= 0 or (horizon_s is not None and horizon_s < 0):
            raise ValueError("page_size must be positive and horizon_s non-negative")
        self.page_size = page_size
        self.fixed_horizon_s = horizon_s
        self._gap_s = 5.0  # mean time between two calls of a question (exponential average)
        self._last_call: dict[str, float] = {}
        self._vertex_questions: dict[str, set[str]] = {}
        self._active: set[str] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ client side
    def register(self, tokens: Sequence[int], spans: Sequence[Span], qid: str) -> list[frozenset]:
        """Note a call of question `qid` and return the tags of each whole page of `tokens` (what
        the `spans`, which cover the prompt in order, put on it), for `Request.cache_tags`."""
        ps = self.page_size
        now = time.monotonic()
        tags: list[frozenset] = []
        with self._lock:
            self._active.add(qid)
            if qid in self._last_call:
                self._gap_s += 0.1 * (now - self._last_call[qid] - self._gap_s)
            self._last_call[qid] = now
            j = 0
            for p in range(len(tokens) // ps):
                lo, hi = p * ps, (p + 1) * ps
                while j < len(spans) and spans[j].end <= lo:
                    j += 1
                page = set()
                k = j
                while k < len(spans) and spans[k].start < hi:
                    s = spans[k]
                    if s.kind == "vertex" and s.vertex is not None:
                        page.add(("vertex", s.vertex))
                        self._vertex_questions.setdefault(s.vertex, set()).add(qid)
                    elif s.kind in ("question", "private"):
                        page.add((s.kind, qid))
                    elif s.kind in STAGE_PRIORITY:
                        page.add((s.kind,))
                    k += 1
                tags.append(frozenset(page))
        return tags

    def question_done(self, qid: str) -> None:
        with self._lock:
            self._active.discard(qid)
            self._last_call.pop(qid, None)

    # ------------------------------------------------------------------ EvictionPolicy
    def _tag_priority(self, tag: tuple) -> float:
        kind = tag[0]
        if kind == "vertex":
            reuse = len(self._vertex_questions.get(tag[1], ()))
            return min(VERTEX_CAP, VERTEX_BASE + math.log2(1 + reuse))
        if kind in ("question", "private"):
            return STAGE_PRIORITY[kind] if tag[1] in self._active else 0.0
        return STAGE_PRIORITY.get(kind, 0.0)

    def priority(self, node) -> float:
        """The highest priority of the node's pages (0 for pages nobody tagged)."""
        with self._lock:
            return max((self._tag_priority(t) for page in node.page_tags for t in page), default=0.0)

    @property
    def horizon_s(self) -> float:
        return self.fixed_horizon_s if self.fixed_horizon_s is not None else 2.0 * self._gap_s

    def key(self, node) -> float:
        return node.last_access + self.horizon_s * self.priority(node)
