"""Relations that the three models pass messages along, as one typed, weighted edge list.

Every model here is the same message-passing network over directed, typed relations
`(sender, receiver, type, weight)`; what differs is which relations the host builds:

* GIN: type 0 = the graph's edges.
* KP-GNN: type k-1 = node pairs at shortest-path distance k (k = 1..K), plus per-node
  peripheral-subgraph features (for each k, the number of edges whose two ends are both at
  distance k from the node).
* CSGNN: type 0 = the graph's edges; then one type per cyclic distance d = 0..D between two nodes
  on a shared chordless cycle (optionally one type per (cycle length, d)); optionally the same
  relations on the complement graph; optionally per-node flags "lies on a chordless cycle of
  length l".

A pair that shares several chordless cycles at the same distance is one relation whose weight is
the number of such cycles: sum aggregation over weighted relations equals sum aggregation over
the repeated pairs, with at most N^2 relations per type. The self relation d = 0 has weight = the
number of chordless cycles through the node. Relations are built for blocks of graphs at once
(node ids offset into one index space) and split per graph afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from jaxsys.gnn._cycles import chordless_cycles_batch

if TYPE_CHECKING:
    from jaxsys.gnn._config import StructureConfig
    from jaxsys.gnn._graph import Graph

__all__ = [
    "Relations",
    "build_relations",
    "cycle_type_table",
    "num_relation_types",
    "num_structure_features",
    "shortest_path_distances",
]


@dataclasses.dataclass(frozen=True)
class Relations:
    """Typed, weighted relations of one graph plus extra per-node features.

    Attributes:
      senders, receivers: int32 [R] node ids, sorted by (receiver, type, sender).
      types: int32 [R] relation type in `0..num_types-1`.
      weights: float32 [R] multiplicity (number of shared cycles; 1 for edges and hops).
      node_features: float32 [N, F_extra] structural node features (F_extra may be 0).
      num_types: number of relation types of the spec (the same for every graph).
      num_cycles: chordless cycles used (graph + complement), for reporting.
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


def cycle_type_table(length_bound: int, max_distance: int, typed_by_length: bool
                     ) -> dict[tuple[int, int], int]:
    """(cycle length, cyclic distance) -> relation type index (relative to the cycle block)."""
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


def _n_types(table: dict) -> int:
    return max(table.values()) + 1 if table else 0


def _tables(cfg: StructureConfig) -> tuple[dict, dict]:
    dmax = cfg.length_bound // 2 if cfg.max_distance is None else cfg.max_distance
    main = cycle_type_table(cfg.length_bound, dmax, cfg.typed_by_length)
    comp: dict = {}
    if cfg.complement:
        cb = cfg.complement_length_bound
        comp = cycle_type_table(cb, min(dmax, cb // 2), cfg.typed_by_length)
    return main, comp


def num_relation_types(cfg: StructureConfig) -> int:
    """Number of relation types the spec emits."""
    if cfg.kind == "gin":
        return 1
    if cfg.kind == "kpgnn":
        return cfg.hops
    main, comp = _tables(cfg)
    return 1 + _n_types(main) + _n_types(comp)


def num_structure_features(cfg: StructureConfig) -> int:
    """Number of extra per-node features the spec adds."""
    if cfg.kind == "kpgnn":
        return cfg.hops if cfg.peripheral else 0
    if cfg.kind == "csgnn":
        return len(cfg.flag_lengths)
    return 0


class _Accumulator:
    """Merges (graph, sender, receiver, type) relations of a block by summing weights.

    Keys are collected, then merged once: with one dense bincount when the key space
    (graphs x n_max^2 x types) is small relative to the number of entries (dense CSL / BREC
    blocks), else with one sort (sparse molecule blocks with a few large graphs).
    """

    def __init__(self, sizes: np.ndarray, num_types: int):
        self.num_types = num_types
        self.n_max = int(sizes.max()) if sizes.size else 0
        self.dense_size = sizes.shape[0] * self.n_max * self.n_max * num_types
        self.parts: list[tuple[np.ndarray, np.ndarray | None]] = []

    def add(self, g, s, r, t, w=None) -> None:
        """Relations s -> r of type t in graph g (local node ids), weight w (default 1)."""
        if not np.size(s):
            return
        key = (((g * self.n_max + r) * self.num_types + t) * self.n_max + s).reshape(-1)
        w_flat = None if w is None else np.broadcast_to(w, np.shape(s)).reshape(-1).astype(
            np.float64)
        self.parts.append((key, w_flat))

    def result(self) -> tuple[np.ndarray, ...]:
        """Unique relations sorted by (graph, receiver, type, sender): g, s, r, t, weight."""
        if self.parts:
            keys = np.concatenate([p[0] for p in self.parts])
            ws = (None if all(p[1] is None for p in self.parts) else np.concatenate(
                [np.ones(p[0].shape[0]) if p[1] is None else p[1] for p in self.parts]))
            if self.dense_size <= min(1 << 26, max(4 * keys.shape[0], 1 << 16)):
                acc = np.bincount(keys, weights=ws, minlength=self.dense_size)
                key = np.flatnonzero(acc)
                w = acc[key]
            else:
                key, inv = np.unique(keys, return_inverse=True)
                w = np.bincount(inv.reshape(-1), weights=ws, minlength=key.shape[0])
        else:
            key, w = np.zeros((0,), np.int64), np.zeros((0,), np.float64)
        s = key % self.n_max
        rest = key // self.n_max
        t, rest = rest % self.num_types, rest // self.num_types
        r, g = rest % self.n_max, rest // self.n_max
        return g, s, r, t, w


def _add_cycle_pairs(acc: _Accumulator, g_of: np.ndarray, cycles: list[dict[int, np.ndarray]],
                     table: dict, type_offset: int) -> None:
    """Ordered pairs on each chordless cycle at each cyclic distance in `table`."""
    lengths = sorted({length for c in cycles for length in c})
    for length in lengths:
        blocks = [(gi, c[length]) for gi, c in zip(g_of, cycles) if length in c]
        cyc_MxL = np.concatenate([b[1] for b in blocks]).astype(np.int64)
        g_M = np.concatenate([np.full(b[1].shape[0], b[0], np.int64) for b in blocks])
        ii, jj = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
        dd = np.minimum(np.abs(ii - jj), length - np.abs(ii - jj))
        typ = np.asarray([[table.get((length, int(d)), -1) for d in row] for row in dd])
        keep = typ >= 0
        if not keep.any():
            continue
        i_P, j_P, t_P = ii[keep], jj[keep], typ[keep] + type_offset
        acc.add(g_M.reshape(-1, 1), cyc_MxL[:, i_P], cyc_MxL[:, j_P], t_P.reshape(1, -1))


def complement_edges(num_nodes: int, edges_Ex2: np.ndarray) -> np.ndarray:
    """Edges (u < v) of the complement graph."""
    a = np.zeros((num_nodes, num_nodes), bool)
    if edges_Ex2.size:
        a[edges_Ex2[:, 0], edges_Ex2[:, 1]] = True
        a[edges_Ex2[:, 1], edges_Ex2[:, 0]] = True
    iu, ju = np.triu_indices(num_nodes, k=1)
    keep = ~a[iu, ju]
    return np.stack([iu[keep], ju[keep]], axis=1)


def shortest_path_distances(num_nodes: int, edges_Ex2: np.ndarray, max_hops: int) -> np.ndarray:
    """[N, N] int32 hop distances, -1 where farther than `max_hops` or unreachable."""
    a = np.zeros((num_nodes, num_nodes), np.float32)
    if edges_Ex2.size:
        a[edges_Ex2[:, 0], edges_Ex2[:, 1]] = 1.0
        a[edges_Ex2[:, 1], edges_Ex2[:, 0]] = 1.0
    dist = np.full((num_nodes, num_nodes), -1, np.int32)
    np.fill_diagonal(dist, 0)
    frontier = np.eye(num_nodes, dtype=np.float32)
    for k in range(1, max_hops + 1):
        nxt = (frontier @ a > 0) & (dist < 0)
        if not nxt.any():
            break
        dist[nxt] = k
        frontier = nxt.astype(np.float32)
    return dist


def build_relations(graphs: Sequence[Graph], cfg: StructureConfig) -> list[Relations]:
    """Relations of a block of graphs under one structure spec (see the module docstring)."""
    sizes = np.asarray([g.num_nodes for g in graphs], np.int64)
    num_types = num_relation_types(cfg)
    acc = _Accumulator(sizes, num_types)
    feats: list[np.ndarray] = []
    cycle_counts = np.zeros(len(graphs), np.int64)
    g_ids = np.arange(len(graphs))

    def add_edges(type_id: int) -> None:
        es = [g.edges.astype(np.int64) for g in graphs]
        counts = np.asarray([e.shape[0] for e in es])
        if counts.sum() == 0:
            return
        e = np.concatenate(es)
        gi = np.repeat(g_ids, counts)
        acc.add(gi, e[:, 0], e[:, 1], type_id)
        acc.add(gi, e[:, 1], e[:, 0], type_id)

    if cfg.kind == "gin":
        add_edges(0)
        feats = [np.zeros((g.num_nodes, 0), np.float32) for g in graphs]
    elif cfg.kind == "kpgnn":
        hop_parts = []
        for gi, g in enumerate(graphs):
            dist = shortest_path_distances(g.num_nodes, g.edges, cfg.hops)
            r, s = np.nonzero(dist > 0)
            hop_parts.append((np.full(r.shape[0], gi), s, r, dist[r, s].astype(np.int64) - 1))
            f = np.zeros((g.num_nodes, cfg.hops if cfg.peripheral else 0), np.float32)
            if cfg.peripheral and g.edges.size:
                du = dist[:, g.edges[:, 0]]  # [N, E]: distance from each node to each edge's ends
                dv = dist[:, g.edges[:, 1]]
                for k in range(1, cfg.hops + 1):
                    f[:, k - 1] = np.sum((du == k) & (dv == k), axis=1)
            feats.append(f)
        acc.add(*(np.concatenate([p[i] for p in hop_parts]) for i in range(4)))
    elif cfg.kind == "csgnn":
        main, comp = _tables(cfg)
        add_edges(0)
        cyc = chordless_cycles_batch([(g.num_nodes, g.edges) for g in graphs],
                                     length_bound=cfg.length_bound, max_cycles=cfg.max_cycles,
                                     on_exceed=cfg.on_exceed)
        _add_cycle_pairs(acc, g_ids, cyc, main, 1)
        cycle_counts += [sum(a.shape[0] for a in c.values()) for c in cyc]
        if cfg.complement:
            cyc2 = chordless_cycles_batch(
                [(g.num_nodes, complement_edges(g.num_nodes, g.edges)) for g in graphs],
                length_bound=cfg.complement_length_bound, max_cycles=cfg.max_cycles,
                on_exceed=cfg.on_exceed)
            _add_cycle_pairs(acc, g_ids, cyc2, comp, 1 + _n_types(main))
            cycle_counts += [sum(a.shape[0] for a in c.values()) for c in cyc2]
        col = {length: j for j, length in enumerate(cfg.flag_lengths)}
        for g, c in zip(graphs, cyc):
            f = np.zeros((g.num_nodes, len(col)), np.float32)
            for length, c_MxL in c.items():
                j = col.get(length)
                if j is not None:
                    f[c_MxL.reshape(-1), j] = 1.0
            feats.append(f)
    else:
        raise ValueError(f"unknown structure kind {cfg.kind!r}")
    g, s, r, t, w = acc.result()
    cut = np.searchsorted(g, np.arange(len(graphs) + 1))
    return [Relations(senders=s[cut[i]:cut[i + 1]].astype(np.int32),
                      receivers=r[cut[i]:cut[i + 1]].astype(np.int32),
                      types=t[cut[i]:cut[i + 1]].astype(np.int32),
                      weights=w[cut[i]:cut[i + 1]].astype(np.float32),
                      node_features=feats[i], num_types=num_types,
                      num_cycles=int(cycle_counts[i]))
            for i in range(len(graphs))]
