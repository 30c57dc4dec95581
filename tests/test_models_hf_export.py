"""`jaxsys.models.hf_export` is the inverse of the HF loader, checked both ways round and against
transformers: ours -> folder -> `load_model` gives back the same config, bit-identical parameters
and the same tokenizer; an HF folder written by transformers -> `load_model` -> `hf_tensors` gives
back exactly the file's tensors; and transformers reads our export to the same logits (fp32 1e-4)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from helpers import hf_model, our_logits, random_ids, smollm2_metadata, torch_threads

import jaxsys
from jaxsys.models import decoder
from jaxsys.models.config import ModelConfig, RopeScaling
from jaxsys.models.hf_export import hf_config, hf_tensors, save_hf_folder
from jaxsys.models.tokenizer import Tokenizer

MODEL_ATOL = 1e-4  # fp32, whole model (fixed; never loosen)
TINY = dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            max_position_embeddings=512)
VARIANTS = {
    "llama-untied": dict(model_type="llama"),
    "qwen2-tied-bias": dict(model_type="qwen2", tie_word_embeddings=True, attention_bias=True),
    "llama3-rope": dict(model_type="llama", rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                                                                     high_freq_factor=4.0,
                                                                     original_max_position_embeddings=64)),
    "mistral-window": dict(model_type="mistral", sliding_window=4),
}
CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps",
                 "tie_word_embeddings", "attention_bias", "sliding_window", "model_type", "bos_token_id")


def unit_params(cfg: ModelConfig, seed: int):
    """Matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms around 1, non-zero biases (host float32):
    logits are O(1) and a swapped, transposed or dropped tensor shows."""
    params = decoder.init_params(cfg, jax.random.key(seed), std=1.0)
    rng = np.random.default_rng(seed)
    D, F = cfg.hidden_size, cfg.intermediate_size
    fan_in = {"wq": D, "wk": D, "wv": D, "wo": cfg.num_heads * cfg.head_dim, "w_gate": D, "w_up": D, "w_down": F,
              "lm_head": D, "embed": 1}

    def redraw(path, x):
        name = path[-1].key
        if "norm" in name:
            return (1.0 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
        if name in ("bq", "bk", "bv"):
            return (0.5 * rng.standard_normal(x.shape)).astype(np.float32)
        return np.asarray(x, np.float32) / np.float32(np.sqrt(fan_in[name]))

    return jax.tree_util.tree_map_with_path(redraw, params)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_loads_back_exactly(tmp_path, variant):
    tok = Tokenizer.from_gguf_metadata(smollm2_metadata())
    cfg = ModelConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_ids=tok.eos_token_ids,
                      **TINY, **VARIANTS[variant])
    params = unit_params(cfg, seed=1)
    folder = save_hf_folder(tmp_path / "m", params, cfg, tok)
    loaded = jaxsys.load_model(folder)
    for field in CONFIG_FIELDS:
        assert getattr(loaded.config, field) == getattr(cfg, field), field
    assert loaded.config.eos_token_ids == cfg.eos_token_ids
    assert jax.tree.structure(loaded.params) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    chat = [{"role": "system", "content": "You are one of several agents."}, {"role": "user", "content": "Who wrote Emma?"}]
    assert loaded.tokenizer.encode_chat(chat) == tok.encode_chat(chat)
    assert loaded.tokenizer.eos_token_ids == tok.eos_token_ids and loaded.tokenizer.bos_token_id == tok.bos_token_id


def test_export_refuses_what_it_cannot_write(tmp_path):
    cfg = ModelConfig(vocab_size=64, **TINY)
    params = unit_params(cfg, seed=0)
    folder = save_hf_folder(tmp_path / "m", params, cfg)  # no tokenizer: weights and config only
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(FileExistsError):
        save_hf_folder(folder, params, cfg)
    with pytest.raises(ValueError, match="dense"):
        hf_config(cfg.replace(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32))
    with pytest.raises(ValueError, match="dense"):
        save_hf_folder(tmp_path / "moe", params, cfg.replace(num_experts=4, num_experts_per_tok=2,
                                                             moe_intermediate_size=32))
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_transformers_folder_exports_back_to_its_own_tensors(tmp_path, kind):
    from safetensors.numpy import load_file

    model = hf_model(kind, seed=3)
    model.save_pretrained(tmp_path)
    loaded = jaxsys.load_model(tmp_path)
    written = load_file(str(tmp_path / "model.safetensors"))
    exported = hf_tensors(loaded.params, loaded.config)
    assert sorted(exported) == sorted(written)
    for name, w in written.items():
        np.testing.assert_array_equal(exported[name], w, err_msg=name)


@pytest.mark.parametrize("variant", ["llama-untied", "qwen2-tied-bias", "llama3-rope"])
def test_transformers_reads_the_export(tmp_path, variant):
    import torch
    import transformers as tf

    cfg = ModelConfig(vocab_size=96, **TINY, **VARIANTS[variant])
    params = unit_params(cfg, seed=2)
    save_hf_folder(tmp_path / "m", params, cfg)
    ids = random_ids((2, 12), seed=4)
    with torch_threads(1):
        model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32,
                                                        attn_implementation="eager").eval()
        with torch.no_grad():
            ref = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = our_logits(params, cfg, ids)
    err = float(np.max(np.abs(ours - ref)))
    assert err <= MODEL_ATOL, f"{variant}: max |ours - HF| = {err:.3g} (|HF| max {np.max(np.abs(ref)):.3g})"
