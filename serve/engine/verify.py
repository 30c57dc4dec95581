"""Speculative decoding in the engine: the verify step over the paged KV cache, and its drafts.

One step serves every running request. Say a request has n tokens and t is its last sampled one
(position n - 1, its K/V not yet in the cache). A draft proposes up to gamma tokens x_1..x_g; the
target then scores [t, x_1, .., x_g] at positions n - 1 .. n - 1 + g in ONE forward over the paged
cache: gamma + 1 query positions per request, causal among themselves, attending the request's
n - 1 cached tokens through its page table (`decoder.paged_attention`, the multi-query paged path
prefill chunks run). The forward writes their K/V; the exact rule then accepts a prefix x_1..x_a
(greedy: the target's argmax prefix; sampling: `acceptance.verify_draft`, Leviathan et al.) and
draws the token after it, so the request emits a + 1 tokens.

KV rollback: the host sets the request's length to n + a + 1; the K/V written for the rejected
x_{a+1}..x_g lie past it, where attention never reads (`kv_lens`), and the next step writes its own
tokens from position n + a on, overwriting them. The scheduler reserves every page a request can
use at admission and the host caps each row's draft so its positions stay inside them, so a
rollback never allocates or frees a page (the page accounting is checked after every step in the
tests).

Drafts, all producing the step's draft tokens and their probabilities q:
- "ngram": prompt lookup on the host (`ngram_propose_host`); q is one-hot.
- "self": the target's first k layers + its final norm and LM head (`early_exit_draft`). It keeps
  no KV of its own: its layers *are* the target's first k, so the context's K/V it needs are the
  target's layers 0..k-1, already in the cache, which it reads in place. Its g proposals run as g
  forwards over the (g + 1)-token buffer [t, x_1..x_i, padding] (a `lax.scan`, one compiled body),
  recomputing the drafted tokens' K/V rather than writing them: the verify forward overwrites
  those positions anyway.
- "model": any model with the target's vocabulary. It reads no cache: each of its g forwards
  recomputes, cache-free, the last `window` context tokens plus its proposals (a draft is small
  and `window` bounded, and no cache means nothing to prefill or roll back for it).
A draft's q (the distribution its token was sampled from, with the request's temperature, top-k
and top-p) is what makes the acceptance exact for any draft.

Static shapes and compiles: the step is keyed by [batch bucket, gamma + 1, page bucket] and compiled
once per shape by the engine's executable cache, counted in `Engine.compile_count` with prefill and
decode; gamma comes from the compiled set of `SpeculativeConfig` (`Verifier.set_gamma` refuses
others). Randomness is keyed per request by (seed, position), so a request samples the same tokens
in any batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.models import decoder
from jaxsys.models.config import ModelConfig
from jaxsys.models.kv_cache import AttentionMetadata, KVCache
from jaxsys.serve.engine.engine import Engine
from jaxsys.serve.speculative.acceptance import greedy_accept, probs_from_logits, verify_draft
from jaxsys.serve.speculative.config import SpeculativeConfig
from jaxsys.serve.speculative.drafts import (DraftError, check_draft_vocab, early_exit_draft, ngram_propose_host,
                                             one_hot_probs)
from jaxsys.serve.speculative.reference import Sampling

_VERIFY_STREAM = 0  # per-request random streams: 0 verifies, 1 + i draws draft token i


def row_keys(seed_B: jax.Array, position_B: jax.Array, stream: int | jax.Array) -> jax.Array:
    """One key per request from (seed, position of its last token, stream): batch-independent."""
    def one(seed, pos):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), pos), stream)

    return jax.vmap(one)(seed_B, jnp.maximum(position_B, 0))


def draw(keys_B: jax.Array, logits_BxV: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array]:
    """A draft token per row and the distribution q it was drawn from ([B], [B, V]); greedy rows
    take the argmax (q one-hot). The sort for top-k/top-p runs only when some row samples."""
    def sampled(_):
        q_BxV = probs_from_logits(logits_BxV[:, None], s.temperature_B, s.top_k_B, s.top_p_B)[:, 0]
        x_B = jax.vmap(jax.random.categorical)(keys_B, jnp.log(q_BxV)).astype(jnp.int32)
        return x_B, q_BxV

    def greedy(_):
        x_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        return x_B, jax.nn.one_hot(x_B, logits_BxV.shape[-1], dtype=jnp.float32)

    return jax.lax.cond(jnp.any(s.temperature_B > 0), sampled, greedy, None)


def accept(keys_B: jax.Array, draft_BxG: jax.Array, q_BxGxV: jax.Array | None, draft_len_B: jax.Array,
           logits_BxG1xV: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array]:
    """(accepted draft tokens per row, the token after them), by the exact rule. q None: a
    deterministic draft (one-hot q). All-greedy batches skip the probabilities: the accepted prefix
    is where the draft equals the target's argmax, and the next token is the argmax after it."""
    def sampled(_):
        p_BxG1xV = probs_from_logits(logits_BxG1xV, s.temperature_B, s.top_k_B, s.top_p_B)
        q = one_hot_probs(draft_BxG, logits_BxG1xV.shape[-1]) if q_BxGxV is None else q_BxGxV

        def row(key, d_G, q_GxV, p_G1xV, len_):
            n, nxt = verify_draft(key, d_G[None], q_GxV[None], p_G1xV[None], len_[None])
            return n[0], nxt[0]

        return jax.vmap(row)(keys_B, draft_BxG, q, p_BxG1xV, draft_len_B)

    def greedy(_):
        return greedy_accept(draft_BxG, draft_len_B, logits_BxG1xV)

    return jax.lax.cond(jnp.any(s.temperature_B > 0), sampled, greedy, None)


def accept_step(logits_BxG1xV, proposals_BxG, draft_len_B, base_B, temperature_B, top_k_B, top_p_B, seed_B):
    """`accept` for host proposals given the target's logits at the verify positions (an engine
    whose forward runs outside one fused step, e.g. with experts offloaded): (accepted_B, next_B)."""
    return accept(row_keys(seed_B, base_B, _VERIFY_STREAM), proposals_BxG, None, draft_len_B, logits_BxG1xV,
                  Sampling(temperature_B, top_k_B, top_p_B))


def verify_positions(base_B, draft_len_B, gamma: int, xp=jnp):
    """(positions [B, gamma + 1], kv_lens [B]) of a verify step: the last token and the row's
    draft_len proposals from position base on; the rest (and padding rows, base < 0) are -1."""
    j_G1 = xp.arange(gamma + 1, dtype=xp.int32)
    valid = (j_G1[None, :] <= draft_len_B[:, None]) & (base_B[:, None] >= 0)
    positions = xp.where(valid, base_B[:, None] + j_G1[None, :], -1).astype(xp.int32)
    return positions, xp.where(base_B >= 0, base_B + 1 + draft_len_B, 0).astype(xp.int32)


def target_cache_attention(cache: KVCache) -> decoder.AttentionFn:
    """Attention for an early-exit draft: `decoder.paged_attention` over the *target's* cache (its
    layer l is the draft's layer l). The cache `decoder.forward` is handed is only a stand-in with
    the draft's depth; what the forward writes into it is never used, so XLA drops the write."""
    def attention(q, k_new, v_new, _standin, layer, positions_BxT, meta, cfg):
        return decoder.paged_attention(q, k_new, v_new, cache, layer, positions_BxT, meta, cfg)

    return attention


def early_exit_proposals(draft_params, draft_cfg: ModelConfig, cache: KVCache, last_B, base_B, page_table_BxP,
                         gamma: int, s: Sampling, seed_B) -> tuple[jax.Array, jax.Array]:
    """The self-draft's buffer [t, x_1..x_gamma] ([B, gamma + 1]) and q ([B, gamma, V])."""
    B = last_B.shape[0]
    K, _, _, ps, Dh = cache.k.shape
    standin = KVCache(jnp.zeros((K, draft_cfg.num_layers, 1, ps, Dh), cache.k.dtype),
                      jnp.zeros((K, draft_cfg.num_layers, 1, ps, Dh), cache.v.dtype))
    attention = target_cache_attention(cache)
    j_G1 = jnp.arange(gamma + 1, dtype=jnp.int32)
    buf = jnp.zeros((B, gamma + 1), jnp.int32).at[:, 0].set(last_B)

    def one(buf, i):
        valid = (j_G1[None, :] <= i) & (base_B[:, None] >= 0)
        pos = jnp.where(valid, base_B[:, None] + j_G1[None, :], -1)
        meta = AttentionMetadata(page_table_BxP, jnp.where(base_B >= 0, base_B + 1 + i, 0))
        logits, _ = decoder.forward(draft_params, buf, cfg=draft_cfg, positions_BxT=pos, cache=standin, meta=meta,
                                    attention=attention, logits_index_B=jnp.full((B,), i, jnp.int32))
        x_B, q_BxV = draw(row_keys(seed_B, base_B, 1 + i), logits[:, 0], s)
        return buf.at[:, i + 1].set(x_B), q_BxV

    buf, q_GxBxV = jax.lax.scan(one, buf, jnp.arange(gamma, dtype=jnp.int32))
    return buf, jnp.moveaxis(q_GxBxV, 0, 1)


def model_proposals(draft_params, draft_cfg: ModelConfig, context_BxW, last_B, base_B, gamma: int, s: Sampling,
                    seed_B) -> tuple[jax.Array, jax.Array]:
    """A separate draft model's buffer [t, x_1..x_gamma] and q, each proposal by a cache-free
    forward over the last W context tokens (right-aligned, ending with t) and the proposals so far."""
    B, W = context_BxW.shape
    j_S = jnp.arange(W + gamma, dtype=jnp.int32)
    pos_BxS = base_B[:, None] - (W - 1) + j_S[None, :]
    buf = jnp.concatenate([context_BxW, jnp.zeros((B, gamma), jnp.int32)], axis=1)

    def one(buf, i):
        valid = (pos_BxS >= 0) & (j_S[None, :] < W + i) & (base_B[:, None] >= 0)
        logits, _ = decoder.forward(draft_params, buf, cfg=draft_cfg, positions_BxT=jnp.where(valid, pos_BxS, -1),
                                    valid_BxT=valid, logits_index_B=jnp.full((B,), W - 1 + i, jnp.int32))
        x_B, q_BxV = draw(row_keys(seed_B, base_B, 1 + i), logits[:, 0], s)
        return buf.at[:, W + i].set(x_B), q_BxV

    buf, q_GxBxV = jax.lax.scan(one, buf, jnp.arange(gamma, dtype=jnp.int32))
    return jnp.concatenate([last_B[:, None], buf[:, W:]], axis=1), jnp.moveaxis(q_GxBxV, 0, 1)


def make_verify_step(cfg: ModelConfig, draft: str, draft_cfg: ModelConfig | None = None):
    """The pure verify step (jit it donating the cache, argument 1):

    step((params, draft_params), cache, last_B, base_B, page_table_BxP, proposals_BxG, draft_len_B, context_BxW,
         temperature_B, top_k_B, top_p_B, seed_B)
      -> ((accepted_B, next_B, draft_BxG), cache)

    last_B: each request's last sampled token; base_B its position (n - 1; -1 marks a padding row).
    proposals_BxG: host proposals ("ngram"; ignored otherwise). draft_len_B: proposals each row may
    verify (<= G). context_BxW: the last W tokens ending with last_B ("model" only).
    The request emits draft_BxG[:accepted] then next.
    """

    def step(weights, cache, last_B, base_B, page_table_BxP, proposals_BxG, draft_len_B, context_BxW,
             temperature_B, top_k_B, top_p_B, seed_B):
        params, draft_params = weights  # the draft's weights travel with the target's (never part of the shape key)
        G = proposals_BxG.shape[1]
        s = Sampling(temperature_B, top_k_B, top_p_B)
        if draft == "ngram":
            buf_BxG1, q = jnp.concatenate([last_B[:, None], proposals_BxG], axis=1), None
        elif draft == "self":
            buf_BxG1, q = early_exit_proposals(draft_params, draft_cfg, cache, last_B, base_B, page_table_BxP, G, s,
                                               seed_B)
        else:
            buf_BxG1, q = model_proposals(draft_params, draft_cfg, context_BxW, last_B, base_B, G, s, seed_B)
        positions, kv_lens = verify_positions(base_B, draft_len_B, G)
        meta = AttentionMetadata(page_table_BxP, kv_lens)
        logits, cache = decoder.forward(params, buf_BxG1, cfg=cfg, positions_BxT=positions, cache=cache, meta=meta)
        n_B, next_B = accept(row_keys(seed_B, base_B, _VERIFY_STREAM), buf_BxG1[:, 1:], q, draft_len_B, logits, s)
        return (n_B, next_B, buf_BxG1[:, 1:]), cache

    return step


class Verifier:
    """The host side of speculative serving, bound to an `Engine` (its parameters, cache and
    compile counter): the draft, the current gamma, the n-gram proposer, the compiled step.

    draft_model: (config, params) of the "model" draft; its vocabulary must be the target's.
    schedule: `gamma="auto"`'s `GammaSchedule` (`jaxsys.serve.moe_offload.autotune`): the gamma of a
    step follows the number of running requests, and each step's acceptance feeds it back.
    An engine that is not an `Engine` but has `forward(tokens, positions, page_table, kv_lens)` and
    `compiled(kind, jitted, args)` (the offloaded-experts engine) verifies n-gram drafts by its
    forward and `accept_step`.
    """

    def __init__(self, engine, config: SpeculativeConfig, draft_model: tuple[ModelConfig, Any] | None = None, *,
                 schedule: Any = None):
        cfg = engine.cfg
        self.engine = engine
        self.config = config
        self.gamma = config.gamma
        self.schedule = schedule
        self.draft_cfg: ModelConfig | None = None
        self.draft_params: Any = None
        if (draft_model is not None) != (config.draft == "model"):
            raise DraftError("a draft model is given exactly when the draft is 'model'")
        self._by_forward = not isinstance(engine, Engine)
        if self._by_forward and config.draft != "ngram":
            raise DraftError(f"the {config.draft!r} draft runs inside the on-device engine's fused verify step; "
                             f"with experts offloaded, speculate with the 'ngram' draft")
        if config.draft == "self":
            layers = config.draft_layers or max(1, cfg.num_layers // 2)
            self.draft_params, self.draft_cfg = early_exit_draft(engine.params, cfg, layers)
        elif config.draft == "model":
            draft_cfg, draft_params = draft_model
            check_draft_vocab(cfg, draft_cfg)
            self.draft_cfg, self.draft_params = draft_cfg, draft_params
        self.context_width = config.window if config.draft == "model" else 1
        self._jit = jax.jit(make_verify_step(cfg, config.draft, self.draft_cfg), donate_argnums=1)
        self._accept_jit = jax.jit(accept_step)

    @property
    def proposes_on_host(self) -> bool:
        return self.config.draft == "ngram"

    def set_gamma(self, gamma: int) -> None:
        """Switch gamma within the compiled set (a clear error outside it); a fixed gamma ends an
        automatic schedule."""
        self.config.check_gamma(gamma)
        self.gamma = gamma
        self.schedule = None

    def gamma_for(self, batch: int) -> int:
        """Drafts per request of a step of `batch` running requests (0: a plain decode step)."""
        return self.gamma if self.schedule is None else self.schedule.gamma_for(batch)

    def propose(self, context: list[int], max_tokens: int) -> np.ndarray:
        """Host n-gram proposals for one request (at most `max_tokens`)."""
        c = self.config
        return ngram_propose_host(context, max_tokens, max_ngram=c.max_ngram, min_ngram=c.min_ngram)

    def step(self, last_B: np.ndarray, base_B: np.ndarray, page_table_BxP: np.ndarray, proposals_BxG: np.ndarray,
             draft_len_B: np.ndarray, context_BxW: np.ndarray, sampling: tuple[np.ndarray, ...]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run the verify step (see `make_verify_step`): (accepted_B, next_B, draft_BxG) on the host."""
        self.config.check_gamma(proposals_BxG.shape[1])
        if self._by_forward:
            out = self._step_by_forward(last_B, base_B, page_table_BxP, proposals_BxG, draft_len_B, sampling)
        else:
            engine = self.engine
            args = ((engine.params, self.draft_params), engine.cache, last_B, base_B, page_table_BxP, proposals_BxG,
                    draft_len_B, context_BxW, *sampling)
            exe = engine._executable("verify", self._jit, args)  # compiled per shape, counted with prefill/decode
            out, engine.cache = exe(*args)
            out = tuple(np.asarray(x) for x in jax.device_get(out))
        if self.schedule is not None:
            real = np.asarray(base_B) >= 0
            self.schedule.observe(proposals_BxG.shape[1], np.asarray(draft_len_B)[real], out[0][real])
        return out

    def _step_by_forward(self, last_B, base_B, page_table_BxP, proposals_BxG, draft_len_B, sampling):
        positions, kv_lens = verify_positions(base_B, draft_len_B, proposals_BxG.shape[1], xp=np)
        tokens = np.concatenate([last_B[:, None], proposals_BxG], axis=1)
        logits = self.engine.forward(tokens, positions, page_table_BxP, kv_lens)
        args = (logits, proposals_BxG, draft_len_B, base_B, *sampling)
        accepted, nxt = self.engine.compiled("accept", self._accept_jit, args)(*args)
        return np.asarray(accepted), np.asarray(nxt), proposals_BxG
