"""Verification attention over a KV cache in host memory: chunked, merged by log-sum-exp.

A verify step scores gamma + 1 query positions per request against that request's whole context.
SpecMoEOff keeps the long KV cache in host memory and runs this attention on the CPU while the
accelerator runs the experts; the accelerator's memory then holds experts instead of KV pages.

`chunked_paged_attention` is a drop-in `decoder.AttentionFn`: it reads the same paged layout
(`jaxsys.models.kv_cache`), so it runs wherever the cache lives (the CPU device for host
attention). It walks each request's pages `chunk_pages` at a time with `lax.scan`, so the working
set is one chunk, never the whole context; each chunk gives a normalized partial output and its
log-sum-exp, and partials merge exactly:

    lse = logaddexp(lse_a, lse_b),   o = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse)

The step's own new tokens are the last chunk (causal among themselves).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsys.models import layers
from jaxsys.models.config import ModelConfig
from jaxsys.models.decoder import cached_prefix_lens
from jaxsys.models.kv_cache import AttentionMetadata, KVCache, flat_pages


def _partial(q_BxKxGxTxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS):
    """One chunk: (normalized output [B, K, G, T, D] float32, lse [B, K, G, T])."""
    s = jnp.einsum("BKGTD,BSKD->BKGTS", q_BxKxGxTxD, k_BxSxKxD, preferred_element_type=jnp.float32)
    s = jnp.where(mask_BxTxS[:, None, None], s, layers.NEG_INF)
    m = jnp.max(s, axis=-1)
    e = jnp.exp(s - m[..., None])
    denom = jnp.sum(e, axis=-1)
    o = jnp.einsum("BKGTS,BSKD->BKGTD", e, v_BxSxKxD.astype(jnp.float32)) / denom[..., None]
    return o, m + jnp.log(denom)


def merge_partials(o_a, lse_a, o_b, lse_b):
    """Exact merge of two attention partials over disjoint key sets."""
    lse = jnp.logaddexp(lse_a, lse_b)
    return o_a * jnp.exp(lse_a - lse)[..., None] + o_b * jnp.exp(lse_b - lse)[..., None], lse


def chunked_paged_attention(q_BxTxHqxDh: jax.Array, k_new_BxTxKxDh: jax.Array, v_new_BxTxKxDh: jax.Array,
                            cache: KVCache, layer: jax.Array, positions_BxT: jax.Array, meta: AttentionMetadata,
                            cfg: ModelConfig, *, chunk_pages: int = 8) -> jax.Array:
    """Attention of T new queries per request over its cached pages plus the new tokens: [B, T, Hq, Dh].

    Same contract as `decoder.paged_attention` (the cache holds the context before this step;
    `meta.kv_lens` counts the new tokens too). chunk_pages: pages per chunk (static).
    """
    B, T, Hq, Dh = q_BxTxHqxDh.shape
    K, G, ps = cfg.num_kv_heads, cfg.q_per_kv, cache.page_size
    P = meta.page_table.shape[1]
    n_chunks = -(-P // chunk_pages)
    table = jnp.pad(meta.page_table, ((0, 0), (0, n_chunks * chunk_pages - P)))  # scratch page 0, masked
    table_CxBxP = jnp.moveaxis(table.reshape(B, n_chunks, chunk_pages), 1, 0) + layer * cache.num_pages
    k_flat, v_flat = flat_pages(cache)
    q = jnp.moveaxis(q_BxTxHqxDh.reshape(B, T, K, G, Dh), 1, 3) * jnp.asarray(Dh ** -0.5, q_BxTxHqxDh.dtype)
    cached_B = cached_prefix_lens(positions_BxT, meta)
    S_c = chunk_pages * ps

    def chunk(carry, xs):
        o, lse = carry
        pages_BxP, c = xs
        k_c = jnp.moveaxis(k_flat[:, pages_BxP], 0, 3).reshape(B, S_c, K, Dh)
        v_c = jnp.moveaxis(v_flat[:, pages_BxP], 0, 3).reshape(B, S_c, K, Dh)
        k_pos = jnp.broadcast_to(c * S_c + jnp.arange(S_c, dtype=jnp.int32)[None, :], (B, S_c))
        mask = layers.causal_mask(positions_BxT, k_pos, k_pos < cached_B[:, None], cfg.sliding_window)
        return merge_partials(o, lse, *_partial(q, k_c, v_c, mask)), None

    mask_n = layers.causal_mask(positions_BxT, positions_BxT, positions_BxT >= 0, cfg.sliding_window)
    o_new, lse_new = _partial(q, k_new_BxTxKxDh.astype(k_flat.dtype), v_new_BxTxKxDh, mask_n)
    (o, _), _ = jax.lax.scan(chunk, (o_new, lse_new), (table_CxBxP, jnp.arange(n_chunks, dtype=jnp.int32)))
    return jnp.moveaxis(o, 3, 1).reshape(B, T, Hq, Dh).astype(q_BxTxHqxDh.dtype)
