"""CSGNN, KP-GNN and GIN: one message-passing network over typed, weighted relations.

The three models differ only in the relations the host builds (`jaxsys.gnn.build_relations`), so
they share this module and compare at the same width and depth:

    h0      = Dense(x)                                              x: node features [N, F_in]
    m_r     = w_r * relu(gamma[t_r] * h[s_r] + beta[t_r])           one message per relation r
    a_v     = c * sum_{r: receiver(r) = v} m_r                      ONE segment sum per layer
    h'      = MLP((1 + eps) * h + a)                                GIN update
    emb(G)  = concat_l sum_{v in G} h_l[v]                          jumping-knowledge sum readout

`c` is a constant per dataset (1 / the mean total relation weight into a node, from
`GraphBatcher.message_scale`): CSGNN nodes on many chordless cycles receive thousands of weighted
relations, and without it activations grow by that factor per layer, until float64 rounding of
a relabelled graph exceeds the 1e-5 tolerance of the expressiveness protocol. A constant factor
changes no separation power.

GIN (one relation type, the graph's edges) sends `w_r * h[s_r]` (Xu et al. 2019). With several
relation types the per-type scale `gamma` and shift `beta` keep the types apart inside one
segment sum: a type-blind sum `sum_r h[s_r]` would let two relation types swap colours
unnoticed; a per-type diagonal map followed by a ReLU does not (for generic weights), so the
network can match colour refinement over typed relations (`jaxsys.gnn.colour_refinement`),
which the tests check on BREC pairs.

Layers are stacked with `nn.scan` (one compiled layer body); padding nodes and relations of a
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
    return {
        "senders": graph.senders,
        "type_sender": graph.edges["type"] * n_total + graph.senders,
        "receivers": graph.receivers,
        "types": graph.edges["type"],
        "weights": graph.edges["weight"],
        "node_graph": node_graph,
        "node_mask": node_mask,
        "graph_mask": graph_mask,
    }


def _shift_init(key, shape, dtype=jnp.float32):
    return 0.5 * jax.random.normal(key, shape, dtype)


def _scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.5 * jax.random.normal(key, shape, dtype)


class _Layer(nn.Module):
    width: int
    num_types: int
    typed: bool
    norm: str
    dropout: float
    message_scale: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h_NxF, ctx, train: bool):
        n_total = h_NxF.shape[0]
        w_R = ctx["weights"].astype(self.dtype)
        if self.typed:
            gamma_TxF = self.param("type_scale", _scale_init, (self.num_types, self.width),
                                   self.param_dtype).astype(self.dtype)
            beta_TxF = self.param("type_shift", _shift_init, (self.num_types, self.width),
                                  self.param_dtype).astype(self.dtype)
            # Every (type, node) message once, then one gather per relation: cheaper than
            # gathering h, gamma and beta per relation (and their three scatter-adds backward).
            table_TxNxF = nn.relu(h_NxF.reshape(1, n_total, self.width)
                                  * gamma_TxF.reshape(self.num_types, 1, self.width)
                                  + beta_TxF.reshape(self.num_types, 1, self.width))
            x_RxF = table_TxNxF.reshape(self.num_types * n_total, self.width)[ctx["type_sender"]]
        else:
            x_RxF = h_NxF[ctx["senders"]]
        msg_RxF = x_RxF * w_R.reshape(-1, 1)
        agg_NxF = self.message_scale * jax.ops.segment_sum(
            msg_RxF, ctx["receivers"], num_segments=n_total, indices_are_sorted=True)
        eps = self.param("eps", nn.initializers.zeros, (), self.param_dtype)
        z = (1.0 + eps.astype(self.dtype)) * h_NxF + agg_NxF
        mask_Nx1 = ctx["node_mask"].reshape(-1, 1)
        for i in range(2):
            z = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                         name=f"dense{i}")(z)
            if self.norm == "batch":
                z = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=f"bn{i}")(z, mask=mask_Nx1)
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
    message_scale: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h_NxF, ctx, train: bool):
        h_NxF = _Layer(self.width, self.num_types, self.typed, self.norm, self.dropout,
                       self.message_scale, self.dtype, self.param_dtype,
                       name="layer")(h_NxF, ctx, train)
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
      norm: "batch" (masked BatchNorm) or "none".
      dropout: dropout rate in layers and head (training only).
      message_scale: constant factor on aggregated messages (`GraphBatcher.message_scale`).
      dtype, param_dtype: computation and parameter dtypes (float64 for expressiveness tests).
    """

    num_types: int
    num_outputs: int
    width: int = 64
    depth: int = 4
    typed: bool | None = None
    norm: str = "batch"
    dropout: float = 0.0
    message_scale: float = 1.0
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
        )
        self.layers = scan(self.width, self.num_types, typed, self.norm, self.dropout,
                           self.message_scale, self.dtype, self.param_dtype)
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
