"""Host-side batching of graphs + relations into padded `jraph.GraphsTuple`s of static shape.

One dataset gets one set of padded sizes (`PadSizes`), computed from its graph-size statistics,
so a single compiled step serves every batch of every split: no recompiles in the loop. Graphs
are packed greedily in the given order; a batch closes when the next graph would overflow the
node, relation or graph budget.

Layout (identical to `jraph.pad_with_graphs(jraph.batch_np(graphs), ...)`, which the tests check):
the real graphs, then one padding graph holding all padding nodes and relations, then empty
padding graphs. Padding relations join the first padding node to itself with weight 0.

Fields:
  nodes:   {"x": float32 [N, F],          node features ++ log1p(structural features)
                                           ++ per-type relation weight * count_scale (typed)
            "type_weight": float32 [N, T],  total relation weight into the node per type
            "edge_sum_scale": float32 [N]}  type-0 weight * count_scale[0]
  edges:   {"type": int32 [R], "weight": float32 [R],   the typed relations
            "mean_weight": float32 [R]}  weight / total weight of its (receiver, type)
  senders, receivers: int32 [R]
  globals: {"y": int32 [G] (classes) or float32 [G, T] (regression targets)}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import jraph
import numpy as np

from jaxsys.gnn._graph import Graph
from jaxsys.gnn._relations import Relations

__all__ = ["GraphBatcher", "PadSizes"]


@dataclasses.dataclass(frozen=True)
class PadSizes:
    """Static shapes of a padded batch: nodes, relations (edges) and graphs, padding included."""

    n_node: int
    n_edge: int
    n_graph: int


def _round_up(x: float, m: int) -> int:
    return int(math.ceil(x / m) * m)


class GraphBatcher:
    """Packs a dataset's graphs into padded `GraphsTuple`s.

    Args:
      graphs: the graphs (node features and targets).
      relations: their relations (same order), from `dataset_relations`.
      batch_size: graphs per batch (at most; fewer when the node/relation budget is reached).
      regression: targets are float vectors (else int classes).
      pad: explicit `PadSizes` (default: from the dataset's size statistics).
    """

    def __init__(self, graphs: Sequence[Graph], relations: Sequence[Relations], *,
                 batch_size: int, regression: bool, pad: PadSizes | None = None,
                 count_scale: Sequence[float] | None = None, dtype=np.float32):
        if len(graphs) != len(relations):
            raise ValueError(f"{len(graphs)} graphs but {len(relations)} relation sets")
        if not graphs:
            raise ValueError("cannot batch an empty dataset")
        self.num_graphs = len(graphs)
        self.regression = regression
        self.dtype = dtype
        self.n_nodes = np.asarray([g.num_nodes for g in graphs], np.int64)
        self.n_rels = np.asarray([r.num_relations for r in relations], np.int64)
        feats = []
        for g, r in zip(graphs, relations):
            if r.node_features.shape[0] != g.num_nodes:
                raise ValueError("relations do not belong to these graphs (node counts differ)")
            feats.append(np.concatenate([g.x, np.log1p(r.node_features)], axis=1))
        widths = {f.shape[1] for f in feats}
        if len(widths) != 1:
            raise ValueError(f"graphs have different node-feature widths {sorted(widths)}")
        x = np.concatenate(feats)
        self.node_off = np.concatenate([[0], np.cumsum(self.n_nodes)])
        self.rel_off = np.concatenate([[0], np.cumsum(self.n_rels)])
        self.senders = np.concatenate([r.senders for r in relations]).astype(np.int32)
        self.receivers = np.concatenate([r.receivers for r in relations]).astype(np.int32)
        self.types = np.concatenate([r.types for r in relations]).astype(np.int32)
        self.weights = np.concatenate([r.weights for r in relations]).astype(dtype)
        if regression:
            self.y = np.stack([np.asarray(g.y, np.float32).reshape(-1) for g in graphs])
        else:
            self.y = np.asarray([int(g.y) for g in graphs], np.int32)
        self.num_types = relations[0].num_types
        tw = np.zeros((int(self.n_nodes.sum()) * self.num_types,), np.float64)
        recv_global = self.receivers.astype(np.int64) + np.repeat(self.node_off[:-1], self.n_rels)
        np.add.at(tw, recv_global * self.num_types + self.types, self.weights)
        self.type_weight = tw.reshape(-1, self.num_types).astype(dtype)
        denom = np.maximum(tw[recv_global * self.num_types + self.types], 1.0)
        self.mean_weights = (self.weights / denom).astype(dtype)
        # Typed models also see each node's total relation weight per type (its degree in that
        # relation: e.g. the number of chordless cycles through it) as input, scaled by a
        # per-type dataset constant: counting targets are sums of such counts.
        if self.num_types > 1:
            if count_scale is None:
                mean_t = self.type_weight.astype(np.float64).mean(0)
                count_scale = tuple(float(1.0 / max(m, 1.0)) for m in mean_t)
            if len(count_scale) != self.num_types:
                raise ValueError(f"count_scale has {len(count_scale)} entries for "
                                 f"{self.num_types} relation types")
            x = np.concatenate([x, self.type_weight * np.asarray(count_scale).reshape(1, -1)],
                               axis=1)
            self.count_scale = tuple(count_scale)
        else:
            self.count_scale = (1.0,)
        # mean over type 0 * this = the type-0 sum * count_scale[0] (GIN's sum, kept O(1)).
        self.edge_sum_scale = (self.type_weight[:, 0].astype(np.float64)
                               * self.count_scale[0]).astype(dtype)
        self.x = x.astype(dtype)
        self.batch_size = batch_size
        if pad is None:
            # 10% over an average batch, or the largest graph alone (+1 padding node). Budgeting
            # for an average batch *plus* the largest graph padded 1.5x the real relations on
            # PROTEINS, and padded relations cost as much as real ones in the segment sums.
            n_node = _round_up(max(batch_size * self.n_nodes.mean() * 1.1,
                                   self.n_nodes.max()) + 1, 16)
            n_edge = _round_up(max(batch_size * self.n_rels.mean() * 1.1, self.n_rels.max()), 64)
            pad = PadSizes(n_node=n_node, n_edge=n_edge, n_graph=batch_size + 1)
        if pad.n_node < self.n_nodes.max() + 1 or pad.n_edge < self.n_rels.max() or pad.n_graph < 2:
            raise ValueError(f"{pad} cannot hold the largest graph ({self.n_nodes.max()} nodes, "
                             f"{self.n_rels.max()} relations) plus padding")
        self.pad = pad

    @property
    def feature_dim(self) -> int:
        return int(self.x.shape[1])

    def pack(self, indices: Sequence[int]) -> list[np.ndarray]:
        """Split `indices` (in order) into batches that fit the padded sizes."""
        out, cur, nn, nr = [], [], 0, 0
        for i in indices:
            n, r = self.n_nodes[i], self.n_rels[i]
            if cur and (nn + n > self.pad.n_node - 1 or nr + r > self.pad.n_edge
                        or len(cur) + 1 > self.pad.n_graph - 1):
                out.append(np.asarray(cur))
                cur, nn, nr = [], 0, 0
            cur.append(i)
            nn += n
            nr += r
        if cur:
            out.append(np.asarray(cur))
        return out

    def batch(self, ids: np.ndarray) -> jraph.GraphsTuple:
        """One padded GraphsTuple holding graphs `ids` (which must fit `self.pad`)."""
        p = self.pad
        ids = np.asarray(ids)
        n, r = self.n_nodes[ids], self.n_rels[ids]
        tn, tr = int(n.sum()), int(r.sum())
        if tn > p.n_node - 1 or tr > p.n_edge or ids.shape[0] > p.n_graph - 1:
            raise ValueError(f"graphs {ids.tolist()[:5]}... do not fit {p}")
        new_noff = np.concatenate([[0], np.cumsum(n)])
        node_idx = np.repeat(self.node_off[ids] - new_noff[:-1], n) + np.arange(tn)
        new_roff = np.concatenate([[0], np.cumsum(r)])
        rel_idx = np.repeat(self.rel_off[ids] - new_roff[:-1], r) + np.arange(tr)
        shift = np.repeat(new_noff[:-1], r)
        pad_nodes, pad_rels, pad_graphs = p.n_node - tn, p.n_edge - tr, p.n_graph - ids.shape[0]

        x = np.zeros((p.n_node, self.x.shape[1]), self.dtype)
        x[:tn] = self.x[node_idx]
        type_weight = np.zeros((p.n_node, self.num_types), self.dtype)
        type_weight[:tn] = self.type_weight[node_idx]
        edge_sum_scale = np.zeros((p.n_node,), self.dtype)
        edge_sum_scale[:tn] = self.edge_sum_scale[node_idx]
        senders = np.full(p.n_edge, tn, np.int32)
        receivers = np.full(p.n_edge, tn, np.int32)
        senders[:tr] = self.senders[rel_idx] + shift
        receivers[:tr] = self.receivers[rel_idx] + shift
        types = np.zeros(p.n_edge, np.int32)
        types[:tr] = self.types[rel_idx]
        weights = np.zeros(p.n_edge, self.dtype)
        weights[:tr] = self.weights[rel_idx]
        mean_weights = np.zeros(p.n_edge, self.dtype)
        mean_weights[:tr] = self.mean_weights[rel_idx]
        n_node = np.zeros(p.n_graph, np.int32)
        n_node[:ids.shape[0]] = n
        n_node[ids.shape[0]] = pad_nodes
        n_edge = np.zeros(p.n_graph, np.int32)
        n_edge[:ids.shape[0]] = r
        n_edge[ids.shape[0]] = pad_rels
        y = np.zeros((p.n_graph,) + self.y.shape[1:], self.y.dtype)
        y[:ids.shape[0]] = self.y[ids]
        del pad_graphs
        return jraph.GraphsTuple(
            nodes={"x": x, "type_weight": type_weight, "edge_sum_scale": edge_sum_scale},
            edges={"type": types, "weight": weights, "mean_weight": mean_weights},
            senders=senders, receivers=receivers, n_node=n_node, n_edge=n_edge,
            globals={"y": y})

    def batches(self, indices: Sequence[int], *, rng: np.random.Generator | None = None
                ) -> Iterator[jraph.GraphsTuple]:
        """Padded batches over `indices`, shuffled first when `rng` is given."""
        idx = np.asarray(indices)
        if rng is not None:
            idx = idx[rng.permutation(idx.shape[0])]
        for ids in self.pack(idx.tolist()):
            yield self.batch(ids)
