"""`jaxsys.generate`: the reference generation loop, and the step functions the engine runs.

Two ways to generate, one result type (`GenerationResult`):

- `jaxsys.generate(model, prompts, ...)` (this module): the plain loop. The prompts are
  right-padded into one batch, prefilled in one call, then decoded one token per call until every
  request is done; each request owns a contiguous run of pages of the paged KV cache (page 0 is
  scratch), and decode attention is the decoder's own (`decoder.paged_attention`). Few moving
  parts, so it is the reference the serving path is checked against and the simplest way to run
  a model from Python.
- `jaxsys.serve.ServingLLM.generate` (and the `jaxsys generate` command): the serving engine,
  with continuous batching, chunked prefill, the radix prefix cache and shared-prefix decode
  attention. It runs the same step functions (`make_step_fns`) and returns the same
  `GenerationResult`; it is the fast path for many or long prompts.

Shapes are padded to power-of-two buckets (`jaxsys.shapes.pow2_bucket`), so a batch of any size
and prompt length reuses a handful of compiled executables. One host sync per decode step fetches
the sampled tokens (needed for EOS, stop strings and streaming).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Sequence

import jax
import numpy as np

from jaxsys.models import decoder
from jaxsys.models.config import ModelConfig
from jaxsys.models.kv_cache import AttentionMetadata, KVCache, init_cache
from jaxsys.models.loading import LoadedModel
from jaxsys.models.tokenizer import Tokenizer
from jaxsys.sampling import SamplingParams, StopMatcher, batch_arrays, sample
from jaxsys.shapes import pow2_bucket

PAGE_SIZE = 16


class ContextLengthError(ValueError):
    """A prompt does not fit the model's context window."""


@dataclasses.dataclass
class GenerationResult:
    """One finished request, from `jaxsys.generate` or from the serving engine (`ServingLLM`).

    Token lists are `*_ids`; `text` is the decoded continuation (empty for a model without a
    tokenizer), cut before a stop string. Timings are wall-clock seconds as the caller saw them
    (the first call of a new shape includes its compilation).
    """

    request_id: str
    prompt: str | None  # the prompt's text, None when it was given as token ids
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length", "cancelled" or "error"
    ttft_s: float  # time to the first new token
    tpot_s: list[float]  # time between consecutive new tokens

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first one (0 when fewer than two were generated)."""
        total = sum(self.tpot_s)
        return len(self.tpot_s) / total if total > 0 else 0.0


def make_step_fns(cfg: ModelConfig, decode_attention: decoder.AttentionFn = decoder.paged_attention):
    """The pure prefill and decode steps (jit them with the shardings and donation you need).

    prefill(params, cache, tokens_BxT, positions_BxT, page_table_BxP, kv_lens_B, last_B,
            temperature_B, top_k_B, top_p_B, seed_B) -> (next_token_B, cache)
    decode(params, cache, tokens_B, positions_B, page_table_BxP, kv_lens_B,
           temperature_B, top_k_B, top_p_B, seed_B, shared=None) -> (next_token_B, cache)
    Prefill runs any chunk of a prompt (the cache holds what came before); a padded token has
    position -1. The random stream of request b is keyed by (seed_b, its token position).
    """

    def prefill(params, cache, tokens_BxT, positions_BxT, page_table, kv_lens, last_B, temp, top_k, top_p, seed):
        meta = AttentionMetadata(page_table, kv_lens)
        logits, cache = decoder.forward(params, tokens_BxT, cfg=cfg, positions_BxT=positions_BxT,
                                        cache=cache, meta=meta, logits_index_B=last_B)
        return sample(logits[:, 0], temp, top_k, top_p, seed, kv_lens), cache

    def decode(params, cache, tokens_B, positions_B, page_table, kv_lens, temp, top_k, top_p, seed, shared=None):
        meta = AttentionMetadata(page_table, kv_lens, shared)
        logits, cache = decoder.forward(params, tokens_B[:, None], cfg=cfg, positions_BxT=positions_B[:, None],
                                        cache=cache, meta=meta, attention=decode_attention)
        return sample(logits[:, 0], temp, top_k, top_p, seed, kv_lens), cache

    return prefill, decode


@functools.lru_cache(maxsize=16)
def _compiled_steps(cfg: ModelConfig):
    prefill, decode = make_step_fns(cfg)
    return jax.jit(prefill, donate_argnums=1), jax.jit(decode, donate_argnums=1)


def encode_prompt(tokenizer: Tokenizer | None, prompt: str | Sequence[int], *, chat: bool = False) -> list[int]:
    """Token ids of a prompt: text is tokenized (`chat` wraps it as a user message in the chat
    template), token ids pass through."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; pass token ids instead of text")
    if chat:
        return tokenizer.encode_chat([{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt)


def _encode_prompts(model: LoadedModel, prompts, chat: bool) -> tuple[list[str | None], list[list[int]]]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    texts, ids = [], []
    for p in prompts:
        texts.append(p if isinstance(p, str) else None)
        ids.append(encode_prompt(model.tokenizer, p, chat=chat))
        if not ids[-1]:
            raise ValueError("empty prompt")
        bad = [t for t in ids[-1] if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {model.config.vocab_size}): {bad[:5]}")
    return texts, ids


def generate(model: LoadedModel, prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
             max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, stop: Sequence[str] = (), chat: bool = False, ignore_eos: bool = False,
             on_text: Callable[[int, str], None] | None = None) -> list[GenerationResult]:
    """Generate continuations for a batch of prompts (text, or lists of token ids) with the
    reference loop (see the module docstring; `jaxsys.serve.ServingLLM` is the fast path).

    chat: wrap each text prompt as a user message in the model's chat template.
    on_text(i, piece): called with each new piece of text of request i as it is produced.
    ignore_eos: keep generating past EOS until max_tokens (for benchmarks).
    Greedy when temperature == 0; request i samples with seed `seed + i` otherwise.
    Raises ContextLengthError when a prompt does not fit the context window.
    """
    base = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, stop=tuple(stop))
    cfg = model.config
    texts, prompt_ids = _encode_prompts(model, prompts, chat)
    ctx = cfg.max_position_embeddings
    for i, ids in enumerate(prompt_ids):
        if len(ids) >= ctx:
            raise ContextLengthError(f"prompt {i} has {len(ids)} tokens; the model's context is {ctx} tokens "
                                     f"(at most {ctx - 1} prompt tokens leave room for one new token)")
    n = len(prompt_ids)
    params_list = [dataclasses.replace(base, seed=seed + i) for i in range(n)]
    budget = [min(max_tokens, ctx - len(ids)) for ids in prompt_ids]
    B = pow2_bucket(n)
    T = pow2_bucket(max(len(i) for i in prompt_ids), minimum=16)
    pages_per_req = pow2_bucket(math.ceil((max(len(i) for i in prompt_ids) + max(budget)) / PAGE_SIZE))
    cache = init_cache(cfg, 1 + B * pages_per_req, PAGE_SIZE)
    if model.mesh is not None:
        from jaxsys.models.kv_cache import CACHE_LOGICAL_AXES
        from jaxsys.sharding import logical_sharding

        s = logical_sharding(CACHE_LOGICAL_AXES, cache.k.shape, model.mesh)
        cache = KVCache(jax.device_put(cache.k, s), jax.device_put(cache.v, s))
    page_table = (1 + np.arange(B * pages_per_req, dtype=np.int32)).reshape(B, pages_per_req)
    tokens = np.zeros((B, T), np.int32)
    positions = np.full((B, T), -1, np.int32)
    lens = np.zeros(B, np.int32)
    for i, ids in enumerate(prompt_ids):
        tokens[i, :len(ids)] = ids
        positions[i, :len(ids)] = np.arange(len(ids))
        lens[i] = len(ids)
    temp, tk, tp, sd = batch_arrays(params_list, B)
    prefill, decode = _compiled_steps(cfg)

    t0 = time.perf_counter()
    nxt, cache = prefill(model.params, cache, tokens, positions, page_table, lens, np.maximum(lens - 1, 0),
                         temp, tk, tp, sd)
    nxt = np.asarray(nxt)
    now = time.perf_counter()
    ttft = now - t0

    eos = set() if ignore_eos else set(cfg.eos_token_ids)
    out_tokens: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    reasons = ["length"] * n
    stream = [model.tokenizer.stream_decoder() if model.tokenizer else None for _ in range(n)]
    stops = [StopMatcher(base.stop) for _ in range(n)]
    tpot: list[list[float]] = [[] for _ in range(n)]
    last = now
    while True:
        for i in range(n):
            if done[i]:
                continue
            if out_tokens[i]:
                tpot[i].append(now - last)
            t = int(nxt[i])
            if t in eos:
                done[i], reasons[i] = True, "stop"
                continue
            out_tokens[i].append(t)
            if stream[i] is not None:
                piece, stopped = stops[i].push(stream[i].push(t))
                if piece and on_text:
                    on_text(i, piece)
                if stopped:
                    done[i], reasons[i] = True, "stop"
                    continue
            if len(out_tokens[i]) >= budget[i]:
                done[i] = True
        if all(done):
            break
        lens = lens + 1
        cur = np.where(np.arange(B) < n, lens - 1, -1).astype(np.int32)
        nxt, cache = decode(model.params, cache, nxt.astype(np.int32), cur, page_table, lens, temp, tk, tp, sd)
        nxt = np.asarray(nxt)
        last, now = now, time.perf_counter()

    results = []
    for i in range(n):
        if stream[i] is not None:
            tail = stops[i].flush() if not stops[i].stopped else ""
            if tail and on_text:
                on_text(i, tail)
            text = stops[i].text
        else:
            text = ""
        results.append(GenerationResult(request_id=f"generate-{i}", prompt=texts[i], prompt_ids=prompt_ids[i],
                                        token_ids=out_tokens[i], text=text, finish_reason=reasons[i],
                                        ttft_s=ttft, tpot_s=tpot[i]))
    return results
