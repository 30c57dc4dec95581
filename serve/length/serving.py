"""Remaining-length prediction inside the serving loop (ARES/STAR, issue 18 A).

A `LengthTracker` attached to a scheduler turns every k-th decode step into the engine's
`decode_with_hidden` step (the same step that also returns one layer's residual per row; the
other steps run the plain program), feeds each running request's hidden state to a trained head
(`LengthPredictor`, saved by `python -m jaxsys.serve.length.cli train`), and keeps per request the
predicted remaining length. Between refreshes a prediction counts down one per generated token,
as the simulator's prediction tables do (`jaxsys.serve.cluster.workload`).

The head reads exactly the vector the length data recorded (`jaxsys.serve.length.data`): the
residual after layer l, RMS-normalised without a gain ("hidden_layer"), or the final-norm hidden
state ("hidden_final", the residual after the last layer through the final RMSNorm).

How rows meet requests. The scheduler's decode step batches `scheduler.running` in order, pads the
rest, and calls `engine.decode`; the tracker stands in for the scheduler's engine (everything but
`decode` is passed through) and reads that order. It checks the contract on every hidden step (row
i's position is request i's last position, padded rows are -1) and raises if it is ever broken, so
a prediction can never be attributed to the wrong request.

Without a usable predictor (none given, or untrained) the tracker predicts nothing and warns once:
the router then balances on current load (issue 18 G).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxsys.serve.length.predictor import LengthPredictor, warn_untrained

__all__ = ["LengthTracker", "Prediction", "rms_normalise"]


def rms_normalise(h_BxD: np.ndarray, eps: float) -> np.ndarray:
    """x / rms(x) per row, in float32 (`jaxsys.models.layers.rms_norm` with a unit gain)."""
    h = np.asarray(h_BxD, np.float32)
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + np.float32(eps))


@dataclasses.dataclass
class Prediction:
    """A request's latest prediction: made after `g` generated tokens, `remaining` more predicted."""

    g: int
    remaining: float
    state: np.ndarray  # the head's (smoothed) input state [D]

    def remaining_at(self, generated: int) -> float:
        """Counted down by the tokens generated since the prediction."""
        return max(self.remaining - (generated - self.g), 0.0)


class LengthTracker:
    """Per-request remaining-length predictions from the engine's hidden states, every `every`
    decode steps. `attach(scheduler)` installs it; `remaining(request)` reads a prediction."""

    def __init__(self, predictor: LengthPredictor | None, *, every: int = 8):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.predictor = predictor
        reason = self.unusable_reason(predictor)
        self.active = reason is None
        if not self.active:
            warn_untrained(reason)
        self._predictions: dict[str, Prediction] = {}
        self.hidden_steps = 0
        self.predictions_made = 0
        self._scheduler = None

    @staticmethod
    def unusable_reason(predictor: LengthPredictor | None) -> str | None:
        """Why `predictor` cannot run in the serving loop (None: it can)."""
        if predictor is None:
            return "no predictor given"
        if not predictor.trained:
            return f"predictor {predictor.name!r} is untrained"
        if predictor.inputs not in ("hidden_layer", "hidden_final"):
            return f"predictor {predictor.name!r} reads {predictor.inputs}, not decode hidden states"
        if predictor.inputs == "hidden_layer" and predictor.hidden_layer is None:
            return f"predictor {predictor.name!r} does not say which layer it reads"
        return None

    # ------------------------------------------------------------------ wiring
    def attach(self, scheduler) -> None:
        """Make `scheduler` run its decode steps through this tracker (once)."""
        if self._scheduler is not None:
            raise RuntimeError("this tracker is already attached to a scheduler")
        self._scheduler = scheduler
        if self.active:
            cfg = scheduler.engine.cfg
            layer = cfg.num_layers if self.predictor.inputs == "hidden_final" else self.predictor.hidden_layer
            if not 1 <= layer <= cfg.num_layers:
                raise ValueError(f"predictor {self.predictor.name!r} reads layer {layer}; the model has "
                                 f"{cfg.num_layers}")
            self.layer = layer
            scheduler.engine = _TrackedEngine(scheduler.engine, self)

    @property
    def engine(self):
        """The scheduler's own engine (not the tracker's stand-in)."""
        eng = self._scheduler.engine
        return eng.inner if isinstance(eng, _TrackedEngine) else eng

    # ------------------------------------------------------------------ reading
    def remaining(self, request) -> float | None:
        """Predicted remaining tokens of a running request now (None before its first prediction)."""
        p = self._predictions.get(request.request_id)
        return None if p is None else p.remaining_at(len(request.out_tokens))

    def prediction(self, request_id: str) -> Prediction | None:
        return self._predictions.get(request_id)

    def forget(self, request_id: str) -> Prediction | None:
        """Drop a request's prediction (finished, or migrated away: see `adopt`)."""
        return self._predictions.pop(request_id, None)

    def adopt(self, request_id: str, prediction: Prediction | None) -> None:
        """Carry a prediction over from another instance's tracker (a migrated request)."""
        if prediction is not None:
            self._predictions[request_id] = prediction

    def stats(self) -> dict[str, Any]:
        return {"active": self.active, "every": self.every, "hidden_steps": self.hidden_steps,
                "predictions": self.predictions_made, "tracked": len(self._predictions)}

    # ------------------------------------------------------------------ the hidden step
    def _features(self, h_BxD: np.ndarray, engine) -> np.ndarray:
        cfg = engine.cfg
        x = rms_normalise(h_BxD, cfg.rms_norm_eps)
        if self.predictor.inputs == "hidden_final":
            x = x * np.asarray(engine.params["final_norm"], np.float32)[None, :]
        return x

    def _observe(self, batch: list, hidden_BxD: np.ndarray, engine) -> None:
        live = {r.request_id for r in self._scheduler.running} | {r.request_id for r in self._scheduler.prefilling}
        for rid in [rid for rid in self._predictions if rid not in live]:
            del self._predictions[rid]
        x = self._features(hidden_BxD[:len(batch)], engine)
        g = np.array([len(r.out_tokens) for r in batch], np.int64)
        states = np.stack([self.predictor.smooth(self._predictions[r.request_id].state[None], x[i:i + 1])[0]
                           if r.request_id in self._predictions else x[i] for i, r in enumerate(batch)])
        remaining = self.predictor.predict_hidden(states, g)
        for i, r in enumerate(batch):
            self._predictions[r.request_id] = Prediction(int(g[i]), float(remaining[i]), states[i])
        self.hidden_steps += 1
        self.predictions_made += len(batch)


class _TrackedEngine:
    """The scheduler's engine with every `every`-th decode step run by `decode_with_hidden`."""

    def __init__(self, inner, tracker: LengthTracker):
        self.inner = inner
        self._tracker = tracker
        self._steps = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, tokens_B, positions_B, page_table_BxP, kv_lens_B, sampling, shared=None):
        t = self._tracker
        due = self._steps % t.every == 0
        self._steps += 1
        if not due:
            return self.inner.decode(tokens_B, positions_B, page_table_BxP, kv_lens_B, sampling, shared)
        batch = list(t._scheduler.running)
        expected = np.full(max(len(positions_B), len(batch)), -1, np.int64)
        expected[:len(batch)] = [r.total_len - 1 for r in batch]
        if not np.array_equal(expected, positions_B):
            raise RuntimeError("the decode batch is not the scheduler's running list in order; "
                               "the length tracker cannot tell which row is which request")
        nxt, hidden = self.inner.decode_with_hidden(t.layer, tokens_B, positions_B, page_table_BxP, kv_lens_B,
                                                    sampling, shared)
        t._observe(batch, hidden, self.inner)
        return nxt
