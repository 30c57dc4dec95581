"""Exact speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding", Algorithm 1; the same rule as Chen et al. 2023).

A draft proposes tokens x_1..x_G, sampled from its distributions q_1..q_G; the target scores the
G + 1 positions at once and gives p_1..p_{G+1}. Token i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection n the next token is drawn from the residual
norm(max(0, p_n - q_n)); when all G are accepted, a bonus token is drawn from p_{G+1}. Every step
emits between 1 and G + 1 tokens, and the emitted sequence is distributed exactly as if the target
had sampled it token by token (`tests/test_speculative.py` checks this statistically).

Deterministic drafts (n-gram lookup, greedy early exit) use one-hot q: accept x with probability
p(x); the residual is p with x removed. Greedy decoding (temperature 0) is the special case where p
is one-hot too: accept iff x is the target's argmax, and the next token is the argmax.

Everything here is pure and batched over requests ([B, ...]) with per-row draft lengths, so the
engine can call it inside its jitted verify step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def probs_from_logits(logits_BxTxV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array,
                      top_p_B: jax.Array) -> jax.Array:
    """The distribution `jaxsys.sampling.sample` draws from, per row and position: [B, T, V] float32.

    Temperature 0 gives the one-hot argmax. top_k 0 means no top-k cut; top_p 1 means no nucleus
    cut (a token is kept while the mass strictly before it, in sorted order, is below top_p).
    Speculative sampling must use the same transformed p and q as plain sampling, or its output
    follows a different distribution than the non-speculative path.
    """
    logits = logits_BxTxV.astype(jnp.float32)
    V = logits.shape[-1]
    temp = temperature_B[:, None, None]
    scaled = logits / jnp.where(temp > 0, temp, 1.0)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_l = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V, dtype=jnp.int32)[None, None, :]
    keep = (top_k_B[:, None, None] <= 0) | (rank < top_k_B[:, None, None])
    probs = jax.nn.softmax(jnp.where(keep, sorted_l, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep &= before < top_p_B[:, None, None]
    sorted_p = jax.nn.softmax(jnp.where(keep, sorted_l, -jnp.inf), axis=-1)
    inverse = jnp.argsort(order, axis=-1)
    sampled = jnp.take_along_axis(sorted_p, inverse, axis=-1)
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), V, dtype=jnp.float32)
    return jnp.where(temp > 0, sampled, greedy)


def _sample_rows(key: jax.Array, probs_BxV: jax.Array) -> jax.Array:
    keys = jax.random.split(key, probs_BxV.shape[0])
    logp = jnp.log(jnp.maximum(probs_BxV, 0.0))
    return jax.vmap(jax.random.categorical)(keys, logp).astype(jnp.int32)


def verify_draft(key: jax.Array, draft_tokens_BxG: jax.Array, draft_probs_BxGxV: jax.Array,
                 target_probs_BxG1xV: jax.Array, draft_len_B: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """Accept a prefix of each row's draft and draw the token that follows it.

    draft_tokens_BxG: int32 proposals. draft_probs_BxGxV: q at each proposal (one-hot for
    deterministic drafts). target_probs_BxG1xV: p at the G + 1 verified positions (position i scores
    the token after the context plus proposals 0..i-1). draft_len_B: proposals that are real per row
    (default G); the rest are ignored, so rows with shorter or empty drafts share one step.

    Returns (num_accepted_B, next_token_B): the row emits draft_tokens[:num_accepted] then next_token.
    """
    B, G = draft_tokens_BxG.shape
    if draft_len_B is None:
        draft_len_B = jnp.full((B,), G, jnp.int32)
    k_accept, k_next = jax.random.split(key)
    p_x = jnp.take_along_axis(target_probs_BxG1xV[:, :G], draft_tokens_BxG[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(draft_probs_BxGxV, draft_tokens_BxG[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_accept, (B, G))
    accept_BxG = (u * q_x < p_x) & (jnp.arange(G)[None, :] < draft_len_B[:, None])
    n_B = jnp.sum(jnp.cumprod(accept_BxG.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    p_n = jnp.take_along_axis(target_probs_BxG1xV, n_B[:, None, None], axis=1)[:, 0]
    q_pad = jnp.concatenate([draft_probs_BxGxV, jnp.zeros_like(draft_probs_BxGxV[:, :1])], axis=1)
    q_n = jnp.take_along_axis(q_pad, n_B[:, None, None], axis=1)[:, 0]
    rejected = (n_B < draft_len_B)[:, None]
    residual = jnp.maximum(p_n - jnp.where(rejected, q_n, 0.0), 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    # mass 0 happens only where p_n == q_n exactly, where a rejection has probability 0
    dist = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_n)
    return n_B, _sample_rows(k_next, dist)


def greedy_accept(draft_tokens_BxG: jax.Array, draft_len_B: jax.Array, target_logits_BxG1xV: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """`verify_draft` for greedy decoding, without probabilities: (num_accepted_B, next_token_B).

    A proposal is accepted while it equals the target's argmax; the next token is the argmax after
    the accepted prefix. The same tokens as decoding the target greedily one token at a time.
    """
    G = draft_tokens_BxG.shape[1]
    best_BxG1 = jnp.argmax(target_logits_BxG1xV, axis=-1).astype(jnp.int32)
    ok_BxG = (draft_tokens_BxG == best_BxG1[:, :G]) & (jnp.arange(G)[None, :] < draft_len_B[:, None])
    n_B = jnp.sum(jnp.cumprod(ok_BxG.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    return n_B, jnp.take_along_axis(best_BxG1, n_B[:, None], axis=1)[:, 0]


def expected_tokens_per_step(acceptance: float, gamma: int) -> float:
    """Tokens one verify step emits on average when each proposal is accepted independently with
    probability `acceptance`: (1 - a^(g+1)) / (1 - a) (Leviathan et al. 2023, eq. 1)."""
    a = float(acceptance)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return float(gamma + 1) if a == 1.0 else (1.0 - a ** (gamma + 1)) / (1.0 - a)
