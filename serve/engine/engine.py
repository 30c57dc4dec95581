"""The device side of serving: pure jitted prefill and decode steps over the paged KV cache.

`Engine` owns the parameters, the KV cache and one compiled executable per bucketed shape. Each
public call does host bookkeeping only (pad, look up the executable) and runs a pure function that
donates the cache; the scheduler never touches device state. Shapes come from a small bucket set
(powers of two), every executable is compiled ahead of time with `jit(...).lower(...).compile()`
the first time its bucket is seen, and `compile_count` counts those: after warm-up over a workload,
a steady state that compiles again is a bug (the tests assert zero).

Decode attention: the shared-prefix step (`shared_decode`, with `EngineConfig.shared_attention`)
or plain split-KV paged decode (`plain_decode`); both run the kernel package's paged path.

Hidden states out (ARES/STAR, issue 18 A): `decode_with_hidden(layer, ...)` is the decode step
that also returns every row's residual stream after `layer` layers, for a remaining-length
predictor. It is a separate compiled program per (layer, bucket), chosen by the caller per call
(e.g. every k steps), so plain `decode` is the very same program with the option or without it,
and both are compiled once per bucket.

Tensor parallelism: give a mesh; parameters and the cache are sharded by the logical rules table
(heads on `tensor`) and XLA partitions the steps. Same tokens as one device (tested).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np

from jaxsys.generation import make_step_fns
from jaxsys.models import decoder
from jaxsys.models.config import ModelConfig
from jaxsys.models.kv_cache import CACHE_LOGICAL_AXES, AttentionMetadata, KVCache, init_cache
from jaxsys.sampling import sample
from jaxsys.serve.engine.plain_decode import make_plain_decode
from jaxsys.sharding import activate, logical_sharding, tree_shardings


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int = 4096  # including the scratch page 0
    max_decode_batch: int = 64
    max_prefill_batch: int = 8
    prefill_chunk: int = 512  # max new tokens of one request in one prefill step
    shared_attention: bool = True  # shared-prefix decode attention (FlashForge/CoDec) vs plain paged
    attention_precision: str = "tf32x3"  # GPU fp32 dots of decode attention: "tf32x3", "tf32" or "ieee"

    def __post_init__(self):
        for name in ("page_size", "num_pages", "max_decode_batch", "max_prefill_batch", "prefill_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.prefill_chunk % self.page_size:
            raise ValueError("prefill_chunk must be a multiple of page_size")


class Engine:
    def __init__(self, cfg: ModelConfig, params: Any, config: EngineConfig = EngineConfig(), *,
                 mesh: jax.sharding.Mesh | None = None,
                 decode_attention: decoder.AttentionFn | None = None):
        self.cfg = cfg
        self.config = config
        self.mesh = mesh
        self.params = params
        cache = init_cache(cfg, config.num_pages, config.page_size)
        if mesh is not None:
            s = logical_sharding(CACHE_LOGICAL_AXES, cache.k.shape, mesh)
            cache = KVCache(jax.device_put(cache.k, s), jax.device_put(cache.v, s))
            pshard = tree_shardings(decoder.param_logical_axes(cfg), params, mesh)
            self.params = jax.tree.map(jax.device_put, params, pshard)
        self.cache = cache
        self._decode_attention = decode_attention or make_plain_decode(cfg, config)
        prefill, decode = make_step_fns(cfg, self._decode_attention)
        self._prefill_jit = jax.jit(prefill, donate_argnums=1)
        self._decode_jit = jax.jit(decode, donate_argnums=1)
        self._hidden_decode_jits: dict[int, Callable] = {}
        self._executables: dict[tuple, Any] = {}
        self.compile_count = 0
        self.compile_seconds = 0.0

    # ------------------------------------------------------------------ compilation
    def _executable(self, kind: str, jitted: Callable, args: tuple) -> Any:
        leaves, treedef = jax.tree.flatten(args[2:])  # params and cache never change shape
        key = (kind, treedef, tuple((np.shape(a), np.result_type(a).str) for a in leaves))
        exe = self._executables.get(key)
        if exe is None:
            t0 = time.perf_counter()
            with activate(self.mesh):
                exe = jitted.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0
            self.compile_count += 1
            self._executables[key] = exe
        return exe

    # ------------------------------------------------------------------ steps
    def prefill(self, tokens_BxT: np.ndarray, positions_BxT: np.ndarray, page_table_BxP: np.ndarray,
                kv_lens_B: np.ndarray, last_B: np.ndarray, sampling: tuple[np.ndarray, ...]) -> np.ndarray:
        args = (self.params, self.cache, tokens_BxT, positions_BxT, page_table_BxP, kv_lens_B, last_B, *sampling)
        exe = self._executable("prefill", self._prefill_jit, args)
        nxt, self.cache = exe(*args)
        return np.asarray(nxt)

    def decode(self, tokens_B: np.ndarray, positions_B: np.ndarray, page_table_BxP: np.ndarray,
               kv_lens_B: np.ndarray, sampling: tuple[np.ndarray, ...], shared: Any = None) -> np.ndarray:
        args = (self.params, self.cache, tokens_B, positions_B, page_table_BxP, kv_lens_B, *sampling, shared)
        exe = self._executable("decode", self._decode_jit, args)
        nxt, self.cache = exe(*args)
        return np.asarray(nxt)

    def decode_with_hidden(self, layer: int, tokens_B: np.ndarray, positions_B: np.ndarray,
                           page_table_BxP: np.ndarray, kv_lens_B: np.ndarray, sampling: tuple[np.ndarray, ...],
                           shared: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """`decode`, also returning the residual stream after the first `layer` layers of every row
        (next tokens [B], hidden [B, D] float32; padded rows are garbage)."""
        if not 1 <= layer <= self.cfg.num_layers:
            raise ValueError(f"layer must be in [1, {self.cfg.num_layers}] for this model, got {layer}")
        jitted = self._hidden_decode_jits.get(layer)
        if jitted is None:
            jitted = jax.jit(_hidden_decode_step(self.cfg, self._decode_attention, layer), donate_argnums=1)
            self._hidden_decode_jits[layer] = jitted
        args = (self.params, self.cache, tokens_B, positions_B, page_table_BxP, kv_lens_B, *sampling, shared)
        exe = self._executable(f"decode_hidden{layer}", jitted, args)
        nxt, self.cache, hidden_BxD = exe(*args)
        return np.asarray(nxt), np.asarray(hidden_BxD, np.float32)

    @property
    def num_executables(self) -> int:
        return len(self._executables)


def _hidden_decode_step(cfg: ModelConfig, attention: decoder.AttentionFn, layer: int) -> Callable:
    """The decode step of `make_step_fns` that also returns the residual after `layer` layers."""

    def decode(params, cache, tokens_B, positions_B, page_table, kv_lens, temp, top_k, top_p, seed, shared=None):
        meta = AttentionMetadata(page_table, kv_lens, shared)
        logits, cache, h_Bx1xD = decoder.forward(params, tokens_B[:, None], cfg=cfg,
                                                 positions_BxT=positions_B[:, None], cache=cache, meta=meta,
                                                 attention=attention, return_hidden=True, hidden_layer=layer)
        return sample(logits[:, 0], temp, top_k, top_p, seed, kv_lens), cache, h_Bx1xD[:, 0]

    return decode
