"""Building blocks shared by the decoder: RMSNorm, RoPE, attention, the SwiGLU feed-forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return jnp.expand_dims(weight, tuple(range(x.ndim - weight.ndim))) * (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rope(x_BxTxHxD: jax.Array, positions_BxT: jax.Array, inv_freq_K: jax.Array) -> jax.Array:
    """Rotary embedding, rotate-half convention (HF Llama); computed in float32."""
    freqs_BxTxK = positions_BxT.astype(jnp.float32)[:, :, None] * inv_freq_K[None, None, :]
    emb_BxTxD = jnp.concatenate([freqs_BxTxK, freqs_BxTxK], axis=-1)
    cos, sin = jnp.cos(emb_BxTxD)[:, :, None, :], jnp.sin(emb_BxTxD)[:, :, None, :]
    cos, sin = cos.astype(x_BxTxHxD.dtype), sin.astype(x_BxTxHxD.dtype)
    half = x_BxTxHxD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxHxD[..., half:], x_BxTxHxD[..., :half]], axis=-1)
    return x_BxTxHxD * cos + rotated * sin


def attention_core(q_BxTxKxGxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                   mask_BxTxS: jax.Array) -> jax.Array:
    """Softmax attention with grouped queries; logits and softmax in float32."""
    scale = q_BxTxKxGxD.shape[-1] ** -0.5
    logits = jnp.einsum("BTKGD,BSKD->BKGTS", q_BxTxKxGxD, k_BxSxKxD,
                        preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask_BxTxS[:, None, None, :, :], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxKxD.dtype)
    return jnp.einsum("BKGTS,BSKD->BTKGD", probs, v_BxSxKxD)


def causal_mask(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array, k_valid_BxS: jax.Array,
                sliding_window: int | None) -> jax.Array:
    qp, kp = q_pos_BxT[:, :, None], k_pos_BxS[:, None, :]
    mask = (kp <= qp) & k_valid_BxS[:, None, :]
    if sliding_window is not None:
        mask &= qp - kp < sliding_window
    return mask


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """x: [..., D]; w_gate/w_up: [D, F]; w_down: [F, D]."""
    h = jax.nn.silu(x @ w_gate) * (x @ w_up)
    return h @ w_down
