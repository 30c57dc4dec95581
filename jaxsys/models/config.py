"""Model configuration: one frozen dataclass covers Llama 2/3, Mistral, Qwen2, SmolLM2, Mixtral and
Qwen2-MoE. Built from an HF `config.json` dict or from GGUF metadata; validated on construction."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = {
    # HF `model_type` -> family
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "mixtral": "moe",
    "qwen2_moe": "moe",
}


class ConfigError(ValueError):
    """A model configuration that jaxsys cannot run (unsupported or inconsistent)."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 RoPE frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q, k, v
    sliding_window: int | None = None  # Mistral
    # Mixture of experts (num_experts == 0: dense feed-forward)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert (0: none)
    norm_topk_prob: bool = True  # Mixtral always renormalizes the top-k weights
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"  # parameter/compute dtype: float32 or bfloat16

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.is_moe:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(f"num_experts_per_tok must be in [1, {self.num_experts}], "
                                  f"got {self.num_experts_per_tok}")
            if self.moe_intermediate_size <= 0:
                raise ConfigError("an MoE model needs moe_intermediate_size > 0")
        elif self.intermediate_size <= 0:
            raise ConfigError("intermediate_size must be positive")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, l_ = self.hidden_size, self.intermediate_size, self.num_layers
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.is_moe:
            mlp = self.num_experts * 3 * d * self.moe_intermediate_size + d * self.num_experts
            mlp += 3 * d * self.shared_expert_intermediate_size + (d if self.shared_expert_intermediate_size else 0)
        else:
            mlp = 3 * d * f
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return l_ * (attn + mlp + 2 * d) + emb + d

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, dtype: str = "float32") -> "ModelConfig":
        """From an HF `config.json` dict (transformers 4.x and 5.x spellings)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture model_type={model_type!r} "
                f"(architectures={hf.get('architectures')}); supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
        scaling = None
        if rope_type == "llama3":
            src = {**legacy, **rope}
            scaling = RopeScaling(
                factor=float(src["factor"]),
                low_freq_factor=float(src["low_freq_factor"]),
                high_freq_factor=float(src["high_freq_factor"]),
                original_max_position_embeddings=int(src["original_max_position_embeddings"]))
        elif rope_type != "default":
            raise ConfigError(f"unsupported rope type {rope_type!r} (supported: default, llama3)")
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("partial rotary embeddings are not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported activation {hf.get('hidden_act')!r} (supported: silu)")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        sliding = None
        if model_type == "mistral":
            sliding = hf.get("sliding_window")
        elif model_type in ("qwen2", "qwen2_moe") and hf.get("use_sliding_window"):
            raise ConfigError("Qwen2 per-layer sliding-window attention is not supported")
        kw: dict[str, Any] = {}
        if model_type == "mixtral":
            kw = dict(num_experts=hf["num_local_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
                      moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True)
        elif model_type == "qwen2_moe":
            if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
                raise ConfigError("Qwen2-MoE with dense layers mixed in (mlp_only_layers / "
                                  "decoder_sparse_step != 1) is not supported: layers are scanned")
            kw = dict(num_experts=hf["num_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
                      moe_intermediate_size=hf["moe_intermediate_size"],
                      shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0),
                      norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf.get("intermediate_size", 0), num_layers=hf["num_hidden_layers"],
            num_heads=n_heads, num_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 4096), rope_theta=float(rope_theta),
            rope_scaling=scaling, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=model_type in ("qwen2", "qwen2_moe") or bool(hf.get("attention_bias", False)),
            sliding_window=sliding, model_type=model_type, bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids, dtype=dtype, **kw)

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], *, dtype: str = "float32") -> "ModelConfig":
        """From GGUF key/value metadata (llama.cpp conventions)."""
        arch = meta.get("general.architecture")
        if arch not in ("llama", "qwen2", "qwen2moe"):
            raise ConfigError(f"unsupported GGUF architecture {arch!r} (supported: llama, qwen2, qwen2moe)")

        def g(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        n_heads = int(g("attention.head_count"))
        d = int(g("embedding_length"))
        head_dim = int(g("attention.key_length", d // n_heads))
        vocab = int(g("vocab_size", 0)) or len(meta.get("tokenizer.ggml.tokens", []))
        scaling = None
        if g("rope.scaling.type") not in (None, "none"):
            raise ConfigError(f"unsupported GGUF rope scaling {g('rope.scaling.type')!r}")
        n_experts = int(g("expert_count", 0))
        kw: dict[str, Any] = {}
        if n_experts:
            kw = dict(num_experts=n_experts, num_experts_per_tok=int(g("expert_used_count")),
                      moe_intermediate_size=int(g("expert_feed_forward_length", g("feed_forward_length"))),
                      shared_expert_intermediate_size=int(g("expert_shared_feed_forward_length", 0)),
                      norm_topk_prob=arch == "llama")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        model_type = {"llama": "mixtral" if n_experts else "llama", "qwen2": "qwen2", "qwen2moe": "qwen2_moe"}[arch]
        return cls(
            vocab_size=vocab, hidden_size=d, intermediate_size=int(g("feed_forward_length", 0)),
            num_layers=int(g("block_count")), num_heads=n_heads,
            num_kv_heads=int(g("attention.head_count_kv", n_heads)), head_dim=head_dim,
            max_position_embeddings=int(g("context_length", 4096)),
            rope_theta=float(g("rope.freq_base", 10000.0)), rope_scaling=scaling,
            rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings=False,  # decided by the loader: no `output.weight` tensor -> tied
            attention_bias=arch in ("qwen2", "qwen2moe"), model_type=model_type,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(eos),) if eos is not None else (), dtype=dtype, **kw)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim // 2] in float32, as HF computes them (incl. llama3)."""
    dim = cfg.head_dim
    inv = (1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv
    old = s.original_max_position_embeddings
    low_wl, high_wl = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = (2 * math.pi / inv).astype(np.float32)
    scaled = np.where(wavelen > low_wl, inv / s.factor, inv).astype(np.float32)
    smooth = ((old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / s.factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, scaled).astype(np.float32)
