"""One simple undirected graph on the host, and the checks that make it one.

Every structure builder works on simple graphs. Inputs that are not simple are either rejected
with a message that says what to do, or normalised on request; they are never passed on silently:

* self-loops: `self_loops="error"` (default) or `"drop"`;
* parallel edges (the same undirected pair twice, counting `(u, v)` and `(v, u)` in the same
  direction as the same edge twice): `multi_edges="error"` (default) or `"merge"`.
  Listing an undirected edge once as `(u, v)` and once as `(v, u)` is the usual symmetric
  encoding, not a multi-edge; use `symmetric=True` for edge lists in that form.
* isolated nodes and graphs without edges are valid; a graph with zero nodes is rejected (it has
  no embedding to pool).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["Graph", "normalize_edges"]


def normalize_edges(
    num_nodes: int,
    edges: Any,
    *,
    symmetric: bool = False,
    self_loops: str = "error",
    multi_edges: str = "error",
) -> np.ndarray:
    """Validate an edge list and return it as sorted unique `[E, 2]` int32 pairs with `u < v`.

    Args:
      num_nodes: number of nodes; ids must lie in `0..num_nodes-1`.
      edges: `[E, 2]` array-like of node ids.
      symmetric: the list holds each undirected edge in both directions (TU and jraph style);
        every `(u, v)` must then have its `(v, u)`.
      self_loops: "error" or "drop".
      multi_edges: "error" or "merge".
    """
    if self_loops not in ("error", "drop"):
        raise ValueError(f"self_loops must be 'error' or 'drop', got {self_loops!r}")
    if multi_edges not in ("error", "merge"):
        raise ValueError(f"multi_edges must be 'error' or 'merge', got {multi_edges!r}")
    if num_nodes < 0:
        raise ValueError(f"num_nodes must be >= 0, got {num_nodes}")
    e = np.asarray(edges, dtype=np.int64)
    if e.size == 0:
        return np.zeros((0, 2), np.int32)
    if e.ndim != 2 or e.shape[1] != 2:
        raise ValueError(f"edges must have shape [E, 2], got {e.shape}")
    if e.min() < 0 or e.max() >= num_nodes:
        bad = e[(e < 0).any(1) | (e >= num_nodes).any(1)][0].tolist()
        raise ValueError(f"edge {bad} references a node outside 0..{num_nodes - 1}")
    loops = e[:, 0] == e[:, 1]
    if loops.any():
        if self_loops == "error":
            nodes = sorted(set(e[loops, 0].tolist()))[:5]
            raise ValueError(
                f"graph has {int(loops.sum())} self-loop(s) (nodes {nodes}...); chordless cycles "
                "and shortest paths are defined on simple graphs. Pass self_loops='drop' "
                "(config: data.self_loops=drop) to remove them.")
        e = e[~loops]
    if symmetric:
        fwd = {}
        for u, v in e.tolist():
            fwd[(u, v)] = fwd.get((u, v), 0) + 1
        missing = [(u, v) for (u, v) in fwd if (v, u) not in fwd]
        if missing:
            raise ValueError(f"symmetric edge list lacks the reverse of {missing[0]} "
                             f"({len(missing)} edge(s) one-directional)")
        dup = [k for k, c in fwd.items() if c > 1 or fwd[(k[1], k[0])] != c]
        if dup and multi_edges == "error":
            raise ValueError(f"parallel edges between {dup[0]} ({len(dup)} pair(s)); pass "
                             "multi_edges='merge' (config: data.multi_edges=merge) to merge them")
        e = e[e[:, 0] < e[:, 1]]
    lo = np.minimum(e[:, 0], e[:, 1])
    hi = np.maximum(e[:, 0], e[:, 1])
    pairs = np.stack([lo, hi], axis=1)
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    if (counts > 1).any() and multi_edges == "error":
        first = uniq[counts > 1][0].tolist()
        raise ValueError(
            f"parallel edges between {tuple(first)} ({int((counts > 1).sum())} pair(s) listed more "
            "than once); pass multi_edges='merge' (config: data.multi_edges=merge) to merge them, "
            "or symmetric=True if each edge is listed once per direction")
    return uniq.astype(np.int32).reshape(-1, 2)


@dataclasses.dataclass(frozen=True)
class Graph:
    """A simple undirected graph with node features and a target.

    Attributes:
      num_nodes: N >= 1.
      edges: int32 [E, 2], unique pairs with u < v (see `normalize_edges`).
      x: float32 [N, F] node features.
      y: target: an int class, or a float32 [T] regression vector.
    """

    num_nodes: int
    edges: np.ndarray
    x: np.ndarray
    y: Any = 0

    def __post_init__(self):
        if self.num_nodes < 1:
            raise ValueError("a graph needs at least one node (empty graphs have no embedding)")
        if self.x.shape[0] != self.num_nodes:
            raise ValueError(f"x has {self.x.shape[0]} rows for {self.num_nodes} nodes")
        e = self.edges
        if e.ndim != 2 or e.shape[1] != 2 or (e.size and not (e[:, 0] < e[:, 1]).all()):
            raise ValueError("Graph.edges must be [E, 2] with u < v; build it with Graph.create")

    @classmethod
    def create(cls, num_nodes: int, edges: Any, *, x: Any = None, y: Any = 0,
               symmetric: bool = False, self_loops: str = "error",
               multi_edges: str = "error") -> Graph:
        """Validate `edges` (see `normalize_edges`); `x` defaults to a constant feature."""
        e = normalize_edges(num_nodes, edges, symmetric=symmetric, self_loops=self_loops,
                            multi_edges=multi_edges)
        if x is None:
            x = np.ones((num_nodes, 1), np.float32)
        x = np.asarray(x, np.float32)
        if x.ndim == 1:
            x = x.reshape(-1, 1)
        return cls(num_nodes=int(num_nodes), edges=e, x=x, y=y)

    def relabel(self, perm: np.ndarray) -> Graph:
        """The same graph with node i renamed perm[i]."""
        perm = np.asarray(perm)
        inv = np.empty_like(perm)
        inv[perm] = np.arange(perm.shape[0])
        e = perm[self.edges] if self.edges.size else self.edges
        return Graph.create(self.num_nodes, e, x=self.x[inv], y=self.y)

    def to_networkx(self):
        import networkx as nx

        g = nx.Graph()
        g.add_nodes_from(range(self.num_nodes))
        g.add_edges_from(self.edges.tolist())
        return g
