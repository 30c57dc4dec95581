"""Host-side batching of graphs + relations into padded `jraph.GraphsTuple`s of static shape.

One dataset gets one set of padded sizes (`PadSizes`), computed from its graph-size statistics,
so a single compiled step serves every batch of every split: no recompiles in the loop. Graphs
are packed greedily in the given order; a batch closes when the next graph would overflow the
node, relation or graph budget.

Sparse layout (identical to `jraph.pad_with_graphs(jraph.batch_np(graphs), ...)`, which the tests
check): the real graphs, then one padding graph holding all padding nodes and relations, then
empty padding graphs. Padding relations join the first padding node to itself with weight 0.

Dense layout (`PadSizes.block > 0`; `layout="auto"` picks it where `dense_layout_pays`): every
graph owns `block` node slots (its real nodes first; `nodes["valid"]` marks them), and
`globals["adj"]` [n_graph, block * T, block] holds its relations as a matrix, `adj_t` its
transpose. The relation lists are still there (the same relations, in block coordinates), and
the models use the matrices: one batched matmul instead of a gather and a segment sum.

Fields:
  nodes:   {"x": float32 [N, F],          node features ++ log1p(structural features)
                                           ++ per-type relation weight * count_scale (typed)
            "type_weight": float32 [N, T],  total relation weight into the node per type
            "edge_sum_scale": float32 [N]}  type-0 weight * count_scale[0]
  edges:   {"type": int32 [R], "weight": float32 [R],   the typed relations
            "mean_weight": float32 [R]}  weight / total weight of its (receiver, type)
  senders, receivers: int32 [R]
  globals: {"y": int32 [G] (classes) or float32 [G, T] (regression targets),
            "adj", "adj_t" (dense layout only, see above)}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import jraph
import numpy as np

from jaxsys.gnn._graph import Graph
from jaxsys.gnn._relations import Relations

__all__ = ["GraphBatcher", "PadSizes", "dense_layout_pays"]


@dataclasses.dataclass(frozen=True)
class PadSizes:
    """Static shapes of a padded batch: nodes, relations (edges) and graphs, padding included.

    `block > 0` selects the dense layout: graph j owns nodes [j * block, (j + 1) * block), its
    real nodes first, and the batch carries each graph's relations as a dense matrix
    `globals["adj"]` [n_graph, block * types, block] (then `n_node == n_graph * block`).
    """

    n_node: int
    n_edge: int
    n_graph: int
    block: int = 0


def _round_up(x: float, m: int) -> int:
    return int(math.ceil(x / m) * m)


# The dense layout's break-even: matrix entries per padded sparse relation. Measured on the
# 2-core CPU (full CSL train step, width 64, depth 4, batch 32, dense vs sparse in one run):
# GIN at 9.5 entries per relation ran at the same speed in both layouts (214.5 vs 216.2 us per
# graph), CSGNN at 8.0 10-15% faster dense, KP-GNN at 5.5 41% faster dense.
DENSE_ENTRIES_PER_RELATION = 9.0
DENSE_NODE_OVERHEAD = 1.1


def dense_layout_pays(*, sparse: PadSizes, dense: PadSizes, num_types: int) -> bool:
    """Whether the dense layout's batched matmul should beat the sparse gather + segment sum.

    Dense costs `n_graph * types * block**2` multiply-adds per feature where sparse costs one
    gather and one scatter-add per padded relation; it also gives every graph `block` node slots,
    and the per-node MLPs pay for those. So: dense when its matrices have fewer entries than
    `DENSE_ENTRIES_PER_RELATION` per sparse relation and it adds at most 10% nodes (graphs of
    nearly one size with many relations, e.g. CSL and SR25).
    """
    entries = dense.n_graph * num_types * dense.block ** 2
    return (entries < DENSE_ENTRIES_PER_RELATION * sparse.n_edge
            and dense.n_node <= DENSE_NODE_OVERHEAD * sparse.n_node)


class GraphBatcher:
    """Packs a dataset's graphs into padded `GraphsTuple`s.

    Args:
      graphs: the graphs (node features and targets).
      relations: their relations (same order), from `dataset_relations`.
      batch_size: graphs per batch (at most; fewer when the node/relation budget is reached).
      regression: targets are float vectors (else int classes).
      pad: explicit `PadSizes` (default: from the dataset's size statistics).
      count_scale: per-type scale of the relation-count input features (default: 1 / mean).
      dtype: float dtype of features and weights (float64 for the expressiveness checks).
      layout: "sparse", "dense" (see the module docstring) or "auto": dense where
        `dense_layout_pays`. With an explicit `pad`, its `block` decides.
    """

    def __init__(self, graphs: Sequence[Graph], relations: Sequence[Relations], *,
                 batch_size: int, regression: bool, pad: PadSizes | None = None,
                 count_scale: Sequence[float] | None = None, dtype=np.float32,
                 layout: str = "auto"):
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
        if layout not in ("auto", "sparse", "dense"):
            raise ValueError(f"layout must be 'auto', 'sparse' or 'dense', not {layout!r}")
        if pad is None:
            # 10% over an average batch, or the largest graph alone (+1 padding node). Budgeting
            # for an average batch *plus* the largest graph padded 1.5x the real relations on
            # PROTEINS, and padded relations cost as much as real ones in the segment sums.
            n_node = _round_up(max(batch_size * self.n_nodes.mean() * 1.1,
                                   self.n_nodes.max()) + 1, 16)
            n_edge = _round_up(max(batch_size * self.n_rels.mean() * 1.1, self.n_rels.max()), 64)
            pad = PadSizes(n_node=n_node, n_edge=n_edge, n_graph=batch_size + 1)
            block = int(self.n_nodes.max())
            dense = PadSizes(n_node=pad.n_graph * block, n_edge=n_edge, n_graph=pad.n_graph,
                             block=block)
            if layout == "dense" or (layout == "auto" and dense_layout_pays(
                    sparse=pad, dense=dense, num_types=self.num_types)):
                pad = dense
        elif layout != "auto" and (pad.block > 0) != (layout == "dense"):
            raise ValueError(f"layout={layout!r} contradicts the given {pad}")
        if pad.block:
            if pad.block < self.n_nodes.max() or pad.n_node != pad.n_graph * pad.block:
                raise ValueError(f"{pad} cannot hold the largest graph ({self.n_nodes.max()} "
                                 "nodes) in its dense layout (n_node must be n_graph * block)")
        elif pad.n_node < self.n_nodes.max() + 1:
            raise ValueError(f"{pad} cannot hold the largest graph ({self.n_nodes.max()} nodes, "
                             f"{self.n_rels.max()} relations) plus padding")
        if pad.n_edge < self.n_rels.max() or pad.n_graph < 2:
            raise ValueError(f"{pad} cannot hold the largest graph ({self.n_nodes.max()} nodes, "
                             f"{self.n_rels.max()} relations) plus padding")
        self.pad = pad

    @property
    def feature_dim(self) -> int:
        return int(self.x.shape[1])

    def pack(self, indices: Sequence[int]) -> list[np.ndarray]:
        """Split `indices` (in order) into batches that fit the padded sizes."""
        out, cur, nn, nr = [], [], 0, 0
        node_budget = np.inf if self.pad.block else self.pad.n_node - 1  # dense: one block each
        for i in indices:
            n, r = self.n_nodes[i], self.n_rels[i]
            if cur and (nn + n > node_budget or nr + r > self.pad.n_edge
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
        k, tn, tr = ids.shape[0], int(n.sum()), int(r.sum())
        if (not p.block and tn > p.n_node - 1) or tr > p.n_edge or k > p.n_graph - 1:
            raise ValueError(f"graphs {ids.tolist()[:5]}... do not fit {p}")
        # Where each graph's nodes start: packed one after another, or one block per graph.
        packed = np.concatenate([[0], np.cumsum(n)[:-1]])
        start = np.arange(k) * p.block if p.block else packed
        used = k * p.block if p.block else tn  # nodes before the padding graph's
        local = np.arange(tn) - np.repeat(packed, n)  # node index within its graph
        node_idx = np.repeat(self.node_off[ids], n) + local
        dst = np.repeat(start, n) + local
        new_roff = np.concatenate([[0], np.cumsum(r)])
        rel_idx = np.repeat(self.rel_off[ids] - new_roff[:-1], r) + np.arange(tr)
        shift = np.repeat(start, r)

        x = np.zeros((p.n_node, self.x.shape[1]), self.dtype)
        x[dst] = self.x[node_idx]
        type_weight = np.zeros((p.n_node, self.num_types), self.dtype)
        type_weight[dst] = self.type_weight[node_idx]
        edge_sum_scale = np.zeros((p.n_node,), self.dtype)
        edge_sum_scale[dst] = self.edge_sum_scale[node_idx]
        senders = np.full(p.n_edge, used, np.int32)
        receivers = np.full(p.n_edge, used, np.int32)
        senders[:tr] = self.senders[rel_idx] + shift
        receivers[:tr] = self.receivers[rel_idx] + shift
        types = np.zeros(p.n_edge, np.int32)
        types[:tr] = self.types[rel_idx]
        weights = np.zeros(p.n_edge, self.dtype)
        weights[:tr] = self.weights[rel_idx]
        mean_weights = np.zeros(p.n_edge, self.dtype)
        mean_weights[:tr] = self.mean_weights[rel_idx]
        n_node = np.zeros(p.n_graph, np.int32)
        n_node[:k] = p.block if p.block else n
        n_node[k] = p.n_node - used
        n_edge = np.zeros(p.n_graph, np.int32)
        n_edge[:k] = r
        n_edge[k] = p.n_edge - tr
        y = np.zeros((p.n_graph,) + self.y.shape[1:], self.y.dtype)
        y[:k] = self.y[ids]
        nodes = {"x": x, "type_weight": type_weight, "edge_sum_scale": edge_sum_scale}
        globals_ = {"y": y}
        if p.block:
            # Real nodes of real graphs; the rest of each block is padding inside its graph.
            valid = np.zeros(p.n_node, bool)
            valid[dst] = True
            nodes["valid"] = valid
            # adj[j, i * T + t, i'] = total weight of type-t relations i' -> i in graph j.
            t = self.num_types
            adj = np.zeros((p.n_graph * p.block * t * p.block,), self.dtype)
            g_r = np.repeat(np.arange(k), r)
            s_loc, r_loc = senders[:tr] - shift, receivers[:tr] - shift
            np.add.at(adj, ((g_r * p.block + r_loc) * t + types[:tr]) * p.block + s_loc,
                      weights[:tr])
            globals_["adj"] = adj.reshape(p.n_graph, p.block * t, p.block)
            # Its transpose too, for the backward pass: XLA:CPU runs a batched matmul with a
            # transposed left operand ~30% slower than with one laid out as [G, block, block * T].
            globals_["adj_t"] = np.ascontiguousarray(globals_["adj"].transpose(0, 2, 1))
        return jraph.GraphsTuple(
            nodes=nodes,
            edges={"type": types, "weight": weights, "mean_weight": mean_weights},
            senders=senders, receivers=receivers, n_node=n_node, n_edge=n_edge,
            globals=globals_)

    def batches(self, indices: Sequence[int], *, rng: np.random.Generator | None = None
                ) -> Iterator[jraph.GraphsTuple]:
        """Padded batches over `indices`, shuffled first when `rng` is given."""
        idx = np.asarray(indices)
        if rng is not None:
            idx = idx[rng.permutation(idx.shape[0])]
        for ids in self.pack(idx.tolist()):
            yield self.batch(ids)
