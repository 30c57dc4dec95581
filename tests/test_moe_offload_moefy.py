"""MoEfication on a tiny random dense model (never the real one in a test): balanced clusters, the
split covers every neuron once, and the built qwen2_moe model computes the MoEfied FFN: with every
expert picked it equals the dense model at the fp32 model tolerance, and with top-k < E it equals
the sum of the k experts the router picks plus the shared expert. Routing statistics on a trace
whose answers are known by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.models import decoder, layers
from jaxsys.models.config import ModelConfig
from jaxsys.serve.moe_offload import moefy
from jaxsys.serve.moe_offload import routing_stats as rs

DENSE = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8)


def _dense():
    params = decoder.init_params(DENSE, jax.random.key(0), std=0.3)
    toks = np.random.default_rng(0).integers(0, 40, (3, 12)).astype(np.int32)
    valid = np.ones((3, 12), bool)
    valid[2, 8:] = False
    return params, toks, valid


def test_balanced_kmeans_makes_equal_clusters():
    X = np.random.default_rng(1).normal(size=(24, 5))
    a = moefy.balanced_kmeans(X, 4, iters=5, seed=0)
    assert sorted(np.bincount(a, minlength=4)) == [6, 6, 6, 6]
    with pytest.raises(ValueError, match="equal"):
        moefy.balanced_kmeans(X[:23], 4, iters=1, seed=0)


@pytest.mark.parametrize("num_experts,top_k", [(3, 3), (4, 2)])
def test_moefied_model_computes_the_split_ffn(num_experts, top_k):
    params, toks, valid = _dense()
    mc = moefy.MoEfyConfig(num_experts=num_experts, top_k=top_k, shared_fraction=0.25, kmeans_iters=3,
                           router_steps=20)
    moe, cfg, rec = moefy.moefy(params, DENSE, toks, valid, mc, log=lambda s: None)
    assert cfg.model_type == "qwen2_moe" and cfg.num_experts == num_experts and cfg.num_experts_per_tok == top_k
    assert cfg.shared_expert_intermediate_size + num_experts * cfg.moe_intermediate_size == DENSE.intermediate_size
    assert rec["router_loss_last"] < rec["router_loss_first"]
    ids = jnp.asarray(toks)
    ours = np.asarray(decoder.forward(moe, ids, cfg=cfg)[0])
    if top_k == num_experts:  # every expert picked: the dense FFN exactly (up to summation order)
        ref = np.asarray(decoder.forward(params, ids, cfg=DENSE)[0])
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
        return
    # top-k < E: the dense model with each token's FFN restricted to the shared neurons and the
    # neurons of the k experts its router ranks highest (the MoEfication semantics)
    lay = moe["layers"]
    x = params["embed"][ids]
    pos = jnp.broadcast_to(jnp.arange(12)[None], (3, 12))
    mask = layers.causal_mask(pos, pos, jnp.ones((3, 12), bool), None)
    for i in range(DENSE.num_layers):
        p = {k: v[i] for k, v in params["layers"].items()}
        h = layers.rms_norm(x, p["attn_norm"], DENSE.rms_norm_eps)
        q = layers.rope(jnp.einsum("BTD,DHK->BTHK", h, p["wq"]), pos, jnp.asarray(moefy.rope_inv_freq(DENSE)))
        k = layers.rope(jnp.einsum("BTD,DHK->BTHK", h, p["wk"]), pos, jnp.asarray(moefy.rope_inv_freq(DENSE)))
        v = jnp.einsum("BTD,DHK->BTHK", h, p["wv"])
        o = layers.attention_core(q.reshape(3, 12, 2, 2, 8), k, v, mask).reshape(3, 12, 4, 8)
        x = x + jnp.einsum("BTHK,HKD->BTD", o, p["wo"])
        h = layers.rms_norm(x, p["mlp_norm"], DENSE.rms_norm_eps)
        logits = jnp.einsum("BTD,DE->BTE", h, lay["router"][i])
        top = jax.lax.top_k(logits, top_k)[1]
        shared = jax.nn.silu(h @ lay["ws_gate"][i]) * (h @ lay["ws_up"][i]) @ (lay["ws_down"][i] / 2)
        routed = 0.0
        for e in range(num_experts):
            picked = jnp.any(top == e, axis=-1)[..., None]
            out_e = jax.nn.silu(h @ lay["we_gate"][i, e]) * (h @ lay["we_up"][i, e]) @ (lay["we_down"][i, e] / top_k)
            routed = routed + jnp.where(picked, out_e, 0.0)
        x = x + shared + routed
    x = layers.rms_norm(x, params["final_norm"], DENSE.rms_norm_eps)
    ref = np.asarray(decoder.lm_head(params, x, DENSE))
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)  # combine weights are 1/k up to O(tau)


def test_routing_statistics_by_hand():
    # 1 layer, 1 sequence of 4 tokens, top-2 of 4 experts
    top = np.array([[[[0, 1], [1, 2], [1, 2], [3, 0]]]])
    valid = np.ones((1, 4), bool)
    assert rs.consecutive_overlap(top, valid) == pytest.approx((1 / 2 + 1 + 0) / 3)
    skew = rs.usage_skew(top, valid, 4)
    assert skew["max_share_over_uniform_mean"] == pytest.approx(3 / 8 * 4)  # expert 1: 3 of 8 picks
    assert rs.unique_experts(top, valid, [1], [4], samples=3)["1,4"] == 4.0
    assert rs.unique_experts(top, valid, [1], [1], samples=50)["1,1"] == 2.0
    hits = rs.lru_hit_rate(top, valid, [2, 4])
    assert hits[2] == pytest.approx(3 / 8)  # hits: 1 at t1; 1, 2 at t2 (0 was evicted at t1)
    assert hits[4] == pytest.approx(4 / 8)  # + expert 0 at t3
