"""Exact enumeration of chordless (induced) cycles with a length bound.

A chordless cycle is a simple cycle whose vertex set induces exactly the cycle: no edge joins
two non-consecutive vertices. Because the vertex set of a chordless cycle determines it, each
cycle is reported once, as a tuple that starts at its smallest vertex and continues towards the
smaller of that vertex's two cycle neighbours.

Algorithm (our own; same output as `networkx.chordless_cycles` on simple graphs, see the property
tests): every cycle is rooted at its smallest vertex `s`. From `s` we grow induced paths
`s, v1, ..., vk` over vertices `> s` whose interior avoids the neighbourhood of `s`. A candidate
`w` must be adjacent to `vk` and to none of `v1..v(k-1)`; candidates adjacent to `s` close a cycle
(kept only when `w > v1`, so each cycle is found in one direction), the others extend the path.
Neighbourhoods and the blocked set are Python-int bitsets, so one extension step is a handful of
big-int operations instead of networkx's per-node set and dict work. The search is depth-first
with an explicit stack and stops growing a path once no cycle within `length_bound` can close.

Self-loops and parallel edges are not part of this model: callers normalise graphs first
(`jaxsys.gnn.graphs.normalize_edges`), and this module checks that it received a simple graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "CycleCountExceeded",
    "adjacency_bitsets",
    "canonical_cycle",
    "chordless_cycles",
]


class CycleCountExceeded(RuntimeError):
    """Raised when a graph has more chordless cycles than the configured cap allows."""


def adjacency_bitsets(num_nodes: int, edges: Iterable[tuple[int, int]]) -> list[int]:
    """Neighbourhood bitsets of a simple undirected graph on nodes `0..num_nodes-1`.

    Raises:
      ValueError: on a self-loop or an out-of-range node id.
    """
    adj = [0] * num_nodes
    for u, v in edges:
        u, v = int(u), int(v)
        if not (0 <= u < num_nodes and 0 <= v < num_nodes):
            raise ValueError(f"edge ({u}, {v}) references a node outside 0..{num_nodes - 1}")
        if u == v:
            raise ValueError(
                f"self-loop on node {u}: chordless cycles are defined on simple graphs; normalise "
                "the graph first (normalize_edges(..., self_loops='drop'))")
        adj[u] |= 1 << v
        adj[v] |= 1 << u
    return adj


def canonical_cycle(cycle: Sequence[int]) -> tuple[int, ...]:
    """Rotation/reflection-invariant form: start at the minimum, go towards the smaller neighbour."""
    c = [int(x) for x in cycle]
    i = c.index(min(c))
    c = c[i:] + c[:i]
    if len(c) > 2 and c[-1] < c[1]:
        c = [c[0]] + c[1:][::-1]
    return tuple(c)


def _bits(mask: int):
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def chordless_cycles(
    num_nodes: int,
    edges: Iterable[tuple[int, int]] | np.ndarray,
    *,
    length_bound: int | None = None,
    min_length: int = 3,
    max_cycles: int | None = None,
    on_exceed: str = "error",
) -> list[tuple[int, ...]]:
    """All chordless cycles of a simple undirected graph with `min_length <= len <= length_bound`.

    Args:
      num_nodes: number of nodes; nodes are `0..num_nodes-1` (isolated nodes are fine).
      edges: undirected edges `(u, v)`, each once or in both directions (duplicates of the
        same undirected edge are merged; self-loops raise).
      length_bound: longest cycle reported (None: no bound). Must be >= 3 when given.
      min_length: shortest cycle reported (>= 3; shorter cycles do not exist in simple graphs).
      max_cycles: guard against graphs whose cycle count explodes (dense graphs, complements).
        None disables it.
      on_exceed: what to do once more than `max_cycles` cycles are found: "error" raises
        `CycleCountExceeded`, "warn" stops the search, warns, and returns the first
        `max_cycles` cycles (a truncated, not an exact, set).

    Returns:
      Cycles as canonical tuples (see `canonical_cycle`), in discovery order.
    """
    if length_bound is not None and length_bound < 3:
        raise ValueError(f"length_bound must be >= 3 (or None), got {length_bound}")
    if min_length < 3:
        raise ValueError(f"min_length must be >= 3, got {min_length}")
    if on_exceed not in ("error", "warn"):
        raise ValueError(f"on_exceed must be 'error' or 'warn', got {on_exceed!r}")
    if isinstance(edges, np.ndarray):
        edges = edges.reshape(-1, 2).tolist()
    adj = adjacency_bitsets(num_nodes, edges)
    bound = num_nodes if length_bound is None else min(length_bound, num_nodes)
    out: list[tuple[int, ...]] = []

    def exceeded() -> bool:
        if max_cycles is None or len(out) <= max_cycles:
            return False
        if on_exceed == "error":
            raise CycleCountExceeded(
                f"more than {max_cycles} chordless cycles (length <= {bound}) in a graph with "
                f"{num_nodes} nodes; raise max_cycles, lower length_bound, or set "
                "on_exceed='warn' to keep a truncated set")
        warnings.warn(
            f"chordless-cycle search stopped after {max_cycles} cycles in a graph with "
            f"{num_nodes} nodes: relations are built from a truncated cycle set",
            UserWarning, stacklevel=3)
        del out[max_cycles:]
        return True

    for s in range(num_nodes):
        ns = adj[s]
        upto_s = (1 << (s + 1)) - 1
        first = ns & ~upto_s
        if not first or first & (first - 1) == 0:  # fewer than two larger neighbours
            continue
        base = ~upto_s & ~ns  # vertices > s that may be interior to a cycle rooted at s
        for v1 in _bits(first):
            nv1 = adj[v1]
            above_v1 = ~((1 << (v1 + 1)) - 1)
            # Triangles s, v1, w (w > v1).
            if min_length <= 3 <= bound:
                for w in _bits(nv1 & first & above_v1):
                    out.append((s, v1, w))
                if exceeded():
                    return out
            if bound < 4:
                continue
            # Longer cycles end at t in N(s), t > v1, t not adjacent to v1; their interior avoids
            # N[s] and N[v1] (past v2). within[j]: vertices at distance <= j from those ends
            # through allowed interior vertices. A path of p vertices ending at w (p >= 3) can
            # still close within the bound only if w is in within[bound - p].
            ends = first & above_v1 & ~nv1
            if not ends:
                continue
            interior = base & ~nv1 & ~(1 << v1)
            within = [ends]
            reach = frontier = ends
            for _ in range(bound - 4):
                nxt = 0
                for u in _bits(frontier):
                    nxt |= adj[u]
                nxt &= interior & ~reach
                if not nxt:
                    break
                reach |= nxt
                within.append(reach)
                frontier = nxt
            far = len(within) - 1
            blocked1 = upto_s | nv1 | (1 << v1)
            reach_v2 = within[min(bound - 4, far)]
            for v2 in _bits(nv1 & base):
                if not adj[v2] & reach_v2:
                    continue
                # stack entries: (path, last vertex, blocked = vertices <= s, the path, N[v1..v(k-1)])
                stack = [((s, v1, v2), v2, blocked1 | (1 << v2))]
                while stack:
                    path, last, blocked = stack.pop()
                    cand = adj[last] & ~blocked
                    if not cand:
                        continue
                    k1 = len(path) + 1  # cycle length if a candidate closes it
                    close = cand & ns
                    if close and k1 >= min_length:
                        for w in _bits(close & above_v1):
                            out.append(path + (w,))
                        if exceeded():
                            return out
                    room = bound - k1
                    if room < 1:
                        continue
                    ext = cand & within[min(room, far)] & ~ns
                    if not ext:
                        continue
                    nblocked = blocked | adj[last]
                    for w in _bits(ext):
                        stack.append((path + (w,), w, nblocked | (1 << w)))
    return out  # already canonical: rooted at the minimum, v1 < last
