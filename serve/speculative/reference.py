"""A non-engine speculative decoding loop over cache-free forwards, for tests and statistics.

The serving engine verifies over its paged KV cache; this loop recomputes every forward over the
whole right-padded context instead (`LogitsFn`: tokens [B, S] -> causal logits [B, S, V]), which is
slow but has no cache to roll back, so it is the reference the engine's speculative path is tested
against and the tool that measures a draft's acceptance on a real model before the engine has one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.serve.speculative.acceptance import probs_from_logits, verify_draft
from jaxsys.serve.speculative.drafts import DraftError, ngram_propose, one_hot_probs

LogitsFn = Callable[[jax.Array], jax.Array]


class Sampling(NamedTuple):
    """Per-row sampling arrays ([B]); temperature 0 is greedy (see `probs_from_logits`). A pytree."""

    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array

    @classmethod
    def uniform(cls, batch: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> "Sampling":
        return cls(jnp.full((batch,), temperature, jnp.float32), jnp.full((batch,), top_k, jnp.int32),
                   jnp.full((batch,), top_p, jnp.float32))


def _at(x_BxSxV: jax.Array, pos_BxG: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_BxSxV, pos_BxG[..., None], axis=1)


def _probs(logits_BxGxV: jax.Array, s: Sampling) -> jax.Array:
    return probs_from_logits(logits_BxGxV, s.temperature_B, s.top_k_B, s.top_p_B)


def draft_with_model(key: jax.Array, draft_fn: LogitsFn, context_BxS: jax.Array, lens_B: jax.Array,
                     gamma: int, sampling: Sampling) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sample `gamma` tokens autoregressively from a draft model: (context with them written after
    each row's length, tokens_BxG, q_BxGxV)."""
    B = context_BxS.shape[0]
    rows = jnp.arange(B)
    toks, qs = [], []
    for i, k in enumerate(jax.random.split(key, gamma)):
        pos_B = lens_B - 1 + i
        q_BxV = _probs(_at(draft_fn(context_BxS), pos_B[:, None]), sampling)[:, 0]
        x_B = jax.vmap(jax.random.categorical)(jax.random.split(k, B), jnp.log(q_BxV)).astype(jnp.int32)
        context_BxS = context_BxS.at[rows, pos_B + 1].set(x_B)
        toks.append(x_B)
        qs.append(q_BxV)
    return context_BxS, jnp.stack(toks, axis=1), jnp.stack(qs, axis=1)


def speculative_step(key: jax.Array, target_fn: LogitsFn, context_BxS: jax.Array, lens_B: jax.Array,
                     active_B: jax.Array, gamma: int, sampling: Sampling, *, draft_fn: LogitsFn | None = None,
                     max_ngram: int = 3) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One draft + verify step. draft_fn None means n-gram prompt lookup.

    Returns (context, lens, accepted_B, proposed_B); inactive rows are left unchanged. The buffer
    needs room for gamma + 1 more tokens past every active row's length.
    """
    B, S = context_BxS.shape
    k_draft, k_verify = jax.random.split(key)
    V = None
    if draft_fn is None:
        draft_BxG, draft_len_B = ngram_propose(context_BxS, lens_B, gamma, max_ngram=max_ngram)
        rows = jnp.arange(B)[:, None]
        pos_BxG = lens_B[:, None] + jnp.arange(gamma)[None, :]
        ctx = context_BxS.at[rows, jnp.minimum(pos_BxG, S - 1)].set(draft_BxG)
    else:
        ctx, draft_BxG, q_BxGxV = draft_with_model(k_draft, draft_fn, context_BxS, lens_B, gamma, sampling)
        draft_len_B = jnp.full((B,), gamma, jnp.int32)
    logits = target_fn(ctx)
    V = logits.shape[-1]
    if draft_fn is None:
        q_BxGxV = one_hot_probs(draft_BxG, V)
    p_BxG1xV = _probs(_at(logits, lens_B[:, None] - 1 + jnp.arange(gamma + 1)[None, :]), sampling)
    n_B, next_B = verify_draft(k_verify, draft_BxG, q_BxGxV, p_BxG1xV, draft_len_B)
    ctx = ctx.at[jnp.arange(B), lens_B + n_B].set(next_B)
    new_ctx = jnp.where(active_B[:, None], ctx, context_BxS)
    new_lens = jnp.where(active_B, lens_B + n_B + 1, lens_B)
    return new_ctx, new_lens, jnp.where(active_B, n_B, 0), jnp.where(active_B, draft_len_B, 0)


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    steps: int  # verify steps of the batch
    row_steps: int  # verify steps summed over rows (a row stops once it has its tokens)
    new_tokens_B: np.ndarray
    accepted: int  # draft tokens accepted, all rows
    proposed: int  # draft tokens proposed, all rows

    @property
    def acceptance(self) -> float:
        """Accepted / proposed draft tokens (the empirical per-token acceptance)."""
        return self.accepted / max(self.proposed, 1)

    @property
    def tokens_per_step(self) -> float:
        return float(self.new_tokens_B.sum()) / max(self.row_steps, 1)


def generate_speculative(key: jax.Array, target_fn: LogitsFn, prompt_BxS: np.ndarray, prompt_lens_B: np.ndarray,
                         num_tokens: int, gamma: int, sampling: Sampling, *, draft_fn: LogitsFn | None = None,
                         max_ngram: int = 3, step_fn: Callable | None = None) -> tuple[np.ndarray, ReferenceStats]:
    """Generate at least `num_tokens` tokens per row by speculative steps; returns (the first
    num_tokens new tokens [B, num_tokens], stats). `step_fn`: a jitted `speculative_step` to reuse."""
    if gamma < 1:
        raise DraftError(f"gamma must be >= 1, got {gamma}")
    B, P = prompt_BxS.shape
    S = int(np.max(prompt_lens_B)) + num_tokens + gamma + 1
    ctx = jnp.zeros((B, S), jnp.int32).at[:, :P].set(jnp.asarray(prompt_BxS, jnp.int32))
    lens = jnp.asarray(prompt_lens_B, jnp.int32)
    step = step_fn or jax.jit(speculative_step, static_argnames=("target_fn", "gamma", "draft_fn", "max_ngram"))
    start = np.asarray(prompt_lens_B)
    accepted = proposed = steps = row_steps = 0
    while True:
        active = np.asarray(lens) - start < num_tokens
        if not active.any():
            break
        key, k = jax.random.split(key)
        ctx, lens, n_B, prop_B = step(k, target_fn, ctx, lens, jnp.asarray(active), gamma, sampling,
                                      draft_fn=draft_fn, max_ngram=max_ngram)
        steps += 1
        row_steps += int(active.sum())
        accepted += int(jnp.sum(n_B))
        proposed += int(jnp.sum(prop_B))
    ctx_np = np.asarray(ctx)
    out = np.stack([ctx_np[b, start[b]:start[b] + num_tokens] for b in range(B)])
    new_tokens = np.asarray(lens) - start
    return out, ReferenceStats(steps=steps, new_tokens_B=new_tokens, accepted=accepted, proposed=proposed,
                               row_steps=row_steps)


def generate_plain(key: jax.Array, target_fn: LogitsFn, prompt_BxS: np.ndarray, prompt_lens_B: np.ndarray,
                   num_tokens: int, sampling: Sampling) -> np.ndarray:
    """Token-by-token sampling from the target over the same cache-free forward: [B, num_tokens]."""
    B, P = prompt_BxS.shape
    S = int(np.max(prompt_lens_B)) + num_tokens
    ctx = jnp.zeros((B, S), jnp.int32).at[:, :P].set(jnp.asarray(prompt_BxS, jnp.int32))
    lens = jnp.asarray(prompt_lens_B, jnp.int32)

    @jax.jit
    def one(k, ctx, lens):
        p_BxV = _probs(_at(target_fn(ctx), lens[:, None] - 1), sampling)[:, 0]
        x = jax.vmap(jax.random.categorical)(jax.random.split(k, B), jnp.log(p_BxV)).astype(jnp.int32)
        return ctx.at[jnp.arange(B), lens].set(x), lens + 1

    for k in jax.random.split(key, num_tokens):
        ctx, lens = one(k, ctx, lens)
    ctx_np, start = np.asarray(ctx), np.asarray(prompt_lens_B)
    return np.stack([ctx_np[b, start[b]:start[b] + num_tokens] for b in range(B)])


def acceptance_along(target_logits_BxTxV: jax.Array, draft_logits_BxTxV: jax.Array, valid_BxT: jax.Array,
                     temperature: float) -> dict[str, jax.Array]:
    """Per-token acceptance of a draft along a fixed sequence (teacher forcing): the expected
    acceptance sum_v min(p, q) = 1 - TV(p, q) when sampling at `temperature` (no top-k / top-p
    cut), and the greedy agreement rate."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    p = jax.nn.softmax(target_logits_BxTxV.astype(jnp.float32) / temperature, axis=-1)
    q = jax.nn.softmax(draft_logits_BxTxV.astype(jnp.float32) / temperature, axis=-1)
    w = valid_BxT.astype(jnp.float32)
    sampled = jnp.sum(jnp.minimum(p, q).sum(-1) * w) / jnp.sum(w)
    greedy = jnp.sum((jnp.argmax(target_logits_BxTxV, -1) == jnp.argmax(draft_logits_BxTxV, -1)) * w) / jnp.sum(w)
    return {"sampled": sampled, "greedy": greedy}
