"""Token sampling shared by `jaxsys.generate` and the serving engine: greedy, temperature, top-k,
top-p, per-request seeds. Parameters are per row, so one compiled step serves a mixed batch."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

MAX_STOP_STRINGS = 4  # as the OpenAI API


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 means no top-k cut; top_p 1.0 means no nucleus cut.

    ignore_eos keeps generating past end-of-sequence tokens until max_tokens (for benchmarks that
    must do the same work as a baseline).
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (0.0 <= float(self.temperature) <= 100.0):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or not (0 <= self.seed < 2**31):
            raise ValueError(f"seed must be an integer in [0, 2^31), got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")


def sample(logits_BxV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array,
           seed_B: jax.Array, step_B: jax.Array) -> jax.Array:
    """Next token per row. Rows with temperature 0 take the argmax. The random stream of a row
    depends only on (seed, step), so a request samples the same tokens in any batch."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def sampled(_):
        B, V = logits_BxV.shape
        t = jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
        scaled = logits_BxV / t
        order = jnp.argsort(-scaled, axis=-1)
        sorted_l = jnp.take_along_axis(scaled, order, axis=-1)
        rank = jnp.arange(V, dtype=jnp.int32)[None, :]
        keep = (top_k_B[:, None] <= 0) | (rank < top_k_B[:, None])
        probs = jax.nn.softmax(jnp.where(keep, sorted_l, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before this token
        keep &= before < top_p_B[:, None]
        masked = jnp.where(keep, sorted_l, -jnp.inf)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed_B, step_B)
        pick = jax.vmap(jax.random.categorical)(keys, masked)
        tok = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(temperature_B > 0, tok, greedy_B)

    return jax.lax.cond(jnp.any(temperature_B > 0), sampled, lambda _: greedy_B, None)


def batch_arrays(params: Sequence[SamplingParams], pad_to: int):
    """Host-side: per-row sampling arrays padded to `pad_to` rows (padding rows are greedy)."""
    import numpy as np

    n = len(params)
    temp = np.zeros(pad_to, np.float32)
    top_k = np.zeros(pad_to, np.int32)
    top_p = np.ones(pad_to, np.float32)
    seed = np.zeros(pad_to, np.int32)
    for i, p in enumerate(params[:n]):
        temp[i], top_k[i], top_p[i], seed[i] = p.temperature, p.top_k, p.top_p, p.seed
    return temp, top_k, top_p, seed


class StopMatcher:
    """Incremental stop-string matching over streamed text.

    `push(piece)` returns (text safe to emit now, stopped). Text that could still be the start of a
    stop string is held back until it is decided, so a stop string never leaks into a stream.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.text += piece
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            out = self.text[self.emitted:]
            self.emitted = len(self.text)
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        safe = len(self.text) - hold
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out, False

    def flush(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out
