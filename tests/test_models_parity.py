"""Parity with HF transformers on tiny random models (fp32: 1e-4 whole model, 1e-5 modules).

Every family the decoder claims (Llama, Llama 3 RoPE scaling, Mistral sliding window, Qwen2 qkv
bias, tied embeddings, Mixtral, Qwen2-MoE with and without `norm_topk_prob`) is built with
transformers, saved with `save_pretrained`, loaded with `load_hf_folder` and compared logit by
logit. The paged KV-cache path is checked against the no-cache forward, and bf16 against fp32.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import hf_config, hf_logits, hf_model, jit_forward, our_logits, random_ids, save_and_load, torch_threads
from jaxsys.models import layers, weights
from jaxsys.models.config import ModelConfig, RopeScaling, rope_inv_freq
from jaxsys.models.kv_cache import AttentionMetadata, KVCache, init_cache

MODEL_ATOL = 1e-4  # fp32, whole model (fixed; never loosen)
MODULE_ATOL = 1e-5  # fp32, single module (fixed; never loosen)

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)

CASES = {
    "llama": ("llama", {}),
    "mistral_window": ("mistral", {"sliding_window": 4}),
    "qwen2_bias": ("qwen2", {}),
    "smollm2_tied": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "mixtral_top2": ("mixtral", {}),
    "qwen2_moe_norm_topk": ("qwen2_moe", {"norm_topk_prob": True}),
    "qwen2_moe_no_norm_topk": ("qwen2_moe", {"norm_topk_prob": False}),
}


def _assert_close(ours, ref, atol, what=""):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.max(np.abs(ours - ref)))
    assert err <= atol, f"{what}: max |ours - HF| = {err:.3g} > {atol} (|HF| max {np.max(np.abs(ref)):.3g})"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


# ---------------------------------------------------------------------- whole-model parity

@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, tmp_path):
    kind, overrides = CASES[case]
    model = hf_model(kind, seed=1, **overrides)
    cfg, params = save_and_load(model, tmp_path)
    assert cfg.model_type == kind
    ids = random_ids((2, 12), seed=2)
    _assert_close(our_logits(params, cfg, ids), hf_logits(model, ids), MODEL_ATOL, case)


def test_config_flags_reach_the_model(tmp_path):
    """The families differ where the loader must notice: bias, tying, window, experts, top-k norm."""
    cfgs = {}
    for case, (kind, overrides) in CASES.items():
        folder = tmp_path / case
        hf_config(kind, **overrides).save_pretrained(folder)
        cfgs[case] = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    assert cfgs["qwen2_bias"].attention_bias and not cfgs["llama"].attention_bias
    assert cfgs["smollm2_tied"].tie_word_embeddings and not cfgs["llama"].tie_word_embeddings
    assert cfgs["mistral_window"].sliding_window == 4 and cfgs["llama"].sliding_window is None
    moe = cfgs["mixtral_top2"]
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (4, 2, 24)
    assert cfgs["qwen2_moe_norm_topk"].norm_topk_prob is True
    assert cfgs["qwen2_moe_no_norm_topk"].norm_topk_prob is False
    assert cfgs["qwen2_moe_norm_topk"].shared_expert_intermediate_size == 24


def test_mistral_sliding_window_matters(tmp_path):
    """With a window (4) much shorter than the sequence (16), logits must differ from full causal
    attention, and ours must follow HF's windowed ones."""
    windowed = hf_model("mistral", seed=3, sliding_window=4)
    full = hf_model("mistral", seed=3, sliding_window=None)
    ids = random_ids((1, 16), seed=4)
    ref_w, ref_full = hf_logits(windowed, ids), hf_logits(full, ids)
    assert np.max(np.abs(ref_w[:, 4:] - ref_full[:, 4:])) > 1e-2  # the window really cuts
    np.testing.assert_array_equal(ref_w[:, :4], ref_full[:, :4])  # and only beyond 4 tokens
    cfg, params = save_and_load(windowed, tmp_path)
    _assert_close(our_logits(params, cfg, ids), ref_w, MODEL_ATOL, "mistral window")


def test_qwen2_moe_norm_topk_prob_matters(tmp_path):
    a = hf_model("qwen2_moe", seed=5, norm_topk_prob=True)
    b = hf_model("qwen2_moe", seed=5, norm_topk_prob=False)
    ids = random_ids((1, 8), seed=6)
    ref_a, ref_b = hf_logits(a, ids), hf_logits(b, ids)
    assert np.max(np.abs(ref_a - ref_b)) > 1e-2
    cfg_b, params_b = save_and_load(b, tmp_path)
    _assert_close(our_logits(params_b, cfg_b, ids), ref_b, MODEL_ATOL, "qwen2_moe norm_topk_prob=False")


def test_llama3_rope_scaling(tmp_path):
    """Positions 90..129 cross original_max_position_embeddings (64); head_dim 8 with theta 1e4 puts
    the four frequencies in all three llama3 regimes (kept, smoothed, divided by factor)."""
    model = hf_model("llama", seed=7, rope_parameters=dict(LLAMA3_ROPE))
    cfg, params = save_and_load(model, tmp_path)
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
    inv_default = rope_inv_freq(cfg.replace(rope_scaling=None))
    inv = rope_inv_freq(cfg)
    assert inv[0] == inv_default[0]  # high frequency kept
    assert np.allclose(inv[2:], inv_default[2:] / 8.0)  # low frequencies divided by factor
    assert inv_default[1] / 8.0 < inv[1] < inv_default[1]  # smoothed in between
    ids = random_ids((2, 40), seed=8)
    pos = np.broadcast_to(np.arange(90, 130, dtype=np.int32), ids.shape)
    ref = hf_logits(model, ids, pos)
    _assert_close(our_logits(params, cfg, ids, pos), ref, MODEL_ATOL, "llama3 rope")
    # ...and the scaling is visible in the logits at these positions
    unscaled = our_logits(params, cfg.replace(rope_scaling=None), ids, pos)
    assert np.max(np.abs(unscaled - ref)) > 1e-2


def test_legacy_rope_scaling_key():
    """transformers 4.x wrote `rope_scaling` + `rope_theta`; 5.x writes `rope_parameters`."""
    new = hf_config("llama", rope_parameters=dict(LLAMA3_ROPE)).to_dict()
    legacy = {k: v for k, v in new.items() if k != "rope_parameters"}
    legacy["rope_theta"] = 10000.0
    legacy["rope_scaling"] = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert ModelConfig.from_hf(legacy) == ModelConfig.from_hf(new)
    assert ModelConfig.from_hf(legacy).rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)


def test_sharded_safetensors_index(tmp_path):
    model = hf_model("qwen2", seed=9)
    cfg, params = save_and_load(model, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    ids = random_ids((1, 10), seed=10)
    _assert_close(our_logits(params, cfg, ids), hf_logits(model, ids), MODEL_ATOL, "sharded index")


# ---------------------------------------------------------------------- modules (1e-5)

def test_rms_norm_matches_hf():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((2, 5, 32))).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(32)).astype(np.float32)
    ref_mod = LlamaRMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ref_mod.weight.copy_(torch.from_numpy(w))
        ref = ref_mod(torch.from_numpy(x)).numpy()
    ours = np.asarray(layers.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6))
    _assert_close(ours, ref, MODULE_ATOL, "rms_norm")


@pytest.mark.parametrize("scaled", [False, True])
def test_rope_matches_hf(scaled):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    kw = {"rope_parameters": dict(LLAMA3_ROPE)} if scaled else {}
    hf_cfg = hf_config("llama", **kw)
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    rng = np.random.default_rng(1)
    B, T, H, Dh = 2, 7, 4, 8
    q = rng.standard_normal((B, T, H, Dh)).astype(np.float32)
    k = rng.standard_normal((B, T, H, Dh)).astype(np.float32)
    pos = np.stack([np.arange(T), 100 + 37 * np.arange(T)]).astype(np.int64)  # near and far
    rot = LlamaRotaryEmbedding(hf_cfg)
    with torch.no_grad():
        cos, sin = rot(torch.from_numpy(q), torch.from_numpy(pos))
        # HF rotates [B, H, T, Dh]
        rq, rk = apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2),
                                      cos, sin)
    inv = jnp.asarray(rope_inv_freq(cfg))
    pos32 = jnp.asarray(pos, jnp.int32)
    for name, x, ref in (("q", q, rq), ("k", k, rk)):
        ours = np.asarray(layers.rope(jnp.asarray(x), pos32, inv))
        _assert_close(ours, ref.transpose(1, 2).numpy(), MODULE_ATOL, f"rope {name}")


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    dict(LLAMA3_ROPE),
    # Llama 3.1's real numbers on a 64-dim head
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
])
def test_rope_inv_freq_matches_hf(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    head_dim = 64 if rope["rope_theta"] == 500000.0 else 8
    hf_cfg = hf_config("llama", rope_parameters=rope, head_dim=head_dim)
    if rope["rope_type"] == "default":
        ref, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)
    ours = rope_inv_freq(ModelConfig.from_hf(hf_cfg.to_dict()))
    assert ours.dtype == np.float32 and ours.shape == (head_dim // 2,)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6, atol=MODULE_ATOL)


# ---------------------------------------------------------------------- paged KV cache

@pytest.fixture(scope="module")
def cache_models(tmp_path_factory):
    """(cfg, params) for a GQA Llama and a windowed Mistral (window 3 < page-crossing contexts)."""
    out = {}
    for name, kind, kw in (("llama", "llama", {}), ("mistral", "mistral", {"sliding_window": 3})):
        out[name] = save_and_load(hf_model(kind, seed=11, **kw), tmp_path_factory.mktemp(name))
    return out


def _causal_reference(params, cfg, seqs):
    """No-cache logits of each sequence, from one batched forward: each sequence is extended to the
    longest with real tokens (no padding mask involved); causality makes the prefix logits exact."""
    T = max(len(s) for s in seqs)
    filler = random_ids((T,), seed=99)
    batch = np.stack([np.concatenate([s, filler[len(s):]]) for s in seqs])
    full = our_logits(params, cfg, batch)
    return [full[i, :len(s)] for i, s in enumerate(seqs)]


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_paged_cache_prefill_then_decode_matches_full_forward(cache_models, name):
    """Batch of 3 prompts (lengths 5, 9, 2: right-padded, padding positions -1) prefilled into a
    paged cache with shuffled, non-contiguous page tables over finite garbage, then decoded one
    token at a time (request 2 drops out after 3 steps and becomes a padding row). Every step's
    logits equal the no-cache forward over that request's whole sequence."""
    cfg, params = cache_models[name]
    page_size, n_new = 4, 6
    lens = np.array([5, 9, 2], np.int32)
    B, T = len(lens), int(lens.max())
    pages_per_req = int(np.ceil((T + n_new) / page_size))
    rng = np.random.default_rng(12)
    seqs = [random_ids((int(n) + n_new,), seed=20 + i) for i, n in enumerate(lens)]
    ref = _causal_reference(params, cfg, seqs)

    num_pages = 1 + B * pages_per_req + 3  # scratch page 0, plus a few pages nobody owns
    page_table = (1 + rng.permutation(num_pages - 1)[:B * pages_per_req]).reshape(B, pages_per_req).astype(np.int32)
    assert not np.all(np.diff(page_table, axis=1) == 1)
    empty = init_cache(cfg, num_pages, page_size)
    cache = KVCache(*(jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in empty))

    fwd = jit_forward()
    tokens = np.zeros((B, T), np.int32)
    positions = np.full((B, T), -1, np.int32)
    for i, n in enumerate(lens):
        tokens[i, :n], positions[i, :n] = seqs[i][:n], np.arange(n)
    logits, cache = fwd(params, tokens, cfg=cfg, positions_BxT=positions, cache=cache,
                        meta=AttentionMetadata(page_table, lens))
    for i, n in enumerate(lens):
        _assert_close(np.asarray(logits[i, :n]), ref[i][:n], MODEL_ATOL, f"prefill request {i}")

    kv = lens.copy()
    for step in range(n_new):
        active = np.array([True, True, step < 3])
        tok = np.array([seqs[i][kv[i]] if active[i] else 0 for i in range(B)], np.int32)[:, None]
        pos = np.where(active, kv, -1).astype(np.int32)[:, None]
        kv = np.where(active, kv + 1, kv).astype(np.int32)
        logits, cache = fwd(params, tok, cfg=cfg, positions_BxT=pos, cache=cache,
                            meta=AttentionMetadata(page_table, kv))
        for i in np.flatnonzero(active):
            _assert_close(np.asarray(logits[i, 0]), ref[i][kv[i] - 1], MODEL_ATOL, f"decode step {step} request {i}")


def test_padded_batch_no_cache_matches_unpadded(cache_models):
    """Right padding marked by position -1 must not change the real tokens' logits."""
    cfg, params = cache_models["llama"]
    a, b = random_ids((7,), seed=30), random_ids((3,), seed=31)
    ref = _causal_reference(params, cfg, [a, b])
    tokens = np.zeros((2, 7), np.int32)
    positions = np.full((2, 7), -1, np.int32)
    tokens[0], positions[0] = a, np.arange(7)
    tokens[1, :3], positions[1, :3] = b, np.arange(3)
    tokens[1, 3:] = 5  # padding tokens: whatever they are, they must not be attended to
    batched = our_logits(params, cfg, tokens, positions)
    _assert_close(batched[0], ref[0], MODEL_ATOL, "row 0")
    _assert_close(batched[1, :3], ref[1], MODEL_ATOL, "row 1")



def test_chunked_prefill_then_decode_matches_full_forward(cache_models):
    """Prompts of 5 and 9 tokens prefilled in chunks of 3 (each chunk right-padded with position -1
    where a prompt has run out), the cache holding the earlier chunks, then 3 decode steps. Mistral's
    window (3) makes attention span cached and new tokens at every chunk boundary."""
    cfg, params = cache_models["mistral"]
    page_size, chunk, n_new = 4, 3, 3
    lens = np.array([5, 9], np.int32)
    seqs = [random_ids((int(n) + n_new,), seed=40 + i) for i, n in enumerate(lens)]
    ref = _causal_reference(params, cfg, seqs)
    page_table = np.array([[3, 1, 6], [2, 7, 5]], np.int32)
    cache = init_cache(cfg, 8, page_size)
    fwd = jit_forward()
    kv = np.zeros(2, np.int32)
    for start in range(0, int(lens.max()), chunk):
        tokens = np.zeros((2, chunk), np.int32)
        positions = np.full((2, chunk), -1, np.int32)
        for i, n in enumerate(lens):
            m = max(0, min(chunk, int(n) - start))
            tokens[i, :m], positions[i, :m] = seqs[i][start:start + m], np.arange(start, start + m)
        kv = kv + np.sum(positions >= 0, axis=1, dtype=np.int32)
        logits, cache = fwd(params, tokens, cfg=cfg, positions_BxT=positions, cache=cache,
                            meta=AttentionMetadata(page_table, kv))
        for i in range(2):
            for t in np.flatnonzero(positions[i] >= 0):
                _assert_close(np.asarray(logits[i, t]), ref[i][positions[i, t]], MODEL_ATOL,
                              f"chunk at {start}, request {i}, position {positions[i, t]}")
    for step in range(n_new):
        tok = np.array([[seqs[i][kv[i]]] for i in range(2)], np.int32)
        pos = kv[:, None].copy()
        kv = kv + 1
        logits, cache = fwd(params, tok, cfg=cfg, positions_BxT=pos, cache=cache,
                            meta=AttentionMetadata(page_table, kv))
        for i in range(2):
            _assert_close(np.asarray(logits[i, 0]), ref[i][kv[i] - 1], MODEL_ATOL, f"decode {step} request {i}")


def test_logits_index_selects_one_position(cache_models):
    """`logits_index_B` (prefill computes logits at each row's last prompt token only)."""
    cfg, params = cache_models["llama"]
    ids = random_ids((3, 8), seed=50)
    full = our_logits(params, cfg, ids)
    idx = np.array([7, 0, 4], np.int32)
    one, _ = jit_forward()(params, jnp.asarray(ids), cfg=cfg, logits_index_B=jnp.asarray(idx))
    assert one.shape == (3, 1, cfg.vocab_size)
    _assert_close(np.asarray(one[:, 0]), full[np.arange(3), idx], MODEL_ATOL, "logits_index_B")

# ---------------------------------------------------------------------- bf16

# bf16 keeps 8 significant bits: unit roundoff u = 2^-8 ~ 3.9e-3. We compare bf16 against fp32 run
# on the *same* bf16-rounded weights, so only activation rounding is measured. The 2-layer model
# rounds activations at ~20 sites along any path (embed, norms, q/k/v, rope, probs, attention out,
# residual adds, SwiGLU, logits input); independent roundings grow like sqrt(20) u ~ 4.5u. We allow
# 8u = 2^-5 ~ 3.1% relative RMS error on the logits (measured: ~0.7%), and require the same
# argmax on >= 90% of positions (flips only where the top two logits are within that error).
BF16_REL_RMS = 8 * 2.0**-8


@pytest.mark.parametrize("case", ["llama", "qwen2_bias"])
def test_bf16_forward_close_to_fp32(case, tmp_path):
    kind, overrides = CASES[case]
    model = hf_model(kind, seed=13, **overrides)
    model.save_pretrained(tmp_path)
    cfg16, np_params = weights.load_hf_folder(tmp_path, dtype="bfloat16")
    assert cfg16.dtype == "bfloat16"
    p16 = weights.to_device(np_params, cfg16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    cfg32 = cfg16.replace(dtype="float32")
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), p16)  # the same (bf16-exact) weights
    ids = random_ids((2, 16), seed=14)
    out16, out32 = our_logits(p16, cfg16, ids), our_logits(p32, cfg32, ids)
    assert out16.dtype == np.float32 and np.all(np.isfinite(out16))
    rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
    assert rel <= BF16_REL_RMS, f"bf16 relative RMS error {rel:.4f} > {BF16_REL_RMS:.4f}"
    assert rel > 0  # it really ran in bf16
    assert np.mean(out16.argmax(-1) == out32.argmax(-1)) >= 0.9
