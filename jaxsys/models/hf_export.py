"""HF export: our parameter tree -> an HF model folder that `load_model` (and transformers) read back.

The inverse of `weights.load_hf_folder`, for the dense Llama-family architectures (llama, mistral,
qwen2): `load_model(save_hf_folder(folder, params, cfg, tokenizer))` gives back the same config
fields, bit-identical parameters and a tokenizer that encodes chats the same way. A fine-tuned
model (`jaxsys.train`) leaves the trainer this way, so `jaxsys serve --model FOLDER`, `jaxsys
generate` and transformers all load it.

Layouts (ours -> HF, the transposes `weights._hf_tensor` undoes):

    embed        [V, D]          model.embed_tokens.weight   [V, D]
    lm_head      [D, V]          lm_head.weight              [V, D]   (absent when tied)
    wq / wk / wv [L, D, N, Dh]   layers.i.self_attn.{q,k,v}_proj.weight  [N*Dh, D]
    bq / bk / bv [L, N, Dh]      layers.i.self_attn.{q,k,v}_proj.bias    [N*Dh]
    wo           [L, Hq, Dh, D]  layers.i.self_attn.o_proj.weight        [D, Hq*Dh]
    w_gate/w_up  [L, D, F]       layers.i.mlp.{gate,up}_proj.weight      [F, D]
    w_down       [L, F, D]       layers.i.mlp.down_proj.weight           [D, F]
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxsys.models.config import ModelConfig
from jaxsys.models.tokenizer import Tokenizer

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` of a dense Llama-family config (what `ModelConfig.from_hf` reads)."""
    if cfg.is_moe or cfg.model_type not in HF_ARCHITECTURES:
        raise ValueError(f"HF export covers dense {', '.join(HF_ARCHITECTURES)} models, not "
                         f"{cfg.model_type!r}{' with experts' if cfg.is_moe else ''}")
    hf = {"architectures": [HF_ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "max_position_embeddings": cfg.max_position_embeddings, "rope_theta": cfg.rope_theta,
          "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
          "attention_bias": cfg.attention_bias, "hidden_act": "silu", "bos_token_id": cfg.bos_token_id,
          "eos_token_id": list(cfg.eos_token_ids), "torch_dtype": "float32"}
    if cfg.rope_scaling is not None:
        hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    if cfg.sliding_window is not None:
        hf["sliding_window"] = cfg.sliding_window
    return hf


def _host(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32))


def hf_tensors(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensor names -> float32 host arrays in HF layouts (the module docstring's table)."""
    hf_config(cfg)  # the same architecture check
    D = cfg.hidden_size
    layers = params["layers"]
    out = {"model.embed_tokens.weight": _host(params["embed"]), "model.norm.weight": _host(params["final_norm"])}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = _host(np.asarray(params["lm_head"]).T)
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = _host(layers["attn_norm"][i])
        out[pre + "post_attention_layernorm.weight"] = _host(layers["mlp_norm"][i])
        for n in "qkv":
            w_DxNxH = np.asarray(layers[f"w{n}"][i])
            out[pre + f"self_attn.{n}_proj.weight"] = _host(w_DxNxH.reshape(D, -1).T)
            if cfg.attention_bias:
                out[pre + f"self_attn.{n}_proj.bias"] = _host(np.asarray(layers[f"b{n}"][i]).reshape(-1))
        wo_NxHxD = np.asarray(layers["wo"][i])
        out[pre + "self_attn.o_proj.weight"] = _host(wo_NxHxD.reshape(-1, D).T)
        for name, key in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
            out[pre + f"mlp.{name}.weight"] = _host(np.asarray(layers[key][i]).T)
    return out


def save_hf_folder(folder: str | os.PathLike, params: dict[str, Any], cfg: ModelConfig,
                   tokenizer: Tokenizer | None = None) -> Path:
    """Write a new HF model folder: config.json, model.safetensors (float32) and, with a tokenizer,
    tokenizer.json plus tokenizer_config.json (chat template, special tokens). `load_model(folder)`
    reads it back. Raises FileExistsError when `folder` exists (nothing is overwritten)."""
    from safetensors.numpy import save_file

    config = hf_config(cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=False)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_file(hf_tensors(params, cfg), str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": tokenizer.chat_template, "bos_token": tokenizer.bos_token,
             "eos_token": tokenizer.eos_token, "add_bos_token": tokenizer.add_bos}, indent=1))
    return folder
