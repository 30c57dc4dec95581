"""The engine's plain (no sharing) decode attention: split-KV paged decode over each request's page
table, merged with the step's own token, equals the decoder's reference paged attention (fp32,
1e-5), on every layer of the flat cache, with GQA, padding rows and ragged lengths. (The engines
of tests/test_serve_scheduler.py without sharing run it end to end against the causal forward.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.models import decoder
from jaxsys.models.kv_cache import AttentionMetadata, KVCache
from jaxsys.serve.engine.engine import EngineConfig
from jaxsys.serve.engine.plain_decode import make_plain_decode, split_kv_step

from serve_helpers import tiny_config

ATOL = 1e-5


def _case(seed: int, kv_lens: list[int], page_size: int, pages_per_row: int, **cfg_kw):
    """Random cache and queries; row i owns distinct random pages; kv_lens 0 is a padding row."""
    cfg = tiny_config(**cfg_kw)
    num_pages = 4 + len(kv_lens) * pages_per_row
    rng = np.random.default_rng(seed)
    shape = (cfg.num_kv_heads, cfg.num_layers, num_pages, page_size, cfg.head_dim)
    cache = KVCache(jnp.asarray(rng.normal(size=shape), jnp.float32), jnp.asarray(rng.normal(size=shape), jnp.float32))
    B = len(kv_lens)
    pages = rng.permutation(np.arange(1, num_pages))[:B * pages_per_row].reshape(B, pages_per_row)
    table = np.zeros((B, pages_per_row), np.int32)
    for i, n in enumerate(kv_lens):
        used = -(-n // page_size)
        table[i, :used] = pages[i, :used]
    kv = np.asarray(kv_lens, np.int32)
    positions = np.where(kv > 0, kv - 1, -1)[:, None].astype(np.int32)
    q = jnp.asarray(rng.normal(size=(B, 1, cfg.num_heads, cfg.head_dim)), jnp.float32)
    k_new = jnp.asarray(rng.normal(size=(B, 1, cfg.num_kv_heads, cfg.head_dim)), jnp.float32)
    v_new = jnp.asarray(rng.normal(size=(B, 1, cfg.num_kv_heads, cfg.head_dim)), jnp.float32)
    meta = AttentionMetadata(jnp.asarray(table), jnp.asarray(kv))
    return cfg, cache, (q, k_new, v_new), jnp.asarray(positions), meta


@pytest.mark.parametrize("kv_lens,page_size,pages_per_row,cfg_kw", [
    ([11, 6, 1, 0], 4, 4, {}),  # ragged, a one-token row (nothing cached), a padding row
    ([37, 64, 3], 4, 16, {}),  # several splits per row
    ([20, 9], 8, 4, dict(num_heads=8, num_kv_heads=2)),  # 4 query heads per KV head
])
def test_plain_decode_equals_the_decoder_reference(kv_lens, page_size, pages_per_row, cfg_kw):
    cfg, cache, (q, k_new, v_new), positions, meta = _case(0, kv_lens, page_size, pages_per_row, **cfg_kw)
    config = EngineConfig(page_size=page_size, num_pages=cache.num_pages, prefill_chunk=4 * page_size)
    attention = jax.jit(make_plain_decode(cfg, config), static_argnums=(4, 7))
    reference = jax.jit(decoder.paged_attention, static_argnums=(4, 7))
    for layer in range(cfg.num_layers):
        ours = np.asarray(attention(q, k_new, v_new, cache, layer, positions, meta, cfg))
        want = np.asarray(reference(q, k_new, v_new, cache, layer, positions, meta, cfg))
        real = np.asarray(meta.kv_lens) > 0  # a padding row's output is never read
        np.testing.assert_allclose(ours[real], want[real], atol=ATOL, rtol=0)


def test_split_kv_step_reads_the_cached_tokens_only():
    """The step's own token (the last of kv_lens) is not in the cache yet: it is merged apart."""
    table = jnp.asarray([[3, 4, 5, 0], [6, 0, 0, 0], [0, 0, 0, 0]], jnp.int32)
    step = split_kv_step(table, jnp.asarray([10, 1, 0], jnp.int32), page_size=4)
    np.testing.assert_array_equal(step.private_page_lens, [[4, 4, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(step.private_pages, table)
    assert step.item_pages.shape[0] == 0 and step.merge_rows.shape == (3, 0)

