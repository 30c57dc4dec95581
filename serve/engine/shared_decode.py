"""Shared-prefix decode attention inside the engine's decode step.

The scheduler groups the running requests by their radix-tree ancestors into a `PrefixTree` over
the KV already in the cache; `plan_step` (host, numpy, once per step for every layer) balances it
into a padded `SharedPrefixStep`. On the device, per layer, the kernel attends every request's
cached KV, reading each shared chunk once for all requests below it, and returns (output,
log-sum-exp); this step's own token (not yet in the cache: the decoder writes new K/V once, after
all layers) is one more partial, merged by LSE. CPU runs the XLA path, GPU the Pallas kernel at
`EngineConfig.attention_precision`. Both read the cache through its flat page view
(`kv_cache.flat_pages`) with page ids offset to the layer, so no layer is sliced (copied) out of
the cache. Tiles and cost model come from the kernel package's tables for this device, KV dtype,
precision and attention shape (`get_default`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxsys.models.config import ModelConfig
from jaxsys.models.kv_cache import flat_pages
from jaxsys.pallas_kernels.shared_prefix_attention import (SharedPrefixStep, get_default,
                                                          merge_partials, plan_step, shared_prefix_attention,
                                                          shared_prefix_attention_xla)


def merge_self_token(o_BxHxD: jax.Array, lse_BxH: jax.Array, q_BxHxD: jax.Array, k_self_BxKxD: jax.Array,
                     v_self_BxKxD: jax.Array, sm_scale: float) -> jax.Array:
    """LSE-merge a partial (o, lse) over the cache with the partial of the query's own token."""
    B, H, D = q_BxHxD.shape
    K = k_self_BxKxD.shape[1]
    q = q_BxHxD.astype(jnp.float32).reshape(B, K, H // K, D)
    s_self = (jnp.einsum("BKGD,BKD->BKG", q, k_self_BxKxD.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST) * sm_scale).reshape(B, H)
    v_self = jnp.repeat(v_self_BxKxD.astype(jnp.float32), H // K, axis=1)  # [B, H, D]
    # the own token is one more partial: its output is v_self, its log-sum-exp the one score
    o_2xBxHxD = jnp.stack([o_BxHxD.astype(jnp.float32), v_self])
    return merge_partials(o_2xBxHxD, jnp.stack([lse_BxH, s_self]), axis=0)


def offset_pages(step: SharedPrefixStep, offset: jax.Array) -> SharedPrefixStep:
    """The same step addressing another layer's pages in the flat [Hkv, L * N, ...] cache view."""
    return step._replace(item_pages=step.item_pages + offset, private_pages=step.private_pages + offset)


def make_shared_decode(cfg: ModelConfig, engine_config):
    """(attention function for `decoder.forward`, host builder: (PrefixTree, B) -> SharedPrefixStep)."""
    device = jax.devices()[0]
    precision = engine_config.attention_precision
    tuned = get_default(device.device_kind, cfg.dtype, precision, q_per_kv=cfg.q_per_kv, head_dim=cfg.head_dim,
                        page_size=engine_config.page_size)
    if device.platform == "gpu":
        attend = functools.partial(shared_prefix_attention, block_sizes=tuned.block_sizes, precision=precision,
                                   return_lse=True)
    else:
        attend = functools.partial(shared_prefix_attention_xla, block_sizes=tuned.block_sizes, return_lse=True)
    return attention_fn(attend), step_builder(tuned)


def attention_fn(attend):
    """Decode attention for `decoder.forward` (`decoder.AttentionFn`) over the step's
    `meta.shared`: `attend(q, k_pages, v_pages, step, sm_scale=)` -> (out, lse) is the kernel."""

    def attention(q_BxTxHxD, k_new_BxTxKxD, v_new_BxTxKxD, cache, layer, positions_BxT, meta, cfg):
        q = q_BxTxHxD[:, 0]
        scale = 1.0 / math.sqrt(cfg.head_dim)
        k_pages, v_pages = flat_pages(cache)  # [Hkv, L * N, ps, D]: this layer's pages are offset
        o, lse = attend(q, k_pages, v_pages, offset_pages(meta.shared, layer * cache.num_pages), sm_scale=scale)
        out = merge_self_token(o, lse, q, k_new_BxTxKxD[:, 0], v_new_BxTxKxD[:, 0], scale)
        return out[:, None].astype(q_BxTxHxD.dtype)

    return attention


def step_builder(tuned):
    """Host builder of each decode step: (PrefixTree, padded batch) -> SharedPrefixStep, planned
    with `tuned`'s tiles and cost model (`get_default`)."""

    def build(tree, padded_batch: int) -> SharedPrefixStep:
        return plan_step(tree, block_sizes=tuned.block_sizes, cost_model=tuned.cost_model,
                         min_requests=padded_batch).step

    return build
