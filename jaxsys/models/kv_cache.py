"""The paged KV cache shared by `jaxsys.generate` and the serving engine.

Layout (per model):  k, v: [num_kv_heads, num_layers, num_pages, page_size, head_dim]
A request owns a page table (a row of page ids); token position p of that request lives in page
`page_table[p // page_size]` at offset `p % page_size`. Page 0 is reserved as a scratch page: padding
tokens write there and nothing ever reads it, so static-shape batches never need a branch.

Heads lead, layers second: `flat_pages(cache)` views the whole cache, for free, as
`k_pages: [num_kv_heads, num_layers * num_pages, page_size, head_dim]` (the layout the
shared-prefix attention kernels take), where page p of layer l is page `l * num_pages + p`. So a
layer's attention addresses its pages by offsetting page ids, and never slices (copies) a layer out
of the cache inside the layer scan.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxsys.models.config import ModelConfig
from jaxsys.sharding import axes as ax

SCRATCH_PAGE = 0


class KVCache(NamedTuple):
    k: jax.Array  # [Hkv, L, N, page_size, Dh]
    v: jax.Array  # [Hkv, L, N, page_size, Dh]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]


CACHE_LOGICAL_AXES = (ax.KV_HEADS, ax.LAYERS, ax.CACHE_PAGES, ax.PAGE, ax.HEAD_DIM)


def flat_pages(cache: KVCache) -> tuple[jax.Array, jax.Array]:
    """(k, v) as [Hkv, L * N, page_size, Dh]: page p of layer l is page l * N + p."""
    K, L, N, PS, Dh = cache.k.shape
    return cache.k.reshape(K, L * N, PS, Dh), cache.v.reshape(K, L * N, PS, Dh)


class AttentionMetadata(NamedTuple):
    """Where each request's context lives. Built on the host, padded to static buckets."""

    page_table: jax.Array  # [B, max_pages_per_request] int32
    kv_lens: jax.Array  # [B] int32, context length after this step's tokens are written
    # optional attention-specific step description (e.g. the shared-prefix decode plan); a pytree
    shared: Any = None


def init_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype=None) -> KVCache:
    shape = (cfg.num_kv_heads, cfg.num_layers, num_pages, page_size, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.dtype)
    return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt))


def cache_bytes(cfg: ModelConfig, num_pages: int, page_size: int, dtype=None) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * num_pages * page_size * cfg.head_dim * jnp.dtype(
        dtype or cfg.dtype).itemsize


def slot_indices(page_table_BxP: jax.Array, positions_BxT: jax.Array, page_size: int) -> jax.Array:
    """Flat slot (page * page_size + offset) of each token; negative positions (padding) -> scratch."""
    pos = jnp.maximum(positions_BxT, 0)
    page_BxT = jnp.take_along_axis(page_table_BxP, pos // page_size, axis=1)
    slot_BxT = page_BxT * page_size + pos % page_size
    return jnp.where(positions_BxT >= 0, slot_BxT, SCRATCH_PAGE * page_size)
