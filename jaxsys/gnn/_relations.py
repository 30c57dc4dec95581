"""Relations that the three models pass messages along, as one typed, weighted edge list.

Every model here is the same message-passing network over a list of directed, typed relations
`(sender, receiver, type, weight)`; what differs is which relations the host builds:

* GIN: type 0 = the graph's edges.
* KP-GNN: type k-1 = node pairs at shortest-path distance k (k = 1..K), plus per-node
  peripheral-subgraph features (number of edges among the nodes at distance k).
* CSGNN: type 0 = the graph's edges; then one type per cyclic distance d = 0..D between two nodes
  on a shared chordless cycle (optionally one type per (cycle length, d)); optionally the same
  relations computed on the complement graph; per-node flags "lies on a chordless cycle of
  length l".

A pair that shares several chordless cycles at the same distance is one relation whose weight is
the number of such cycles (sum aggregation over weighted relations equals sum aggregation over
the repeated pairs, with O(n^2) relations at most). The self relation d = 0 has weight = the
number of chordless cycles through the node.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np

from jaxsys.gnn._cycles import chordless_cycles

__all__ = [
    "Relations",
    "cycle_pair_relations",
    "csgnn_relations",
    "gin_relations",
    "kpgnn_relations",
    "shortest_path_distances",
]


@dataclasses.dataclass(frozen=True)
class Relations:
    """Typed, weighted relations of one graph plus extra per-node features.

    Attributes:
      senders, receivers: int32 [R] node ids.
      types: int32 [R] relation type in `0..num_types-1`.
      weights: float32 [R] multiplicity (number of cycles / 1 for plain edges).
      node_features: float32 [N, F_extra] extra node features (F_extra may be 0).
      num_types: number of relation types the builder can emit (fixed per spec, so every graph
        of a dataset shares it).
      num_cycles: number of chordless cycles used (graph + complement), for reporting.
    """

    senders: np.ndarray
    receivers: np.ndarray
    types: np.ndarray
    weights: np.ndarray
    node_features: np.ndarray
    num_types: int
    num_cycles: int = 0

    @property
    def num_relations(self) -> int:
        return int(self.senders.shape[0])


def _directed(edges_Ex2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if edges_Ex2.size == 0:
        e = np.zeros((0,), np.int64)
        return e, e
    s = np.concatenate([edges_Ex2[:, 0], edges_Ex2[:, 1]])
    r = np.concatenate([edges_Ex2[:, 1], edges_Ex2[:, 0]])
    return s, r


def _merge(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], num_nodes: int,
           num_types: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate (s, r, t, w) parts and merge duplicates (u, v, t) by summing their weights."""
    if not parts:
        z = np.zeros((0,), np.int32)
        return z, z, z, np.zeros((0,), np.float32)
    s = np.concatenate([p[0] for p in parts]).astype(np.int64)
    r = np.concatenate([p[1] for p in parts]).astype(np.int64)
    t = np.concatenate([p[2] for p in parts]).astype(np.int64)
    w = np.concatenate([p[3] for p in parts]).astype(np.float64)
    key = (r * num_nodes + s) * num_types + t  # sorted by receiver, then sender, then type
    uniq, inv = np.unique(key, return_inverse=True)
    wsum = np.zeros(uniq.shape[0], np.float64)
    np.add.at(wsum, inv.reshape(-1), w)
    t_u = uniq % num_types
    rs = uniq // num_types
    s_u = rs % num_nodes
    r_u = rs // num_nodes
    return (s_u.astype(np.int32), r_u.astype(np.int32), t_u.astype(np.int32),
            wsum.astype(np.float32))


def cycle_pair_relations(
    cycles: list[tuple[int, ...]],
    *,
    max_distance: int,
    type_offset: int,
    length_bound: int,
    typed_by_length: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ordered pairs (u, v) on a shared chordless cycle at cyclic distance d <= max_distance.

    Type = `type_offset + d`, or `type_offset + index(length, d)` when `typed_by_length`
    (see `cycle_type_table`). Returns unmerged (senders, receivers, types, weights).
    """
    table = cycle_type_table(length_bound, max_distance, typed_by_length)
    by_len: dict[int, list[tuple[int, ...]]] = {}
    for c in cycles:
        by_len.setdefault(len(c), []).append(c)
    ss, rr, tt = [], [], []
    for length, group in by_len.items():
        c_MxL = np.asarray(group, np.int64)
        for off in range(length):
            d = min(off, length - off)
            if d > max_distance:
                continue
            typ = type_offset + table[(length, d)]
            ss.append(c_MxL.reshape(-1))
            rr.append(np.roll(c_MxL, -off, axis=1).reshape(-1))
            tt.append(np.full(c_MxL.size, typ, np.int64))
    if not ss:
        z = np.zeros((0,), np.int64)
        return z, z, z, np.zeros((0,), np.float64)
    s = np.concatenate(ss)
    return s, np.concatenate(rr), np.concatenate(tt), np.ones(s.shape[0], np.float64)


def cycle_type_table(length_bound: int, max_distance: int, typed_by_length: bool
                     ) -> dict[tuple[int, int], int]:
    """(cycle length, cyclic distance) -> relation type index (relative)."""
    table: dict[tuple[int, int], int] = {}
    idx = 0
    for length in range(3, length_bound + 1):
        for d in range(0, min(length // 2, max_distance) + 1):
            if typed_by_length:
                table[(length, d)] = idx
                idx += 1
            else:
                table[(length, d)] = d
    return table


def num_cycle_types(length_bound: int, max_distance: int, typed_by_length: bool) -> int:
    table = cycle_type_table(length_bound, max_distance, typed_by_length)
    return max(table.values()) + 1 if table else 0


def complement_edges(num_nodes: int, edges_Ex2: np.ndarray) -> np.ndarray:
    a = np.zeros((num_nodes, num_nodes), bool)
    if edges_Ex2.size:
        a[edges_Ex2[:, 0], edges_Ex2[:, 1]] = True
        a[edges_Ex2[:, 1], edges_Ex2[:, 0]] = True
    iu, ju = np.triu_indices(num_nodes, k=1)
    keep = ~a[iu, ju]
    return np.stack([iu[keep], ju[keep]], axis=1)


def gin_relations(num_nodes: int, edges_Ex2: np.ndarray) -> Relations:
    s, r = _directed(edges_Ex2)
    return Relations(
        senders=s.astype(np.int32), receivers=r.astype(np.int32),
        types=np.zeros(s.shape, np.int32), weights=np.ones(s.shape, np.float32),
        node_features=np.zeros((num_nodes, 0), np.float32), num_types=1)


def csgnn_relations(
    num_nodes: int,
    edges_Ex2: np.ndarray,
    *,
    length_bound: int,
    max_distance: int | None = None,
    typed_by_length: bool = False,
    complement: bool = False,
    complement_length_bound: int | None = None,
    flag_lengths: tuple[int, ...] = (),
    max_cycles: int | None = 100_000,
    on_exceed: str = "error",
) -> Relations:
    """CSGNN relations of one simple graph (see the module docstring)."""
    dmax = length_bound // 2 if max_distance is None else max_distance
    n_cyc = num_cycle_types(length_bound, dmax, typed_by_length)
    cb = length_bound if complement_length_bound is None else complement_length_bound
    n_cyc2 = num_cycle_types(cb, min(dmax, cb // 2), typed_by_length) if complement else 0
    num_types = 1 + n_cyc + n_cyc2
    s, r = _directed(edges_Ex2)
    parts = [(s, r, np.zeros(s.shape, np.int64), np.ones(s.shape, np.float64))]
    cycles = chordless_cycles(num_nodes, edges_Ex2, length_bound=length_bound,
                              max_cycles=max_cycles, on_exceed=on_exceed)
    parts.append(cycle_pair_relations(cycles, max_distance=dmax, type_offset=1,
                                      length_bound=length_bound, typed_by_length=typed_by_length))
    n_total = len(cycles)
    if complement:
        comp = complement_edges(num_nodes, edges_Ex2)
        cyc2 = chordless_cycles(num_nodes, comp, length_bound=cb, max_cycles=max_cycles,
                                on_exceed=on_exceed)
        parts.append(cycle_pair_relations(cyc2, max_distance=min(dmax, cb // 2),
                                          type_offset=1 + n_cyc, length_bound=cb,
                                          typed_by_length=typed_by_length))
        n_total += len(cyc2)
    flags = np.zeros((num_nodes, len(flag_lengths)), np.float32)
    if flag_lengths:
        col = {length: i for i, length in enumerate(flag_lengths)}
        for c in cycles:
            j = col.get(len(c))
            if j is not None:
                flags[list(c), j] = 1.0
    s, r, t, w = _merge(parts, num_nodes, num_types)
    return Relations(senders=s, receivers=r, types=t, weights=w, node_features=flags,
                     num_types=num_types, num_cycles=n_total)


def shortest_path_distances(num_nodes: int, edges_Ex2: np.ndarray, max_hops: int) -> np.ndarray:
    """[N, N] int32 BFS distances, -1 where farther than `max_hops` or unreachable."""
    nbrs: list[list[int]] = [[] for _ in range(num_nodes)]
    for u, v in edges_Ex2.tolist():
        nbrs[u].append(v)
        nbrs[v].append(u)
    dist = np.full((num_nodes, num_nodes), -1, np.int32)
    for src in range(num_nodes):
        dist[src, src] = 0
        q = deque([src])
        while q:
            u = q.popleft()
            du = dist[src, u]
            if du == max_hops:
                continue
            for v in nbrs[u]:
                if dist[src, v] < 0:
                    dist[src, v] = du + 1
                    q.append(v)
    return dist


def kpgnn_relations(num_nodes: int, edges_Ex2: np.ndarray, *, hops: int,
                    peripheral: bool = True) -> Relations:
    """KP-GNN relations: type k-1 joins nodes at shortest-path distance k (1 <= k <= hops).

    With `peripheral`, node v also gets, for each k, the number of graph edges whose both ends
    are at distance exactly k from v (KP-GNN's peripheral-subgraph edge count).
    """
    dist = shortest_path_distances(num_nodes, edges_Ex2, hops)
    r, s = np.nonzero(dist > 0)
    t = dist[r, s].astype(np.int64) - 1
    feats = np.zeros((num_nodes, hops if peripheral else 0), np.float32)
    if peripheral and edges_Ex2.size:
        du = dist[:, edges_Ex2[:, 0]]  # [N, E] distance from v to each edge's ends
        dv = dist[:, edges_Ex2[:, 1]]
        same = (du == dv) & (du > 0)
        for k in range(1, hops + 1):
            feats[:, k - 1] = np.sum(same & (du == k), axis=1)
    order = np.lexsort((t, s, r))
    return Relations(
        senders=s[order].astype(np.int32), receivers=r[order].astype(np.int32),
        types=t[order].astype(np.int32), weights=np.ones(s.shape, np.float32),
        node_features=feats, num_types=hops)
