"""`return_lse` of the shared-prefix attention paths, and the engine's merge of the step's own token
(serve/engine/shared_decode.py) against attention over the cache plus that token."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.pallas_kernels.shared_prefix_attention import shared_prefix_attention, shared_prefix_attention_xla
from jaxsys.serve.engine.shared_decode import merge_self_token
from shared_prefix_cases import INTERPRET, block_sizes, plan, setup

CASES = ("fan4_gqa4", "deep3_fan2_gqa8", "internal_requests_padded", "chain_no_sharing")


def _reference_lse(tree, q, k, v):
    """float64 log-sum-exp and output over each request's path (the padding rows: -inf, 0)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, hq, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    lse = np.full((b, hq), -np.inf)
    out = np.zeros((b, hq, d))
    for r in range(tree.num_requests):
        keys, vals = [], []
        for n in tree.path(r):
            for p, fill in zip(tree.node_pages[n], tree.node_page_lens(n)):
                keys.append(k[:, p, :fill])
                vals.append(v[:, p, :fill])
        if not keys:
            continue
        kk, vv = np.concatenate(keys, axis=1), np.concatenate(vals, axis=1)  # [Hkv, T, D]
        for h in range(hq):
            s = kk[h // g] @ q[r, h] / math.sqrt(d)
            m = s.max()
            lse[r, h] = m + math.log(np.exp(s - m).sum())
            out[r, h] = np.exp(s - lse[r, h]) @ vv[h // g]
    return lse, out


@pytest.mark.parametrize("path", ["xla", "kernel"])
@pytest.mark.parametrize("name", CASES)
def test_return_lse_matches_reference(name, path):
    tree, q, k, v = setup(name, jnp.float32)
    bs = block_sizes(tree.page_size)
    p, q = plan(tree, q, "share", bs)
    if path == "xla":
        out, lse = shared_prefix_attention_xla(q, k, v, p.step, block_sizes=bs, return_lse=True)
        plain = shared_prefix_attention_xla(q, k, v, p.step, block_sizes=bs)
    else:
        out, lse = shared_prefix_attention(q, k, v, p.step, block_sizes=bs, interpret=INTERPRET,
                                           return_lse=True)
        plain = shared_prefix_attention(q, k, v, p.step, block_sizes=bs, interpret=INTERPRET)
    ref_lse, ref_out = _reference_lse(tree, q, k, v)
    assert lse.shape == q.shape[:2] and lse.dtype == jnp.float32
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))  # the flag changes nothing else


def test_merge_self_token_equals_attention_over_cache_and_token():
    tree, q, k, v = setup("deep3_fan2_gqa8", jnp.float32)
    bs = block_sizes(tree.page_size)
    p, q = plan(tree, q, "share", bs)
    rng = np.random.default_rng(3)
    b, hq, d = q.shape
    hkv = k.shape[0]
    k_self = rng.standard_normal((b, hkv, d)).astype(np.float32)
    v_self = rng.standard_normal((b, hkv, d)).astype(np.float32)
    o, lse = shared_prefix_attention_xla(q, k, v, p.step, block_sizes=bs, return_lse=True)
    merged = np.asarray(merge_self_token(o, lse, q, jnp.asarray(k_self), jnp.asarray(v_self), 1 / math.sqrt(d)))
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    g = hq // hkv
    for r in range(b):
        keys, vals = [], []
        if r < tree.num_requests:
            for n in tree.path(r):
                for p, fill in zip(tree.node_pages[n], tree.node_page_lens(n)):
                    keys.append(kn[:, p, :fill])
                    vals.append(vn[:, p, :fill])
        keys.append(k_self[r][:, None, :].astype(np.float64))
        vals.append(v_self[r][:, None, :].astype(np.float64))
        kk, vv = np.concatenate(keys, axis=1), np.concatenate(vals, axis=1)
        for h in range(hq):
            s = kk[h // g] @ qn[r, h] / math.sqrt(d)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(merged[r, h], (p / p.sum()) @ vv[h // g], atol=1e-5, rtol=1e-5)
