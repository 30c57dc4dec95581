"""The engine's plain (no sharing) decode attention: split-KV paged decode.

Each request's cached KV is read through its own page table, cut into splits of pages
(FlashDecoding): one (output, log-sum-exp) partial per split, merged by LSE with the partial of
the step's own token (the decoder writes new K/V into the cache after all layers). This is the
kernel package's split-KV path, the very code a shared-prefix step runs for whatever it does not
share: the plain step is a `SharedPrefixStep` with no shared work items, and the attention is the
shared-prefix engine's own (`shared_decode`). So the engine with and without sharing differs only
in the sharing, and a user who turns sharing off still gets the fast paged path (XLA on CPU, the
Pallas kernel on GPU), not the decoder's gather-everything reference attention.

The plain step is a pure function of the page table and the lengths, so it is built inside the
jitted decode step: no host plan, nothing extra to pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsys.models import decoder
from jaxsys.models.config import ModelConfig
from jaxsys.pallas_kernels.shared_prefix_attention import SharedPrefixStep
from jaxsys.serve.engine.shared_decode import make_shared_decode


def split_kv_step(page_table_BxP: jax.Array, kv_lens_B: jax.Array, page_size: int) -> SharedPrefixStep:
    """The no-sharing step of a decode batch: every request reads its cached KV (all of its
    `kv_lens - 1` tokens but the step's own) through its own page table; no shared items."""
    B, P = page_table_BxP.shape
    cached_B = jnp.maximum(kv_lens_B - 1, 0)
    page_lens_BxP = jnp.clip(cached_B[:, None] - page_size * jnp.arange(P, dtype=jnp.int32)[None, :],
                             0, page_size).astype(jnp.int32)
    no_items = jnp.zeros((0, 1), jnp.int32)
    return SharedPrefixStep(item_pages=no_items, item_page_lens=no_items, item_queries=no_items,
                            private_pages=page_table_BxP.astype(jnp.int32), private_page_lens=page_lens_BxP,
                            merge_rows=jnp.zeros((B, 0), jnp.int32))


def make_plain_decode(cfg: ModelConfig, engine_config) -> decoder.AttentionFn:
    """Decode attention for `decoder.forward` that runs split-KV paged decode, never sharing."""
    shared_attention, _ = make_shared_decode(cfg, engine_config)

    def attention(q_BxTxHxD, k_new_BxTxKxD, v_new_BxTxKxD, cache, layer, positions_BxT, meta, cfg_):
        step = split_kv_step(meta.page_table, meta.kv_lens, cache.page_size)
        return shared_attention(q_BxTxHxD, k_new_BxTxKxD, v_new_BxTxKxD, cache, layer, positions_BxT,
                                meta._replace(shared=step), cfg_)

    return attention
