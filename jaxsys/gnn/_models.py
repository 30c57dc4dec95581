"""CSGNN, KP-GNN and GIN: one message-passing network over typed, weighted relations.

The three models differ only in the relations the host builds (`jaxsys.gnn.build_relations`), so
they share this module and compare at the same width and depth:

    h0      = Dense(x)                                              x: node features [N, F_in]
    S_v,t   = sum_{r: receiver(r) = v, type(r) = t} w_r h[s_r]      ONE segment sum per layer,
                                                                    over (node, type) segments
    C_v,t   = sum_{r: receiver(r) = v, type(r) = t} w_r               (built on the host)
    a_v     = sum_t gamma_t * S_v,t / max(C_v,t, 1)                 per type: weighted mean
              + beta_t * log(1 + C_v,t)                             and log total weight,
              + psi * k * S_v,0                                     + GIN's sum over edges
    h'      = MLP((1 + eps) * h + a)                                GIN update
    emb(G)  = concat_l sum_{v in G} h_l[v]                          jumping-knowledge sum readout

GIN (one relation type, the graph's edges) aggregates the plain sum `sum_r w_r h[s_r]`, as in
Xu et al. (2019). With several relation types a type-blind sum would let two types swap colours
unnoticed, so the typed models sum per (node, type) segment and map each type by its own random
diagonal `gamma_t`, `beta_t`. The pair (weighted mean, total weight) determines the weighted sum,
and for generic `gamma`, `beta` a collision between two different inputs would need a linear
relation between them, so the layer separates exactly what colour refinement over the typed
relations separates (`jaxsys.gnn.colour_refinement`; the tests and the expressiveness benchmark
check it in float64). Using the mean and a log count instead of the raw sum keeps activations
O(1) when nodes lie on hundreds of chordless cycles (CSL, dense counting graphs); raw sums made
float64 relabellings drift past the 1e-5 tolerance and training unstable on outlier graphs.
The extra `psi * k * S_v,0` (k = 1 / mean degree, a dataset constant) is GIN's own edge sum:
sums compose into walk counts across layers, which subgraph counts correlate with. Typed models
also get `C_v,t * count_scale_t` as input features (`GraphBatcher`).
Cost: one gather and one segment sum over the relations, like GIN over its edges, plus
O(N * types * width) dense work; per-relation type embeddings (GINE-style) measured slower on CPU.
In the dense layout (`GraphBatcher` picks it for small graphs of one size with many relations,
e.g. CSL) the gather and segment sum become one batched matmul with each graph's
[block * types, block] relation-weight matrix, and its transpose in the backward pass.

Layers are stacked with `nn.scan` (parameters stacked per layer) and fully unrolled: as a rolled
XLA loop the train step ran 1.5-2x slower on CPU. Padding nodes and relations of a
`jraph.GraphsTuple` from `GraphBatcher` carry zero weight and are masked out of the readout.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

__all__ = ["GraphNet", "graph_context"]


def graph_context(graph: jraph.GraphsTuple) -> dict[str, jax.Array]:
    """Index arrays the layers need, from a padded GraphsTuple (static shapes)."""
    n_total = graph.nodes["x"].shape[0]
    n_graph = graph.n_node.shape[0]
    node_graph = jnp.repeat(jnp.arange(n_graph, dtype=jnp.int32), graph.n_node,
                            total_repeat_length=n_total)
    graph_mask = jraph.get_graph_padding_mask(graph)
    node_mask = jraph.get_node_padding_mask(graph)
    dense = {}
    if "adj" in graph.globals:  # dense layout: padding nodes inside each graph's block too
        node_mask = node_mask & graph.nodes["valid"]
        dense = {"adj": graph.globals["adj"], "adj_t": graph.globals["adj_t"]}
    return dense | {
        "type_weight": graph.nodes["type_weight"],
        "edge_sum_scale": graph.nodes["edge_sum_scale"],
        "senders": graph.senders,
        "receivers": graph.receivers,
        "types": graph.edges["type"],
        "weights": graph.edges["weight"],
        "mean_weights": graph.edges["mean_weight"],
        "node_graph": node_graph,
        "node_mask": node_mask,
        "graph_mask": graph_mask,
    }


@jax.custom_vjp
def _dense_aggregate(adj_GxMxB, adj_t_GxBxM, h_GxBxF):
    """adj @ h per graph; the backward pass multiplies by the host-transposed `adj_t`."""
    return jnp.matmul(adj_GxMxB, h_GxBxF)


def _dense_aggregate_fwd(adj_GxMxB, adj_t_GxBxM, h_GxBxF):
    return jnp.matmul(adj_GxMxB, h_GxBxF), adj_t_GxBxM


def _dense_aggregate_bwd(adj_t_GxBxM, g_GxMxF):
    return None, None, jnp.matmul(adj_t_GxBxM, g_GxMxF)  # relations are inputs, not learned


_dense_aggregate.defvjp(_dense_aggregate_fwd, _dense_aggregate_bwd)


def _aggregate(h_NxF, ctx, num_types: int, *, typed: bool) -> jax.Array:
    """Messages over the relations: typed, the per-(node, type) weighted means [N, T, F]
    (sum_r w_r h[s_r] / max(C_v,t, 1)); untyped, the type-blind weighted sum [N, F].

    Sparse layout: one gather and one segment sum (over (receiver, type) segments when typed;
    relations are sorted that way). Dense layout: S_v,t for all (v, t) of graph j is one matmul
    with its [block * T, block] relation-weight matrix, batched over graphs.
    """
    n_total, width = h_NxF.shape
    dtype = h_NxF.dtype
    if "adj" in ctx:
        adj = ctx["adj"]
        n_graph, block = adj.shape[0], adj.shape[2]
        if adj.shape[1] != block * num_types:
            raise ValueError(f"the batch has {adj.shape[1] // block} relation types, "
                             f"the model num_types={num_types}")
        sum_NxTxF = _dense_aggregate(adj.astype(dtype), ctx["adj_t"].astype(dtype),
                                     h_NxF.reshape(n_graph, block, width)).reshape(
                                         n_total, num_types, width)
        if not typed:
            return sum_NxTxF.sum(axis=1)
        count_NxT = jnp.maximum(ctx["type_weight"].astype(dtype), 1.0)
        return sum_NxTxF / count_NxT.reshape(n_total, num_types, 1)
    if not typed:
        x_RxF = h_NxF[ctx["senders"]] * ctx["weights"].astype(dtype).reshape(-1, 1)
        return jax.ops.segment_sum(x_RxF, ctx["receivers"], num_segments=n_total,
                                   indices_are_sorted=True)
    x_RxF = h_NxF[ctx["senders"]] * ctx["mean_weights"].astype(dtype).reshape(-1, 1)
    seg_R = ctx["receivers"] * num_types + ctx["types"]
    return jax.ops.segment_sum(x_RxF, seg_R, num_segments=n_total * num_types,
                               indices_are_sorted=True).reshape(n_total, num_types, width)


def _shift_init(key, shape, dtype=jnp.float32):
    return 0.1 * jax.random.normal(key, shape, dtype)


def _scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.1 * jax.random.normal(key, shape, dtype)


class _Layer(nn.Module):
    width: int
    num_types: int
    typed: bool
    norm: str
    dropout: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h_NxF, ctx, train: bool):
        t = self.num_types
        if self.typed:
            # Per-type weighted means; then per-type diagonal maps of the mean and of
            # log(1 + C_v,t).
            mean_NxTxF = _aggregate(h_NxF, ctx, t, typed=True)
            gamma_TxF = self.param("type_scale", _scale_init, (t, self.width),
                                   self.param_dtype).astype(self.dtype)
            beta_TxF = self.param("type_shift", _shift_init, (t, self.width),
                                  self.param_dtype).astype(self.dtype)
            # A sum of t elementwise products, not an einsum: XLA:CPU runs "ntf,tf->nf" and its
            # gradient as batched dots over f with [N, T, F] transposes (measured, CSL: 10-20% of
            # the train step), and a broadcast-multiply-and-sum materialised [N, T, F] broadcasts.
            logc_NxT = jnp.log1p(ctx["type_weight"].astype(self.dtype))
            agg_NxF = logc_NxT @ beta_TxF
            for i in range(t):
                agg_NxF = agg_NxF + mean_NxTxF[:, i, :] * gamma_TxF[i:i + 1]
            # Plus GIN's plain (dataset-scaled) sum over type 0, the graph's edges: sums compose
            # into walk counts across layers, the signal that subgraph counts correlate with.
            psi_F = self.param("edge_sum_scale", nn.initializers.ones, (self.width,),
                               self.param_dtype).astype(self.dtype)
            edge_sum_NxF = mean_NxTxF[:, 0, :] * ctx["edge_sum_scale"].astype(
                self.dtype).reshape(-1, 1)
            agg_NxF = agg_NxF + edge_sum_NxF * psi_F.reshape(1, self.width)
        else:
            agg_NxF = _aggregate(h_NxF, ctx, t, typed=False)
        eps = self.param("eps", nn.initializers.zeros, (), self.param_dtype)
        z = (1.0 + eps.astype(self.dtype)) * h_NxF + agg_NxF
        return self._mlp(z, train, ctx)

    def _mlp(self, z, train, ctx):
        mask_Nx1 = ctx["node_mask"].reshape(-1, 1)
        for i in range(2):
            z = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                         name=f"dense{i}")(z)
            if self.norm == "batch":
                z = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=f"bn{i}")(z, mask=mask_Nx1)
            elif self.norm == "layer":
                z = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                                 name=f"ln{i}")(z)
            z = nn.relu(z)
        z = nn.Dropout(self.dropout, deterministic=not train)(z)
        return z


class _ScanBody(nn.Module):
    """One layer as a scan body: carry = node states, output = this layer's graph readout."""

    width: int
    num_types: int
    typed: bool
    norm: str
    dropout: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h_NxF, ctx, train: bool):
        h_NxF = _Layer(self.width, self.num_types, self.typed, self.norm, self.dropout,
                       self.dtype, self.param_dtype, name="layer")(h_NxF, ctx, train)
        return h_NxF, _readout(h_NxF, ctx)


def _readout(h_NxF, ctx):
    n_graph = ctx["graph_mask"].shape[0]
    masked = h_NxF * ctx["node_mask"].reshape(-1, 1).astype(h_NxF.dtype)
    return jax.ops.segment_sum(masked, ctx["node_graph"], num_segments=n_graph,
                               indices_are_sorted=True)


class GraphNet(nn.Module):
    """CSGNN / KP-GNN / GIN over a padded `jraph.GraphsTuple` (see the module docstring).

    Attributes:
      num_types: relation types in the batches (1 for GIN).
      num_outputs: classes or regression targets.
      width, depth: hidden width and number of message-passing layers.
      typed: per-type message maps (default: `num_types > 1`).
      norm: "batch" (masked BatchNorm), "layer" (LayerNorm) or "none".
      dropout: dropout rate in layers and head (training only).
      dtype, param_dtype: computation and parameter dtypes (float64 for expressiveness tests).
    """

    num_types: int
    num_outputs: int
    width: int = 64
    depth: int = 4
    typed: bool | None = None
    norm: str = "batch"
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        typed = self.num_types > 1 if self.typed is None else self.typed
        self.encoder = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype)
        scan = nn.scan(
            _ScanBody,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=self.depth,
            unroll=self.depth,
        )
        self.layers = scan(self.width, self.num_types, typed, self.norm, self.dropout,
                           self.dtype, self.param_dtype)
        self.head1 = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype)
        self.head2 = nn.Dense(self.num_outputs, dtype=self.dtype, param_dtype=self.param_dtype)
        self.head_dropout = nn.Dropout(self.dropout)

    def embed(self, graph: jraph.GraphsTuple, train: bool = False) -> jax.Array:
        """Graph embeddings [G, (depth + 1) * width]: the per-layer sum readouts, concatenated."""
        ctx = graph_context(graph)
        h0 = self.encoder(graph.nodes["x"].astype(self.dtype))
        _, pooled_LxGxF = self.layers(h0, ctx, train)
        pooled = jnp.concatenate([_readout(h0, ctx).reshape(1, -1, self.width), pooled_LxGxF],
                                 axis=0)
        n_graph = pooled.shape[1]
        return jnp.transpose(pooled, (1, 0, 2)).reshape(n_graph, -1)

    def __call__(self, graph: jraph.GraphsTuple, train: bool = False) -> jax.Array:
        """Outputs [G, num_outputs] (logits or regression values); padding graphs included."""
        emb = self.embed(graph, train)
        z = nn.relu(self.head1(emb))
        z = self.head_dropout(z, deterministic=not train)
        return self.head2(z)
