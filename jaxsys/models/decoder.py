"""The decoder: one pure function for Llama 2/3, Mistral, Qwen2, SmolLM2, Mixtral and Qwen2-MoE.

Parameters are a plain pytree of arrays; `param_logical_axes(cfg)` gives the same tree with a
logical axis name per dimension (see `jaxsys.sharding`). Layers are stacked on a leading `layers`
axis and run with `lax.scan`, so a 30-layer model compiles like a 1-layer one.

    params = {
      "embed":      [V, D]
      "layers": {
        "attn_norm": [L, D]            "mlp_norm": [L, D]
        "wq": [L, D, Hq, Dh]   "wk", "wv": [L, D, Hkv, Dh]   "wo": [L, Hq, Dh, D]
        "bq": [L, Hq, Dh]      "bk", "bv": [L, Hkv, Dh]       (attention_bias only)
        dense:  "w_gate", "w_up": [L, D, F]   "w_down": [L, F, D]
        MoE:    "router": [L, D, E]  "we_gate", "we_up": [L, E, D, Fe]  "we_down": [L, E, Fe, D]
                shared expert (Qwen2-MoE): "ws_gate", "ws_up": [L, D, Fs]  "ws_down": [L, Fs, D]
                "ws_router": [L, D]
      }
      "final_norm": [D]
      "lm_head":    [D, V]           (absent when embeddings are tied)
    }

The KV cache is an explicit argument and result (`jaxsys.models.kv_cache`): with a cache, the new
tokens' K/V are written into their pages and attention runs over each request's pages through an
attention function the caller may replace (the serving engine passes the shared-prefix kernel).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxsys.models import layers
from jaxsys.models import residuals as rn
from jaxsys.models.config import ModelConfig, rope_inv_freq
from jaxsys.models.kv_cache import AttentionMetadata, KVCache, flat_pages, slot_indices
from jaxsys.sharding import axes as ax
from jaxsys.sharding import constrain

Params = dict[str, Any]


def param_shapes(cfg: ModelConfig) -> Params:
    L, D, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    Hq, Hkv, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    lay: dict[str, tuple[int, ...]] = {
        "attn_norm": (L, D), "mlp_norm": (L, D),
        "wq": (L, D, Hq, Dh), "wk": (L, D, Hkv, Dh), "wv": (L, D, Hkv, Dh), "wo": (L, Hq, Dh, D),
    }
    if cfg.attention_bias:
        lay.update(bq=(L, Hq, Dh), bk=(L, Hkv, Dh), bv=(L, Hkv, Dh))
    if cfg.is_moe:
        E, Fe = cfg.num_experts, cfg.moe_intermediate_size
        lay.update(router=(L, D, E), we_gate=(L, E, D, Fe), we_up=(L, E, D, Fe), we_down=(L, E, Fe, D))
        if cfg.shared_expert_intermediate_size:
            Fs = cfg.shared_expert_intermediate_size
            lay.update(ws_gate=(L, D, Fs), ws_up=(L, D, Fs), ws_down=(L, Fs, D), ws_router=(L, D))
    else:
        F = cfg.intermediate_size
        lay.update(w_gate=(L, D, F), w_up=(L, D, F), w_down=(L, F, D))
    shapes: Params = {"embed": (V, D), "layers": lay, "final_norm": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


_LAYER_AXES = {
    "attn_norm": (ax.LAYERS, ax.NORM), "mlp_norm": (ax.LAYERS, ax.NORM),
    "wq": (ax.LAYERS, ax.EMBED, ax.Q_HEADS, ax.HEAD_DIM),
    "wk": (ax.LAYERS, ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM),
    "wv": (ax.LAYERS, ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM),
    "wo": (ax.LAYERS, ax.Q_HEADS, ax.HEAD_DIM, ax.EMBED),
    "bq": (ax.LAYERS, ax.Q_HEADS, ax.HEAD_DIM),
    "bk": (ax.LAYERS, ax.KV_HEADS, ax.HEAD_DIM), "bv": (ax.LAYERS, ax.KV_HEADS, ax.HEAD_DIM),
    "w_gate": (ax.LAYERS, ax.EMBED, ax.MLP), "w_up": (ax.LAYERS, ax.EMBED, ax.MLP),
    "w_down": (ax.LAYERS, ax.MLP, ax.EMBED),
    "router": (ax.LAYERS, ax.EMBED, ax.ROUTER),
    "we_gate": (ax.LAYERS, ax.EXPERT, ax.EMBED, ax.EXPERT_MLP),
    "we_up": (ax.LAYERS, ax.EXPERT, ax.EMBED, ax.EXPERT_MLP),
    "we_down": (ax.LAYERS, ax.EXPERT, ax.EXPERT_MLP, ax.EMBED),
    "ws_gate": (ax.LAYERS, ax.EMBED, ax.MLP), "ws_up": (ax.LAYERS, ax.EMBED, ax.MLP),
    "ws_down": (ax.LAYERS, ax.MLP, ax.EMBED), "ws_router": (ax.LAYERS, ax.EMBED),
}


def param_logical_axes(cfg: ModelConfig) -> Params:
    shapes = param_shapes(cfg)
    out: Params = {"embed": (ax.VOCAB, ax.EMBED), "final_norm": (ax.NORM,),
                   "layers": {k: _LAYER_AXES[k] for k in shapes["layers"]}}
    if "lm_head" in shapes:
        out["lm_head"] = (ax.EMBED, ax.VOCAB)
    return out


def init_params(cfg: ModelConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) matrices, unit norms, zero biases), as HF initializes."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))[0]]
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(cfg.dtype)
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        elif "'b" in path:  # biases bq/bk/bv
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


class AttentionFn(Protocol):
    def __call__(self, q_BxTxHqxDh: jax.Array, k_new_BxTxKxDh: jax.Array, v_new_BxTxKxDh: jax.Array,
                 cache: KVCache, layer: jax.Array, positions_BxT: jax.Array, meta: AttentionMetadata,
                 cfg: ModelConfig) -> jax.Array: ...


class MoEFn(Protocol):
    """The MoE feed-forward of one layer: x [B, T, D] (normed) and the layer's parameters -> [B, T, D]."""

    def __call__(self, x_BxTxD: jax.Array, p: Params, cfg: ModelConfig) -> jax.Array: ...


def cached_prefix_lens(positions_BxT: jax.Array, meta: AttentionMetadata) -> jax.Array:
    """Tokens of each request already in the cache before this step: kv_lens - new valid tokens."""
    return meta.kv_lens - jnp.sum(positions_BxT >= 0, axis=1, dtype=jnp.int32)


def paged_attention(q_BxTxHqxDh, k_new_BxTxKxDh, v_new_BxTxKxDh, cache, layer, positions_BxT, meta, cfg):
    """Default attention: each request's cached pages (read-only) plus this step's new tokens.

    The cache still holds the context *before* this step; the new K/V are attended directly and
    written to the cache once, after all layers (`forward`), so the cache is updated in place.
    """
    B, T, Hq, Dh = q_BxTxHqxDh.shape
    K, ps, P = cfg.num_kv_heads, cache.page_size, meta.page_table.shape[1]
    k_flat, v_flat = flat_pages(cache)
    pages_BxP = meta.page_table + layer * cache.num_pages
    k_c = jnp.moveaxis(k_flat[:, pages_BxP], 0, 3).reshape(B, P * ps, K, Dh)  # [K,B,P,ps,D] -> [B,S,K,D]
    v_c = jnp.moveaxis(v_flat[:, pages_BxP], 0, 3).reshape(B, P * ps, K, Dh)
    k_pos_BxS = jnp.broadcast_to(jnp.arange(P * ps, dtype=jnp.int32)[None, :], (B, P * ps))
    cached_B = cached_prefix_lens(positions_BxT, meta)
    mask_c = layers.causal_mask(positions_BxT, k_pos_BxS, k_pos_BxS < cached_B[:, None], cfg.sliding_window)
    mask_n = layers.causal_mask(positions_BxT, positions_BxT, positions_BxT >= 0, cfg.sliding_window)
    k = jnp.concatenate([k_c, k_new_BxTxKxDh.astype(k_c.dtype)], axis=1)
    v = jnp.concatenate([v_c, v_new_BxTxKxDh.astype(v_c.dtype)], axis=1)
    mask = jnp.concatenate([mask_c, mask_n], axis=2)
    q = q_BxTxHqxDh.reshape(B, T, K, cfg.q_per_kv, Dh)
    return layers.attention_core(q, k, v, mask).reshape(B, T, Hq, Dh)


def write_cache(cache: KVCache, k_new_LxBxTxKxD: jax.Array, v_new_LxBxTxKxD: jax.Array,
                slots_BxT: jax.Array) -> KVCache:
    """Scatter every layer's new K/V into their slots at once (in place when the cache is donated)."""
    K, L, NP, PS, Dh = cache.k.shape
    n = slots_BxT.size
    slots = slots_BxT.reshape(n)

    def put(buf, new):
        flat = buf.reshape(K, L, NP * PS, Dh)
        upd = jnp.transpose(new.reshape(L, n, K, Dh), (2, 0, 1, 3)).astype(buf.dtype)  # [K, L, n, Dh]
        return flat.at[:, :, slots].set(upd).reshape(buf.shape)

    return KVCache(put(cache.k, k_new_LxBxTxKxD), put(cache.v, v_new_LxBxTxKxD))


def moe_ffn(x_BxTxD: jax.Array, p: Params, cfg: ModelConfig) -> jax.Array:
    """Top-k softmax routing (Mixtral; Qwen2-MoE with `norm_topk_prob` and a gated shared expert).

    Every expert runs on every token and the top-k combine weights select; exact, shardable over
    `expert`, and simple. Compute grows with num_experts / top_k (fine for the models we run on CPU).
    """
    router_BxTxE = jnp.einsum("BTD,DE->BTE", x_BxTxD, p["router"], preferred_element_type=jnp.float32)
    router_BxTxE = checkpoint_name(router_BxTxE, rn.MOE_ROUTER)
    probs = jax.nn.softmax(router_BxTxE, axis=-1)
    top_v, top_i = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        top_v = top_v / jnp.sum(top_v, axis=-1, keepdims=True)
    combine_BxTxE = jnp.sum(jax.nn.one_hot(top_i, cfg.num_experts, dtype=jnp.float32) * top_v[..., None], axis=-2)
    gate = checkpoint_name(jnp.einsum("BTD,EDF->BTEF", x_BxTxD, p["we_gate"]), rn.MOE_GATE)
    up = checkpoint_name(jnp.einsum("BTD,EDF->BTEF", x_BxTxD, p["we_up"]), rn.MOE_UP)
    h_BxTxExF = constrain(jax.nn.silu(gate) * up, (ax.BATCH, ax.SEQ, ax.EXPERT, ax.EXPERT_MLP))
    h_BxTxExF = checkpoint_name(h_BxTxExF, rn.MOE_ACT)
    y_BxTxExD = checkpoint_name(jnp.einsum("BTEF,EFD->BTED", h_BxTxExF, p["we_down"]), rn.MOE_EXPERT_OUT)
    out = jnp.einsum("BTED,BTE->BTD", y_BxTxExD, combine_BxTxE.astype(y_BxTxExD.dtype))
    if "ws_gate" in p:
        shared = layers.swiglu(x_BxTxD, p["ws_gate"], p["ws_up"], p["ws_down"])
        g_BxTx1 = jax.nn.sigmoid(jnp.einsum("BTD,D->BT", x_BxTxD, p["ws_router"]))[..., None]
        out = out + g_BxTx1 * shared
    return out


def _dropout(x: jax.Array, rate: float, keys_B: jax.Array | None, site: jax.Array) -> jax.Array:
    """Per-example dropout: example b's mask depends only on keys_B[b] and the site, never on the batch."""
    if keys_B is None or rate == 0.0:
        return x

    def one(key, xb):
        keep = jax.random.bernoulli(jax.random.fold_in(key, site), 1.0 - rate, xb.shape)
        return jnp.where(keep, xb / (1.0 - rate), 0).astype(xb.dtype)

    return jax.vmap(one)(keys_B, x)


def forward(params: Params, tokens_BxT: jax.Array, *, cfg: ModelConfig,
            positions_BxT: jax.Array | None = None, valid_BxT: jax.Array | None = None,
            cache: KVCache | None = None, meta: AttentionMetadata | None = None,
            attention: AttentionFn = paged_attention, moe: MoEFn | None = None,
            dropout_rate: float = 0.0, dropout_keys_B: jax.Array | None = None,
            logits_index_B: jax.Array | None = None, return_hidden: bool = False,
            hidden_layer: int | None = None):
    """Logits [B, T, V] (float32) and the updated cache.

    tokens_BxT: int32 token ids. positions_BxT: position of each token in its sequence (default
    0..T-1); a negative position marks padding. Without a cache, attention is causal over the T
    tokens themselves (valid_BxT masks padded keys). With a cache, the tokens' K/V are written to the
    pages given by `meta.page_table` and attention covers each request's first `meta.kv_lens` tokens.
    moe: the MoE feed-forward (default `moe_ffn`); e.g. one that computes only the routed experts.
    dropout_keys_B: per-example PRNG keys [B] (typed keys) to enable residual dropout (training).
    logits_index_B: compute logits only at this position of each row ([B, 1, V]; prefill needs
    just the last prompt token, which saves the vocabulary projection of the others).
    return_hidden: also return a hidden state [B, T, D] (at `logits_index_B` when given): the
    final-norm one the LM head reads, or with `hidden_layer = l` (static, 1..L) the residual stream
    after the first l layers. The layer scan then carries that residual; without `hidden_layer` the
    program is exactly the one it would be otherwise.
    """
    B, T = tokens_BxT.shape
    if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
    if (cache is None) != (meta is None):
        raise ValueError("pass both `cache` and `meta`, or neither")
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    dtype = jnp.dtype(cfg.dtype)
    x = constrain(params["embed"][tokens_BxT].astype(dtype), (ax.BATCH, ax.SEQ, ax.EMBED))
    if cache is None:
        valid = jnp.ones((B, T), bool) if valid_BxT is None else valid_BxT
        self_mask = layers.causal_mask(positions_BxT, positions_BxT, valid & (positions_BxT >= 0),
                                       cfg.sliding_window)

    def layer_fn(x, xs):
        p, i = xs
        h = checkpoint_name(layers.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps), rn.ATTN_NORM)
        q = jnp.einsum("BTD,DHK->BTHK", h, p["wq"])
        k = jnp.einsum("BTD,DHK->BTHK", h, p["wk"])
        v = jnp.einsum("BTD,DHK->BTHK", h, p["wv"])
        if cfg.attention_bias:
            q, k, v = q + p["bq"][None, None], k + p["bk"][None, None], v + p["bv"][None, None]
        q = constrain(layers.rope(q, positions_BxT, inv_freq), (ax.BATCH, ax.SEQ, ax.Q_HEADS, ax.HEAD_DIM))
        k = constrain(layers.rope(k, positions_BxT, inv_freq), (ax.BATCH, ax.SEQ, ax.KV_HEADS, ax.HEAD_DIM))
        q, k, v = checkpoint_name(q, rn.ATTN_Q), checkpoint_name(k, rn.ATTN_K), checkpoint_name(v, rn.ATTN_V)
        if cache is None:
            qg = q.reshape(B, T, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim)
            o = layers.attention_core(qg, k, v, self_mask).reshape(B, T, cfg.num_heads, cfg.head_dim)
        else:
            o = attention(q, k, v, cache, i, positions_BxT, meta, cfg).astype(dtype)
        o = checkpoint_name(constrain(o, (ax.BATCH, ax.SEQ, ax.Q_HEADS, ax.HEAD_DIM)), rn.ATTN_CTX)
        attn_out = jnp.einsum("BTHK,HKD->BTD", o, p["wo"])
        x = checkpoint_name(x + _dropout(attn_out, dropout_rate, dropout_keys_B, 2 * i), rn.ATTN_RESID)
        h = checkpoint_name(layers.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps), rn.MLP_NORM)
        if cfg.is_moe:
            mlp_out = (moe or moe_ffn)(h, p, cfg)
        else:  # layers.swiglu, written out so that its intermediates carry names
            gate = checkpoint_name(h @ p["w_gate"], rn.MLP_GATE)
            up = checkpoint_name(h @ p["w_up"], rn.MLP_UP)
            mlp_out = checkpoint_name(jax.nn.silu(gate) * up, rn.MLP_ACT) @ p["w_down"]
        x = x + _dropout(mlp_out, dropout_rate, dropout_keys_B, 2 * i + 1)
        x = constrain(x, (ax.BATCH, ax.SEQ, ax.EMBED))
        return x, ((k, v) if cache is not None else None)

    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    if hidden_layer is None:
        x, new_kv = jax.lax.scan(layer_fn, x, (params["layers"], layer_ids))
    else:
        if not return_hidden or not 1 <= hidden_layer <= cfg.num_layers:
            raise ValueError(f"hidden_layer needs return_hidden and must be in [1, {cfg.num_layers}], "
                             f"got {hidden_layer}")

        def keep_layer_fn(carry, xs):
            x, kept = carry
            x, kv = layer_fn(x, xs)
            return (x, jnp.where(xs[1] == hidden_layer - 1, x, kept)), kv

        (x, kept), new_kv = jax.lax.scan(keep_layer_fn, (x, jnp.zeros_like(x)), (params["layers"], layer_ids))
    new_cache = None
    if cache is not None:
        slots = slot_indices(meta.page_table, positions_BxT, cache.page_size)
        new_cache = write_cache(cache, new_kv[0], new_kv[1], slots)
    x = layers.rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    if logits_index_B is not None:
        x = jnp.take_along_axis(x, logits_index_B[:, None, None], axis=1)
    logits = lm_head(params, x, cfg)
    if hidden_layer is not None:
        if logits_index_B is not None:
            kept = jnp.take_along_axis(kept, logits_index_B[:, None, None], axis=1)
        return logits, new_cache, kept
    if return_hidden:
        return logits, new_cache, x
    return logits, new_cache


def lm_head(params: Params, x_BxTxD: jax.Array, cfg: ModelConfig) -> jax.Array:
    if cfg.tie_word_embeddings:
        logits = jnp.einsum("BTD,VD->BTV", x_BxTxD, params["embed"], preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("BTD,DV->BTV", x_BxTxD, params["lm_head"], preferred_element_type=jnp.float32)
    return constrain(logits, (ax.BATCH, ax.SEQ, ax.VOCAB))


def abstract_params(cfg: ModelConfig) -> Params:
    dt = jnp.dtype(cfg.dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dt), param_shapes(cfg),
                        is_leaf=lambda s: isinstance(s, tuple))


def count_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


ForwardFn = Callable[..., Any]
