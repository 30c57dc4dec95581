"""Replaceable eviction policies of the device-side expert cache.

A policy sees the accesses of one layer's cache and names the victim among the evictable experts.
LRU is Mixtral-offloading's choice (Eliseev & Mazur 2023); LFU keeps the experts a skewed router
uses most (MoE-Infinity's activation-frequency argument). Write another by implementing the
`EvictionPolicy` protocol and pass it (or a factory) to the runner.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol


class EvictionPolicy(Protocol):
    def access(self, expert: int, step: int) -> None:
        """`expert` was used (or brought in) at `step`."""

    def remove(self, expert: int) -> None:
        """`expert` left the cache."""

    def victim(self, candidates: Iterable[int]) -> int:
        """Which of the cached `candidates` to evict."""


class LRUPolicy:
    """Evict the expert whose last use is oldest."""

    def __init__(self):
        self.last: dict[int, int] = {}

    def access(self, expert: int, step: int) -> None:
        self.last[expert] = step

    def remove(self, expert: int) -> None:
        self.last.pop(expert, None)

    def victim(self, candidates: Iterable[int]) -> int:
        return min(candidates, key=lambda e: (self.last.get(e, -1), e))


class LFUPolicy:
    """Evict the expert used least often over the whole run (counts survive eviction, so an expert
    that comes back keeps its history); ties go to the least recently used."""

    def __init__(self):
        self.count: dict[int, int] = {}
        self.last: dict[int, int] = {}

    def access(self, expert: int, step: int) -> None:
        self.count[expert] = self.count.get(expert, 0) + 1
        self.last[expert] = step

    def remove(self, expert: int) -> None:
        pass

    def victim(self, candidates: Iterable[int]) -> int:
        return min(candidates, key=lambda e: (self.count.get(e, 0), self.last.get(e, -1), e))


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {"lru": LRUPolicy, "lfu": LFUPolicy}


def make_policy(policy: str | Callable[[], EvictionPolicy]) -> Callable[[], EvictionPolicy]:
    """A policy factory from a name ('lru', 'lfu') or a factory."""
    if callable(policy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"unknown expert-cache policy {policy!r}; known: {', '.join(POLICIES)} "
                         "(or pass a factory of an EvictionPolicy)")
    return POLICIES[policy]
