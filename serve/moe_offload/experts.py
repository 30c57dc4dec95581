"""Routed-expert math shared by the offloaded runner and the all-on-device baseline.

`route` is `decoder.moe_ffn`'s routing, op for op (so both pick the same experts). `routed_experts`
computes only a given set of U experts ("active" experts) for N tokens: it reads each active
expert's weights once and weights each token's output by its top-k combine weight (0 for experts
the token did not pick). With U <= min(E, N * k) this reads at most the experts the tokens need,
never all E as `moe_ffn` does; decode and verify steps (N = batch * (gamma + 1)) are memory-bound,
so the bytes read are what counts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxsys.models import layers
from jaxsys.models.config import ModelConfig


def route(h_NxD: jax.Array, router_DxE: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(top_i [N, k] int32 expert ids, top_v [N, k] float32 combine weights), as `decoder.moe_ffn`."""
    logits = jnp.einsum("ND,DE->NE", h_NxD, router_DxE, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_v, top_i = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        top_v = top_v / jnp.sum(top_v, axis=-1, keepdims=True)
    return top_i.astype(jnp.int32), top_v


def routed_experts(h_NxD: jax.Array, top_i_NxK: jax.Array, top_v_NxK: jax.Array, experts_U: jax.Array,
                   valid_U: jax.Array, gate_UxDxF: jax.Array, up_UxDxF: jax.Array, down_UxFxD: jax.Array
                   ) -> jax.Array:
    """sum over active experts u of combine[n, u] * expert_u(h_n): [N, D].

    experts_U: the expert id of each active slot; valid_U masks padding slots (a padded slot may
    repeat a real expert: it must not count twice).
    """
    hit_NxKxU = (top_i_NxK[:, :, None] == experts_U[None, None, :]) & valid_U[None, None, :]
    combine_NxU = jnp.sum(jnp.where(hit_NxKxU, top_v_NxK[:, :, None], 0.0), axis=1)
    gate = jnp.einsum("ND,UDF->NUF", h_NxD, gate_UxDxF)
    up = jnp.einsum("ND,UDF->NUF", h_NxD, up_UxDxF)
    y_NxUxD = jnp.einsum("NUF,UFD->NUD", jax.nn.silu(gate) * up, down_UxFxD)
    return jnp.einsum("NUD,NU->ND", y_NxUxD, combine_NxU.astype(y_NxUxD.dtype))


def shared_expert(h_NxD: jax.Array, p: dict[str, Any]) -> jax.Array:
    """Qwen2-MoE's gated shared expert (0 when the model has none)."""
    if "ws_gate" not in p:
        return jnp.zeros_like(h_NxD)
    out = layers.swiglu(h_NxD, p["ws_gate"], p["ws_up"], p["ws_down"])
    g_Nx1 = jax.nn.sigmoid(jnp.einsum("ND,D->N", h_NxD, p["ws_router"]))[:, None]
    return g_Nx1 * out


def sparse_moe_ffn(x_BxTxD: jax.Array, p: dict[str, Any], cfg: ModelConfig) -> jax.Array:
    """A `decoder.MoEFn` that computes only the experts some token picked (all weights on device).

    The active set is found inside jit with a static size min(E, B * T * k) (`jnp.unique` padded);
    this is the all-on-device baseline the offloaded runner is compared with.
    """
    B, T, D = x_BxTxD.shape
    h = x_BxTxD.reshape(B * T, D)
    top_i, top_v = route(h, p["router"], cfg)
    U = min(cfg.num_experts, B * T * cfg.num_experts_per_tok)
    experts = jnp.unique(top_i.reshape(-1), size=U, fill_value=-1)
    valid = experts >= 0
    idx = jnp.maximum(experts, 0)
    out = routed_experts(h, top_i, top_v, idx, valid, p["we_gate"][idx], p["we_up"][idx], p["we_down"][idx])
    return (out + shared_expert(h, p)).reshape(B, T, D)
