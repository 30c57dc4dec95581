"""Serving an MoE model with its experts in host memory: the engine interface over `OffloadedMoE`.

The scheduler drives an engine through `prefill` and `decode` (and, speculating, the verify step).
`OffloadEngine` gives it those over the offloaded runner: each step is one `OffloadedMoE.forward`
(the host-driven layer loop that routes, fetches the missing experts and prefetches the next
layer's, see `runner`) over the engine's paged KV cache, then the sampler, compiled once per shape.
So continuous batching, chunked prefill and the radix prefix cache work unchanged, and a verify
step's gamma + 1 tokens per request share every expert fetched for them (SpecMoEOff's point).

Attention is the runner's on-device paged attention (no shared-prefix kernel), on one device.
Speculation verifies n-gram drafts (host proposals, one forward, `verify.accept_step`); the
early-exit and model drafts run inside the fused step of the all-on-device `Engine`.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.models.config import ModelConfig
from jaxsys.models.kv_cache import AttentionMetadata, init_cache
from jaxsys.sampling import sample
from jaxsys.serve.moe_offload.runner import OffloadConfig, OffloadedMoE
from jaxsys.serve.moe_offload.store import ExpertCacheError


def pick_and_sample(logits_BxTxV, index_B, temperature_B, top_k_B, top_p_B, seed_B, step_B):
    """`jaxsys.sampling.sample` at position `index_B` of each row."""
    logits_BxV = jnp.take_along_axis(logits_BxTxV, index_B[:, None, None], axis=1)[:, 0]
    return sample(logits_BxV, temperature_B, top_k_B, top_p_B, seed_B, step_B)


def default_expert_cache(cfg: ModelConfig) -> int:
    """Half of each layer's experts on the device, and at least the top-k one token needs."""
    return max(cfg.num_experts_per_tok, cfg.num_experts // 2)


class OffloadEngine:
    """`Engine`'s step interface with the routed experts in host memory (see the module docstring).

    config: the engine configuration (pages, batch limits, prefill chunk; `shared_attention` does
    not apply). expert_cache: device slots per layer (default `default_expert_cache`).
    """

    def __init__(self, cfg: ModelConfig, params: Any, config, *, expert_cache: int | None = None,
                 policy: str = "lru", prefetch: bool = True):
        if not cfg.is_moe:
            raise ExpertCacheError(f"expert offloading needs an MoE model; {cfg.model_type} is dense")
        self.cfg, self.config = cfg, config
        slots = default_expert_cache(cfg) if expert_cache is None else expert_cache
        self.runner = OffloadedMoE(cfg, params, OffloadConfig(expert_cache=slots, policy=policy, prefetch=prefetch))
        self.cache = init_cache(cfg, config.num_pages, config.page_size)
        self._sample_jit = jax.jit(pick_and_sample)
        self._executables: dict[tuple, Any] = {}
        self._own_compiles = 0
        self.compile_seconds = 0.0

    # ------------------------------------------------------------------ compilation
    def compiled(self, kind: str, jitted: Callable, args: tuple) -> Any:
        """The executable of `jitted` for these argument shapes, compiled ahead of time once."""
        leaves, treedef = jax.tree.flatten(args)  # host arrays and device arrays (e.g. logits) alike
        key = (kind, treedef, tuple((np.shape(a), np.dtype(getattr(a, "dtype", type(a))).str) for a in leaves))
        exe = self._executables.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = jitted.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0
            self._own_compiles += 1
            self._executables[key] = exe
        return exe

    @property
    def compile_count(self) -> int:
        """Compiles of the sampler and acceptance plus the runner's compiled pieces."""
        return self._own_compiles + self.runner.compile_count

    # ------------------------------------------------------------------ steps
    def forward(self, tokens_BxT: np.ndarray, positions_BxT: np.ndarray, page_table_BxP: np.ndarray,
                kv_lens_B: np.ndarray) -> jax.Array:
        """Logits [B, T, V] of T tokens per request, their K/V written into the cache."""
        meta = AttentionMetadata(jnp.asarray(page_table_BxP, jnp.int32), jnp.asarray(kv_lens_B, jnp.int32))
        logits, self.cache = self.runner.forward(tokens_BxT, positions_BxT, cache=self.cache, meta=meta)
        return logits

    def _sample(self, logits, index_B, kv_lens_B, sampling) -> np.ndarray:
        args = (logits, np.asarray(index_B, np.int32), *sampling, np.asarray(kv_lens_B, np.int32))
        return np.asarray(self.compiled("sample", self._sample_jit, args)(*args))

    def prefill(self, tokens_BxT: np.ndarray, positions_BxT: np.ndarray, page_table_BxP: np.ndarray,
                kv_lens_B: np.ndarray, last_B: np.ndarray, sampling: tuple[np.ndarray, ...]) -> np.ndarray:
        logits = self.forward(tokens_BxT, positions_BxT, page_table_BxP, kv_lens_B)
        return self._sample(logits, last_B, kv_lens_B, sampling)

    def decode(self, tokens_B: np.ndarray, positions_B: np.ndarray, page_table_BxP: np.ndarray,
               kv_lens_B: np.ndarray, sampling: tuple[np.ndarray, ...], shared: Any = None) -> np.ndarray:
        if shared is not None:
            raise ValueError("the offloaded engine runs plain paged attention: no shared-prefix step")
        logits = self.forward(tokens_B[:, None], positions_B[:, None], page_table_BxP, kv_lens_B)
        return self._sample(logits, np.zeros(len(tokens_B), np.int32), kv_lens_B, sampling)
