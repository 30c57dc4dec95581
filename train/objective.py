"""The training objective shared by every step function: next-token cross-entropy (summed, so the
caller divides by the global token count), per-example dropout keys, mixed precision.

Dropout keys are per example: `fold_in(fold_in(root, step), global_example_index)`. The decoder
derives each example's mask from its own key only (`jaxsys.models.decoder._dropout`), so a mask
does not depend on how the batch is split over devices.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxsys.models import decoder
from jaxsys.models.config import ModelConfig


def example_keys(root: jax.Array, step: jax.Array, example_ids: jax.Array) -> jax.Array:
    """Typed PRNG keys [...] for global example indices [...] at `step` (same on any layout)."""
    step_key = jax.random.fold_in(root, step)
    flat = example_ids.reshape(-1)
    keys = jax.vmap(lambda e: jax.random.fold_in(step_key, e))(flat)
    return keys.reshape(example_ids.shape)


def cast_params(params: Any, cfg: ModelConfig) -> Any:
    dt = jnp.dtype(cfg.dtype)
    return jax.tree.map(lambda x: x if x.dtype == dt else x.astype(dt), params)


def input_ids(tokens: jax.Array) -> jax.Array:
    """The token ids the model reads from a token array whose entries may be masked.

    A negative entry -(t+1) is token t carrying no loss: the model reads t but is not trained to
    predict it. That is how supervised fine-tuning masks a prompt (train on the completion only)
    in the same [B, T+1] array the GSPMD and elastic steps take; -1, padding, reads as token 0."""
    return jnp.where(tokens < 0, -tokens - 1, tokens)


def lm_loss_sum(params_f32: Any, tokens_BxT1: jax.Array, keys_B: jax.Array | None, *,
                cfg: ModelConfig, dropout: float) -> jax.Array:
    """Sum over the batch of next-token NLL (float32). tokens_BxT1: [B, T+1] int32; targets < 0
    are ignored (padding, or masked tokens: see `input_ids`). Parameters are float32 masters, cast
    to `cfg.dtype` for compute."""
    inputs_BxT = tokens_BxT1[:, :-1]
    targets_BxT = tokens_BxT1[:, 1:]
    params = cast_params(params_f32, cfg)
    logits_BxTxV, _ = decoder.forward(
        params, input_ids(inputs_BxT), cfg=cfg, dropout_rate=dropout,
        dropout_keys_B=keys_B if dropout > 0 else None)
    lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    tgt_BxT = jnp.take_along_axis(logits_BxTxV, jnp.maximum(targets_BxT, 0)[:, :, None], axis=-1)[:, :, 0]
    nll_BxT = jnp.where(targets_BxT >= 0, lse_BxT - tgt_BxT, 0.0)
    return jnp.sum(nll_BxT)
