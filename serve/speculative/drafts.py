"""The drafts' proposal logic, engine-independent: an early-exit self-draft and n-gram prompt lookup.

- Early-exit self-draft: the target's first `num_layers` layers followed by its own final norm and
  LM head (no extra weights; LayerSkip-style self-speculation without its training). Built from
  `jaxsys.models.decoder` parameters, so it runs through the same `decoder.forward` as the target.
- N-gram prompt lookup (Saxena 2023, "Prompt Lookup Decoding"; vLLM's `ngram` proposer): find the
  most recent earlier occurrence of the context's last n tokens (n from `max_ngram` down to
  `min_ngram`) and propose the tokens that followed it. Free to run, deterministic (one-hot q), and
  strong where the answer copies from the prompt.

Both work on a right-padded context buffer `context_BxS` with per-row lengths `lens_B`, the layout a
verify step has, and are pure and jittable. The serving engine proposes n-grams on the host instead
(`ngram_propose_host`, the same rule on one request's token list): the scheduler holds every
request's tokens there, and the device step then needs no context buffer of its own.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.models.config import ModelConfig


class DraftError(ValueError):
    """A draft that cannot serve a target (vocabulary mismatch, bad depth, bad gamma)."""


def check_draft_vocab(target_cfg: ModelConfig, draft_cfg: ModelConfig) -> None:
    """Speculative sampling compares p and q token by token: both models must share one vocabulary."""
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise DraftError(f"the draft's vocabulary ({draft_cfg.vocab_size} tokens) differs from the "
                         f"target's ({target_cfg.vocab_size}); a draft must use the target's tokenizer")


def early_exit_draft(params: dict[str, Any], cfg: ModelConfig, num_layers: int
                     ) -> tuple[dict[str, Any], ModelConfig]:
    """(draft params, draft config): the first `num_layers` layers, the final norm and the LM head.

    The layer slices are copies of num_layers / L of the layer weights; embedding, norm and head
    are shared with the target.
    """
    if not 1 <= num_layers < cfg.num_layers:
        raise DraftError(f"an early-exit draft needs 1 <= num_layers < {cfg.num_layers} (the target's "
                         f"depth), got {num_layers}")
    draft = {k: v for k, v in params.items() if k != "layers"}
    draft["layers"] = jax.tree.map(lambda w: w[:num_layers], params["layers"])
    return draft, cfg.replace(num_layers=num_layers)


def ngram_propose(context_BxS: jax.Array, lens_B: jax.Array, gamma: int, *, max_ngram: int = 3,
                  min_ngram: int = 1) -> tuple[jax.Array, jax.Array]:
    """Prompt-lookup proposals: (tokens_BxG int32, draft_len_B int32; 0 where nothing matched).

    For the longest n in [min_ngram, max_ngram] whose suffix context[len-n:len] occurred earlier,
    take its latest earlier occurrence j (j + n < len) and propose context[j+n : j+n+gamma], cut at
    the context's end. Positions past draft_len hold 0 and must be ignored.
    """
    if not 1 <= min_ngram <= max_ngram:
        raise DraftError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
    if gamma < 1:
        raise DraftError(f"gamma must be >= 1, got {gamma}")
    B, S = context_BxS.shape
    j_S = jnp.arange(S, dtype=jnp.int32)
    start_B = jnp.full((B,), -1, jnp.int32)
    found_B = jnp.zeros((B,), bool)
    for n in range(max_ngram, min_ngram - 1, -1):
        match_BxS = (j_S[None, :] + n < lens_B[:, None]) & (lens_B[:, None] >= n + 1)
        for i in range(n):
            suffix_B = jnp.take_along_axis(context_BxS, jnp.maximum(lens_B - n + i, 0)[:, None], axis=1)
            shifted = jnp.take(context_BxS, jnp.minimum(j_S + i, S - 1), axis=1)
            match_BxS &= shifted == suffix_B
        latest_B = jnp.max(jnp.where(match_BxS, j_S[None, :], -1), axis=1)
        use = ~found_B & (latest_B >= 0)
        start_B = jnp.where(use, latest_B + n, start_B)
        found_B |= use
    g_G = jnp.arange(gamma, dtype=jnp.int32)
    idx_BxG = jnp.clip(start_B[:, None] + g_G[None, :], 0, S - 1)
    tokens = jnp.take_along_axis(context_BxS, idx_BxG, axis=1)
    draft_len = jnp.where(found_B, jnp.minimum(gamma, lens_B - start_B), 0).astype(jnp.int32)
    tokens = jnp.where(g_G[None, :] < draft_len[:, None], tokens, 0).astype(jnp.int32)
    return tokens, draft_len


def ngram_propose_host(context: Sequence[int] | np.ndarray, gamma: int, *, max_ngram: int = 3,
                       min_ngram: int = 1) -> np.ndarray:
    """`ngram_propose` for one request's context on the host (numpy): the proposed tokens, between
    0 and `gamma` of them (int32)."""
    ctx = np.asarray(context, np.int32)
    S = len(ctx)
    if gamma < 1:
        return np.zeros(0, np.int32)
    for n in range(max_ngram, min_ngram - 1, -1):
        if S < n + 1:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(ctx[:S - 1], n)  # windows[j] = ctx[j:j+n], j+n < S
        hits = np.flatnonzero((windows == ctx[S - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return ctx[start:start + gamma].copy()
    return np.zeros(0, np.int32)


def one_hot_probs(tokens_BxG: jax.Array, vocab_size: int) -> jax.Array:
    """q of a deterministic draft: [B, G, V] one-hot float32."""
    return jax.nn.one_hot(tokens_BxG, vocab_size, dtype=jnp.float32)
