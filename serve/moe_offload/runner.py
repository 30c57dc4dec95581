"""MoE decoding with the routed experts in host memory: a host-driven layer loop.

Why a Python loop over layers, not one jitted scan: which experts a layer needs is known only after
its router runs, and moving them is the step's main cost; the host must see the routing to decide
what to fetch, evict and prefetch (Mixtral-offloading, MoE-Infinity and SpecMoEOff all decide per
layer on the host). Expressing the fetch inside one jit with memory-kind transfers does not move
anything on XLA:CPU (one memory space: the transfer is compiled away), so it could not be measured
here, and it would fix the fetch volume statically. So each layer is two small compiled calls
around one host decision:

    layer_pre (jit):  attention (+ shared expert) -> x_mid, routing top-k, next layer's guess
    host:             read the routing; fetch the missing experts; start prefetching the guess
    layer_ffn (jit):  the active experts from the device cache, added to x_mid

Everything else is on the device and persistent: attention weights, norms, routers, shared
experts, embeddings. The KV cache is the paged layout of `jaxsys.models.kv_cache`, written once per
step like `decoder.forward`. Logits equal `decoder.forward`'s at the fp32 model tolerance
(`tests/test_moe_offload.py`, Mixtral and Qwen2-MoE, with and without a KV cache).

`forward` takes T tokens per request, so the same call is a prefill chunk, a decode step (T = 1)
or a speculative verify step (T = gamma + 1): the verify step's experts are fetched once for all
gamma + 1 tokens, which is the point of SpecMoEOff.

Attention placement: "device" runs `decoder.paged_attention` inside layer_pre; "host" runs
`host_attention.chunked_paged_attention` on the CPU device over a KV cache that lives there, with
the projections before and after it on the device (on a CPU-only machine both are the CPU).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.models import decoder, layers
from jaxsys.models.config import ModelConfig, rope_inv_freq
from jaxsys.models.kv_cache import AttentionMetadata, KVCache, slot_indices
from jaxsys.serve.moe_offload.experts import route, routed_experts, shared_expert
from jaxsys.serve.moe_offload.host_attention import chunked_paged_attention
from jaxsys.serve.moe_offload.policy import EvictionPolicy, make_policy
from jaxsys.serve.moe_offload.store import (CacheCounters, ExpertCacheError, HostExpertStore, LayerExpertCache,
                                            unpack_experts)
from jaxsys.shapes import pow2_bucket

EXPERT_KEYS = ("we_gate", "we_up", "we_down")
ATTENTION_PLACES = ("device", "host")


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    """expert_cache: device slots per layer (>= top-k). policy: 'lru', 'lfu' or a factory of an
    `EvictionPolicy`. prefetch: guess the next layer's experts by applying its router to this
    layer's hidden state (Eliseev & Mazur 2023) and fetch them while this layer computes.
    attention: 'device' or 'host' (chunked, over a KV cache on the CPU device)."""

    expert_cache: int
    policy: str | Callable[[], EvictionPolicy] = "lru"
    prefetch: bool = True
    attention: str = "device"
    host_chunk_pages: int = 8

    def validate(self, cfg: ModelConfig) -> None:
        if not cfg.is_moe:
            raise ExpertCacheError(f"expert offloading needs an MoE model; {cfg.model_type} is dense")
        k, E = cfg.num_experts_per_tok, cfg.num_experts
        if not k <= self.expert_cache <= E:
            raise ExpertCacheError(f"expert cache of {self.expert_cache} experts per layer: it must hold at "
                                   f"least the top-k ({k}) experts one token uses and at most the layer's "
                                   f"{E} experts")
        if self.attention not in ATTENTION_PLACES:
            raise ValueError(f"attention must be one of {ATTENTION_PLACES}, got {self.attention!r}")
        if self.host_chunk_pages < 1:
            raise ValueError("host_chunk_pages must be >= 1")
        make_policy(self.policy)


@dataclasses.dataclass
class OffloadStats:
    steps: int = 0  # forward calls
    tokens: int = 0  # valid tokens processed
    experts_needed: int = 0  # sum over steps and layers of the distinct experts the step's tokens picked
    cache: CacheCounters = dataclasses.field(default_factory=CacheCounters)

    @property
    def experts_per_step(self) -> float:
        return self.experts_needed / max(self.steps, 1)

    @property
    def hit_rate(self) -> float:
        return self.cache.hits / max(self.cache.hits + self.cache.misses, 1)

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens": self.tokens, "experts_needed": self.experts_needed,
                "experts_per_step": self.experts_per_step, "hit_rate": self.hit_rate,
                **dataclasses.asdict(self.cache)}


def attention_in(x_BxTxD, p, positions_BxT, inv_freq, cfg):
    """The layer's attention norm, q/k/v projections (+ bias) and RoPE, as `decoder.forward`."""
    h = layers.rms_norm(x_BxTxD, p["attn_norm"], cfg.rms_norm_eps)
    q = jnp.einsum("BTD,DHK->BTHK", h, p["wq"])
    k = jnp.einsum("BTD,DHK->BTHK", h, p["wk"])
    v = jnp.einsum("BTD,DHK->BTHK", h, p["wv"])
    if cfg.attention_bias:
        q, k, v = q + p["bq"][None, None], k + p["bk"][None, None], v + p["bv"][None, None]
    return layers.rope(q, positions_BxT, inv_freq), layers.rope(k, positions_BxT, inv_freq), v


def self_attention(q, k, v, positions_BxT, cfg):
    """Causal attention among the step's own tokens (no cache); negative positions are padding."""
    B, T = positions_BxT.shape
    mask = layers.causal_mask(positions_BxT, positions_BxT, positions_BxT >= 0, cfg.sliding_window)
    qg = q.reshape(B, T, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim)
    return layers.attention_core(qg, k, v, mask).reshape(B, T, cfg.num_heads, cfg.head_dim)


def attention_out(x_BxTxD, o, p, p_next, cfg):
    """Residual, FFN norm, routing, the shared expert, and the guess of the next layer's experts."""
    B, T, D = x_BxTxD.shape
    x_mid = x_BxTxD + jnp.einsum("BTHK,HKD->BTD", o.astype(x_BxTxD.dtype), p["wo"])
    h = layers.rms_norm(x_mid, p["mlp_norm"], cfg.rms_norm_eps).reshape(B * T, D)
    top_i, top_v = route(h, p["router"], cfg)
    acc = x_mid.reshape(B * T, D) + shared_expert(h, p)
    h_next = layers.rms_norm(x_mid, p_next["mlp_norm"], cfg.rms_norm_eps).reshape(B * T, D)
    guess, _ = route(h_next, p_next["router"], cfg)
    return acc, h, top_i, top_v, guess


class OffloadedMoE:
    """An MoE model whose routed experts live in host memory behind a per-layer device cache."""

    def __init__(self, cfg: ModelConfig, params: dict[str, Any], config: OffloadConfig, *,
                 device: jax.Device | None = None):
        config.validate(cfg)
        self.cfg, self.config = cfg, config
        self.device = device or jax.devices()[0]
        self.host_device = jax.devices("cpu")[0]
        lay = params["layers"]
        self.store = HostExpertStore(*(np.asarray(jax.device_get(lay[k])) for k in EXPERT_KEYS), self.device)
        put = lambda a: jax.device_put(a, self.device)  # noqa: E731
        self.layer_params = [{k: put(v[i]) for k, v in lay.items() if k not in EXPERT_KEYS}
                             for i in range(cfg.num_layers)]
        self.top = {k: put(v) for k, v in params.items() if k != "layers"}
        factory = make_policy(config.policy)
        self.caches = [LayerExpertCache(self.store, i, config.expert_cache, factory())
                       for i in range(cfg.num_layers)]
        self.stats = OffloadStats()
        self.inv_freq = jnp.asarray(rope_inv_freq(cfg))
        self._executables: dict[tuple, Any] = {}
        self._ffn_ready: set[int] = set()  # token counts whose FFN is compiled for every bucket
        self.compile_count = 0
        self._build()

    # ------------------------------------------------------------------ compiled pieces
    def _build(self) -> None:
        cfg, inv = self.cfg, self.inv_freq
        chunk = self.config.host_chunk_pages

        def embed(top, tokens_BxT):
            return top["embed"][tokens_BxT].astype(jnp.dtype(cfg.dtype))

        def pre_nocache(x, p, p_next, positions):
            q, k, v = attention_in(x, p, positions, inv, cfg)
            return attention_out(x, self_attention(q, k, v, positions, cfg), p, p_next, cfg)

        def pre_device(x, p, p_next, positions, cache, layer, meta):
            q, k, v = attention_in(x, p, positions, inv, cfg)
            o = decoder.paged_attention(q, k, v, cache, layer, positions, meta, cfg)
            return (*attention_out(x, o, p, p_next, cfg), k, v)

        def host_attention(q, k, v, cache, layer, positions, meta):
            return chunked_paged_attention(q, k, v, cache, layer, positions, meta, cfg, chunk_pages=chunk)

        def ffn(acc_NxD, h_NxD, top_i, top_v, buf_SxP, experts_U, slots_U, valid_U):
            gate, up, down = unpack_experts(buf_SxP[slots_U], cfg.hidden_size, cfg.moe_intermediate_size)
            return acc_NxD + routed_experts(h_NxD, top_i, top_v, experts_U, valid_U, gate, up, down)

        def write(cache, ks, vs, page_table, positions):
            slots = slot_indices(page_table, positions, cache.page_size)
            return decoder.write_cache(cache, jnp.stack(ks), jnp.stack(vs), slots)

        def head(top, x_BxTxD):
            x = layers.rms_norm(x_BxTxD, top["final_norm"], cfg.rms_norm_eps)
            return decoder.lm_head(top, x, cfg)

        self._jit = {
            "embed": jax.jit(embed), "pre_nocache": jax.jit(pre_nocache), "pre_device": jax.jit(pre_device),
            "attn_in": jax.jit(lambda x, p, pos: attention_in(x, p, pos, inv, cfg)),
            "host_attention": jax.jit(host_attention),
            "attn_out": jax.jit(lambda x, o, p, pn: attention_out(x, o, p, pn, cfg)),
            "ffn": jax.jit(ffn), "write": jax.jit(write, donate_argnums=0), "head": jax.jit(head),
        }

    def _compiled(self, name: str, args: tuple):
        """The executable of one piece for these argument shapes, compiled ahead of time once (counted)."""
        leaves = jax.tree.leaves(args)
        key = (name, jax.tree.structure(args), tuple((np.shape(a), str(a.dtype)) for a in leaves))
        exe = self._executables.get(key)
        if exe is None:
            exe = self._jit[name].lower(*args).compile()
            self._executables[key] = exe
            self.compile_count += 1
        return exe

    def _call(self, name: str, *args):
        """Run one compiled piece (see `_compiled`)."""
        return self._compiled(name, args)(*args)

    def _expert_buckets(self) -> list[int]:
        """Every active-expert count the FFN piece is compiled for: powers of two capped at the slots."""
        S = self.config.expert_cache
        return sorted({pow2_bucket(u, maximum=S) for u in range(1, S + 1)})

    def _compile_ffn(self, acc, h, top_i, top_v, buf) -> None:
        """Compile the FFN piece for every active-expert bucket at once, the first time a token count
        is seen: which bucket a step needs depends on its routing, so compiling on first use would put
        compiles into steady-state steps."""
        N = h.shape[0]
        if N in self._ffn_ready:
            return
        for U in self._expert_buckets():
            ids = np.zeros(U, np.int32)
            self._compiled("ffn", (acc, h, top_i, top_v, buf, ids, ids, np.zeros(U, bool)))
        self._ffn_ready.add(N)

    # ------------------------------------------------------------------ the step
    def forward(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None, *,
                cache: KVCache | None = None, meta: AttentionMetadata | None = None
                ) -> tuple[jax.Array, KVCache | None]:
        """Logits [B, T, V] float32 and the updated cache: `decoder.forward`'s contract.

        A negative position marks padding (its token routes nowhere and fetches nothing).
        """
        cfg, L = self.cfg, self.cfg.num_layers
        tokens = jnp.asarray(tokens_BxT, jnp.int32)
        B, T = tokens.shape
        if positions_BxT is None:
            positions_BxT = np.broadcast_to(np.arange(T, dtype=np.int32)[None, :], (B, T))
        positions_np = np.asarray(positions_BxT, np.int32)
        positions = jnp.asarray(positions_np)
        if (cache is None) != (meta is None):
            raise ValueError("pass both `cache` and `meta`, or neither")
        valid_N = positions_np.reshape(-1) >= 0
        step = self.stats.steps
        x = self._call("embed", self.top, tokens)
        ks, vs = [], []
        guess = None
        for i in range(L):
            p, p_next = self.layer_params[i], self.layer_params[min(i + 1, L - 1)]
            layer = jnp.int32(i)
            if cache is None:
                acc, h, top_i, top_v, guess_dev = self._call("pre_nocache", x, p, p_next, positions)
            elif self.config.attention == "device":
                acc, h, top_i, top_v, guess_dev, k, v = self._call("pre_device", x, p, p_next, positions, cache,
                                                                   layer, meta)
                ks.append(k)
                vs.append(v)
            else:
                q, k, v = self._call("attn_in", x, p, positions)
                host = lambda a: jax.device_put(a, self.host_device)  # noqa: E731
                o = self._call("host_attention", host(q), host(k), host(v), cache, layer, positions, meta)
                acc, h, top_i, top_v, guess_dev = self._call("attn_out", x, jax.device_put(o, self.device), p, p_next)
                ks.append(k)
                vs.append(v)
            top_np, guess = jax.device_get((top_i, guess_dev))
            needed = [int(e) for e in np.unique(top_np[valid_N])]
            self.stats.experts_needed += len(needed)
            acc = self._experts(i, acc, h, top_i, top_v, needed, step,
                                prefetch=guess if (self.config.prefetch and i + 1 < L) else None,
                                valid_N=valid_N)
            x = acc.reshape(B, T, cfg.hidden_size)
        new_cache = None
        if cache is not None:
            new_cache = self._call("write", cache, ks, vs, meta.page_table, positions)
        logits = self._call("head", self.top, x)
        self.stats.steps += 1
        self.stats.tokens += int(valid_N.sum())
        return logits, new_cache

    def _experts(self, i, acc, h, top_i, top_v, needed, step, *, prefetch, valid_N):
        cache = self.caches[i]
        S = cache.num_slots
        self._compile_ffn(acc, h, top_i, top_v, cache.buf)
        # more experts than slots run in groups of S: the resident ones first, so that fetching the
        # missing ones never evicts an expert this step has yet to use
        needed = [e for e in needed if e in cache.slot_of] + [e for e in needed if e not in cache.slot_of]
        groups = [needed[j:j + S] for j in range(0, len(needed), S)] or [[]]
        for g, group in enumerate(groups):
            slots = cache.ensure(group, step)
            if g == 0 and prefetch is not None:  # the guess is fetched while this layer computes
                self.caches[i + 1].prefetch((int(e) for e in np.unique(prefetch[valid_N])), step)
            if not group:
                continue
            U = pow2_bucket(len(group), maximum=S)
            pad = U - len(group)
            experts_U = np.asarray(group + [group[0]] * pad, np.int32)
            slots_U = np.asarray(slots + [slots[0]] * pad, np.int32)
            valid_U = np.arange(U) < len(group)
            acc = self._call("ffn", acc, h, top_i, top_v, cache.buf, experts_U, slots_U, valid_U)
        return acc

    # ------------------------------------------------------------------ bookkeeping
    def counters(self) -> CacheCounters:
        total = CacheCounters()
        for c in self.caches:
            total.add(c.counters)
        return total

    def reset_stats(self) -> None:
        self.stats = OffloadStats()
        for c in self.caches:
            c.counters = CacheCounters()

    def snapshot_stats(self) -> dict[str, Any]:
        self.stats.cache = self.counters()
        return self.stats.as_dict()

    def block_until_ready(self) -> None:
        for c in self.caches:
            c.buf.block_until_ready()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0
