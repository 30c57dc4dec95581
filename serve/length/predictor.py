"""Remaining-length predictors: ours (a small head on the decode hidden state) and the baselines.

Every predictor answers the same question at the same moments: a request has generated `g` tokens
(g = 0 at prefill, then every k decode steps); how many more will it generate? The test MAE is
over every logged step of every test generation (a long request is asked more often, as a
rescheduler asks it), in tokens, and the prediction is clipped to [0, max_new_tokens - g], which
every predictor knows.

- ours (`hidden`): an MLP with one small hidden layer on the decode hidden state (the chosen
  layer's residual, or the final-norm hidden) plus two progress features of g. Re-applied every
  k steps, it reads what the model is writing now. Optionally it reads an exponential moving
  average of the hidden states it has been given (`ema`: state <- ema * state + (1 - ema) * h at
  each re-prediction): one token's state is noisy, a running mean over the last few re-predictions
  is less so, and it costs D floats per running request.
- prompt-only (`prompt`): a larger MLP on the prompt's pooled hidden states (mean and last
  position of the chosen layer and of the final norm, computed once at prefill), standing in for
  S3 / mu-Serve-style auxiliary predictors. Two ways to use it at step g: `prompt_total` predicts
  the total length at prefill and reports total - g (S3's use); `prompt_progress` also sees g's
  progress features, so it can condition on how far the request has come (a stronger baseline).
- `source_mean` / `source_median`: the training set's mean / median total length per prompt
  source, minus g; `source_median_given_g`: the training set's median remaining length per source
  and g bucket.

Training: optax AdamW on an L1 loss (MAE is the metric; L1 targets the conditional median, the
MAE-optimal point), inputs standardised on the training split, remaining length scaled by
max_new_tokens, a few epochs with the best dev-MAE epoch kept. Each learned predictor gets the
same small grid (hidden width x learning rate), chosen on dev; the test split is read once, at
the end. Parameter counts are of the chosen heads.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxsys.serve.length.data import SOURCES, SPLITS, LengthData
from jaxsys.shapes import pow2_bucket

__all__ = ["DEFAULT_HEADS", "G_BUCKETS", "PROGRESS_BUCKETS", "HeadSpec", "LengthPredictor", "PredictorReport",
           "UntrainedPredictorError", "fit_predictors", "input_matrix", "progress_features"]

G_BUCKETS = ((0, 1), (1, 64), (64, 128), (128, 256), (256, 10**9))  # tokens generated so far
PROGRESS_BUCKETS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0001))  # g / final length


class UntrainedPredictorError(RuntimeError):
    """The predictor has no trained parameters (load one or fit one first)."""


def progress_features(g_N: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """[N, 2]: g / max_new_tokens and log1p(g) / log1p(max_new_tokens)."""
    g = np.asarray(g_N, np.float32)
    return np.stack([g / max_new_tokens, np.log1p(g) / math.log1p(max_new_tokens)], axis=1)


# ---------------------------------------------------------------------------------------------
# The MLP head (a plain pytree: [(w_FxH, b_H), ..., (w_Hx1, b_1)])


def _init_mlp(key, sizes: Sequence[int]) -> list[tuple[Any, Any]]:
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(key, len(sizes) - 1)
    return [(jax.random.normal(k, (a, b), jnp.float32) * math.sqrt(2.0 / a), jnp.zeros((b,), jnp.float32))
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def _mlp(params, x_NxF):
    import jax

    for w_FxH, b_H in params[:-1]:
        x_NxF = jax.nn.gelu(x_NxF @ w_FxH + b_H[None, :])
    w_Hx1, b_1 = params[-1]
    return (x_NxF @ w_Hx1 + b_1[None, :])[:, 0]


def _count(params) -> int:
    return int(sum(np.prod(w.shape) + np.prod(b.shape) for w, b in params))


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """One learned predictor: which inputs, and the grid it is tuned over (same size for all)."""

    name: str
    inputs: str  # "hidden_layer" | "hidden_final" | "prompt" (+ progress features unless prompt_total)
    widths: tuple[int, ...]  # candidate hidden widths (one hidden layer each)
    progress: bool = True  # append progress features of g to the inputs
    learning_rates: tuple[float, ...] = (1e-3, 3e-3)
    emas: tuple[float, ...] = (0.0,)  # candidate smoothing factors of the hidden-state inputs
    epochs: int = 30
    batch_size: int = 256
    weight_decay: float = 1e-4


# Every learned head is tuned over 6 configurations on dev.
DEFAULT_HEADS = (
    HeadSpec("ours_layer", "hidden_layer", widths=(32, 64, 128), learning_rates=(3e-3,), emas=(0.0, 0.85)),
    HeadSpec("ours_final", "hidden_final", widths=(32, 64, 128), learning_rates=(3e-3,), emas=(0.0, 0.85)),
    HeadSpec("prompt_progress", "prompt", widths=(256, 512, 1024)),
    HeadSpec("prompt_total", "prompt", widths=(256, 512, 1024), progress=False),
)


@dataclasses.dataclass
class LengthPredictor:
    """A trained head (or none: `params is None`). `predict` returns remaining tokens, clipped to
    [0, max_new_tokens - g].

    For serving, every k decode steps with the engine's hidden states (inputs "hidden_layer" or
    "hidden_final"; the engine must return the same vector the data recorded, see
    `jaxsys.serve.length.data`):

        state_BxD = pred.smooth(state_BxD, hidden_BxD)     # None for a request's first call
        remaining_B = pred.predict_hidden(state_BxD, g_B)
    """

    name: str
    inputs: str
    progress: bool
    max_new_tokens: int
    params: list[tuple[Any, Any]] | None = None
    x_mean: np.ndarray | None = None
    x_std: np.ndarray | None = None
    hidden_layer: int | None = None  # the layer the data's "hidden_layer" was taken from
    ema: float = 0.0  # smoothing of the hidden-state inputs across re-predictions (0: none)

    def smooth(self, state_BxD: np.ndarray | None, hidden_BxD: np.ndarray) -> np.ndarray:
        """The input state after one more re-prediction (rows of a new request: pass its hidden
        state as the state, or None for the whole batch)."""
        h = np.asarray(hidden_BxD, np.float32)
        if state_BxD is None or self.ema == 0.0:
            return h
        return self.ema * np.asarray(state_BxD, np.float32) + (1.0 - self.ema) * h

    def predict_data(self, data: LengthData, mask: np.ndarray | None = None) -> np.ndarray:
        """Predicted remaining length of every logged step of `data` (or those in `mask`), each
        generation's inputs smoothed in order as they would be while it is served."""
        x = input_matrix(data, self.inputs, self.ema)
        if mask is None:
            return self.predict_features(x, data.g)
        return self.predict_features(x[mask], data.g[mask])

    @property
    def trained(self) -> bool:
        return self.params is not None

    @property
    def num_params(self) -> int:
        return _count(self.params) if self.params is not None else 0

    def _apply(self, x_NxF: np.ndarray) -> np.ndarray:
        """The head on N rows, padded to a power-of-two row count: serving calls it with every
        batch size, and one compiled program per bucket keeps a warmed server from compiling."""
        x = (np.asarray(x_NxF, np.float32) - self.x_mean) / self.x_std
        N = len(x)
        x_pad = np.zeros((pow2_bucket(N), x.shape[1]), np.float32)
        x_pad[:N] = x
        return np.asarray(_jit_mlp()(self.params, x_pad))[:N] * self.max_new_tokens

    def predict_features(self, x_NxF: np.ndarray, g_N: np.ndarray) -> np.ndarray:
        """Remaining tokens from the raw inputs (hidden [N, D] or prompt features [N, 4D]) and g."""
        if self.params is None:
            raise UntrainedPredictorError(f"predictor {self.name!r} has no trained parameters")
        g = np.asarray(g_N)
        x = np.asarray(x_NxF, np.float32)
        if x.ndim != 2 or len(x) != len(g):
            raise ValueError(f"expected features [N, F] and g [N], got {x.shape} and {g.shape}")
        expected = len(self.x_mean) - (2 if self.progress else 0)
        if x.shape[1] != expected:
            raise ValueError(f"predictor {self.name!r} takes {expected} input features, got {x.shape[1]}")
        if self.progress:
            x = np.concatenate([x, progress_features(g, self.max_new_tokens)], axis=1)
        pred = self._apply(x)
        if not self.progress:  # a total length at prefill: what is left of it after g tokens
            pred = pred - g
        return np.clip(pred, 0, np.maximum(self.max_new_tokens - g, 0))

    def predict_hidden(self, hidden_BxD: np.ndarray, g_B: np.ndarray) -> np.ndarray:
        if self.inputs not in ("hidden_layer", "hidden_final"):
            raise ValueError(f"predictor {self.name!r} reads {self.inputs}, not decode hidden states")
        return self.predict_features(hidden_BxD, g_B)

    def save(self, path: str | Path) -> None:
        if self.params is None:
            raise UntrainedPredictorError(f"predictor {self.name!r} has no trained parameters to save")
        arrays = {f"w{i}": np.asarray(w) for i, (w, _) in enumerate(self.params)}
        arrays.update({f"b{i}": np.asarray(b) for i, (_, b) in enumerate(self.params)})
        meta = dict(name=self.name, inputs=self.inputs, progress=self.progress, max_new_tokens=self.max_new_tokens,
                    hidden_layer=-1 if self.hidden_layer is None else self.hidden_layer, layers=len(self.params),
                    ema=self.ema)
        np.savez(path, x_mean=self.x_mean, x_std=self.x_std, meta=np.array(repr(meta)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "LengthPredictor":
        import ast

        with np.load(path) as z:
            meta = ast.literal_eval(str(z["meta"]))
            params = [(z[f"w{i}"], z[f"b{i}"]) for i in range(meta["layers"])]
            return cls(name=meta["name"], inputs=meta["inputs"], progress=meta["progress"],
                       max_new_tokens=meta["max_new_tokens"], params=params, x_mean=z["x_mean"], x_std=z["x_std"],
                       hidden_layer=None if meta["hidden_layer"] < 0 else meta["hidden_layer"], ema=meta["ema"])


_MLP_JIT = None


def _jit_mlp():
    global _MLP_JIT
    if _MLP_JIT is None:
        import jax

        _MLP_JIT = jax.jit(_mlp)
    return _MLP_JIT


# ---------------------------------------------------------------------------------------------
# Training


def _ema_by_generation(data: LengthData, x_NxF: np.ndarray, ema: float) -> np.ndarray:
    """Each sample's inputs replaced by the moving average over its generation's earlier samples
    (in order of g), as `LengthPredictor.smooth` keeps it while serving."""
    out = np.empty_like(x_NxF)
    order = np.lexsort((data.g, data.gen))
    first = np.ones(len(order), bool)
    first[1:] = data.gen[order][1:] != data.gen[order][:-1]
    acc = None
    for pos, i in enumerate(order):
        acc = x_NxF[i].copy() if first[pos] else ema * acc + (1.0 - ema) * x_NxF[i]
        out[i] = acc
    return out


def input_matrix(data: LengthData, inputs: str, ema: float = 0.0) -> np.ndarray:
    """The raw inputs of a predictor for every sample of `data` (before progress features)."""
    if inputs == "prompt":
        return data.prompt_features[data.gen_prompt[data.gen]]
    if inputs not in ("hidden_layer", "hidden_final"):
        raise ValueError(f"unknown predictor inputs {inputs!r}")
    x = getattr(data, inputs)
    return _ema_by_generation(data, x, ema) if ema else x


def _train_one(x_tr, y_tr, x_dev, y_dev, g_dev, cap_dev, width: int, lr: float, spec: HeadSpec, max_new: int,
               seed: int):
    """Returns (params at the best dev epoch, that dev MAE in tokens)."""
    import jax
    import jax.numpy as jnp
    import optax

    params = _init_mlp(jax.random.key(seed), (x_tr.shape[1], width, 1))
    params[-1] = (params[-1][0] * 0.1, jnp.full((1,), np.median(y_tr), jnp.float32))  # start at the median
    opt = optax.adamw(lr, weight_decay=spec.weight_decay)
    state = opt.init(params)
    n = len(x_tr)
    bs = min(spec.batch_size, n)
    steps = n // bs

    def loss_fn(p, x, y):
        return jnp.mean(jnp.abs(_mlp(p, x) - y))

    @jax.jit
    def epoch(p, s, x_all, y_all, perm):
        def body(carry, idx):
            p, s = carry
            grads = jax.grad(loss_fn)(p, x_all[idx], y_all[idx])
            upd, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, upd), s), None

        (p, s), _ = jax.lax.scan(body, (p, s), perm[:steps * bs].reshape(steps, bs))
        return p, s

    x_all, y_all = jnp.asarray(x_tr), jnp.asarray(y_tr)
    x_dev_j = jnp.asarray(x_dev)
    rng = np.random.default_rng(seed)
    best, best_mae = params, float("inf")
    for _ in range(spec.epochs):
        params, state = epoch(params, state, x_all, y_all, rng.permutation(n).astype(np.int32))
        pred = np.asarray(_jit_mlp()(params, x_dev_j)) * max_new
        if not spec.progress:
            pred = pred - g_dev
        mae = float(np.mean(np.abs(np.clip(pred, 0, cap_dev) - y_dev)))
        if mae < best_mae:
            best, best_mae = jax.tree.map(np.asarray, params), mae
    return best, best_mae


def train_head(data: LengthData, spec: HeadSpec, *, seed: int = 0) -> tuple[LengthPredictor, dict]:
    """Fit `spec` on the train split, choose width, learning rate and smoothing on dev. Returns the
    predictor and the grid's dev MAEs."""
    split = data.sample_split()
    tr, dev = split == SPLITS.index("train"), split == SPLITS.index("dev")
    if not tr.any() or not dev.any():
        raise ValueError("training a length predictor needs samples in both the train and dev splits")
    max_new = data.max_new_tokens
    target = data.remaining if spec.progress else data.gen_len[data.gen]  # prompt_total learns the total
    y = (target / max_new).astype(np.float32)
    if not spec.progress:  # one row per generation is all a prefill-time predictor can learn from
        first = np.zeros(len(data.g), bool)
        first[np.unique(data.gen, return_index=True)[1]] = True
        tr = tr & first
    cap_dev = np.maximum(max_new - data.g[dev], 0)
    grid = {}
    best = None
    for ema in spec.emas:
        x = input_matrix(data, spec.inputs, ema)
        if spec.progress:
            x = np.concatenate([x, progress_features(data.g, max_new)], axis=1)
        x_mean = x[tr].mean(0)
        x_std = x[tr].std(0) + 1e-6
        xs = ((x - x_mean) / x_std).astype(np.float32)
        for width in spec.widths:
            for lr in spec.learning_rates:
                params, mae = _train_one(xs[tr], y[tr], xs[dev], data.remaining[dev], data.g[dev], cap_dev, width,
                                         lr, spec, max_new, seed)
                key = f"width={width},lr={lr:g}" + (f",ema={ema:g}" if len(spec.emas) > 1 else "")
                grid[key] = mae
                if best is None or mae < best[1]:
                    best = (params, mae, x_mean, x_std, ema)
    params, _, x_mean, x_std, ema = best
    pred = LengthPredictor(spec.name, spec.inputs, spec.progress, max_new, params=params, x_mean=x_mean,
                           x_std=x_std, hidden_layer=data.hidden_layer_index, ema=ema)
    return pred, grid


# ---------------------------------------------------------------------------------------------
# Evaluation


def _breakdown(err: np.ndarray, data: LengthData, mask: np.ndarray) -> dict[str, Any]:
    g = data.g[mask]
    frac = g / np.maximum(data.gen_len[data.gen[mask]], 1)
    out: dict[str, Any] = {"mae": float(err.mean()), "n": int(len(err))}
    out["by_g"] = {f"{lo}-{hi - 1 if hi < 10**9 else 'max'}": float(err[(g >= lo) & (g < hi)].mean())
                   for lo, hi in G_BUCKETS if ((g >= lo) & (g < hi)).any()}
    out["by_progress"] = {f"{lo:.2f}-{min(hi, 1.0):.2f}": float(err[(frac >= lo) & (frac < hi)].mean())
                          for lo, hi in PROGRESS_BUCKETS if ((frac >= lo) & (frac < hi)).any()}
    src = data.sample_source()[mask]
    out["by_source"] = {s: float(err[src == i].mean()) for i, s in enumerate(SOURCES) if (src == i).any()}
    return out


def _source_stat_predictions(data: LengthData, stat: str) -> np.ndarray:
    tr_gen = data.prompt_split[data.gen_prompt] == SPLITS.index("train")
    gen_src = data.prompt_source[data.gen_prompt]
    fallback = getattr(np, stat)(data.gen_len[tr_gen])
    per = {s: getattr(np, stat)(data.gen_len[tr_gen & (gen_src == s)]) if (tr_gen & (gen_src == s)).any()
           else fallback for s in range(len(SOURCES))}
    total = np.array([per[s] for s in data.sample_source()], np.float32)
    return np.clip(total - data.g, 0, np.maximum(data.max_new_tokens - data.g, 0))


def _median_given_g(data: LengthData) -> np.ndarray:
    split, src = data.sample_split(), data.sample_source()
    bucket = np.digitize(data.g, [hi for _, hi in G_BUCKETS[:-1]])
    tr = split == SPLITS.index("train")
    out = np.zeros(len(data.g), np.float32)
    for s in range(len(SOURCES)):
        for b in range(len(G_BUCKETS)):
            cell = (src == s) & (bucket == b)
            ref = data.remaining[tr & cell]
            if not len(ref):
                ref = data.remaining[tr & (bucket == b)]
            if not len(ref):
                ref = data.remaining[tr]
            out[cell] = np.median(ref)
    return np.clip(out, 0, np.maximum(data.max_new_tokens - data.g, 0))


@dataclasses.dataclass
class PredictorReport:
    """Test MAE of every predictor (tokens), overall and by g / progress / source, with parameter counts."""

    rows: dict[str, dict[str, Any]]
    predictors: dict[str, LengthPredictor]
    data_summary: dict[str, Any]

    def best(self, names: Sequence[str]) -> str:
        return min(names, key=lambda n: self.rows[n]["test"]["mae"])

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "data": self.data_summary}


def fit_predictors(data: LengthData, heads: Sequence[HeadSpec] = DEFAULT_HEADS, *, seed: int = 0,
                   progress: bool = True) -> PredictorReport:
    """Train every head in `heads`, evaluate them and the source baselines on the test split."""
    split = data.sample_split()
    test = split == SPLITS.index("test")
    if not test.any():
        raise ValueError("the length data has no test-split samples yet (generate more prompts)")
    y = data.remaining[test]
    rows: dict[str, dict[str, Any]] = {}
    preds: dict[str, LengthPredictor] = {}
    for spec in heads:
        if progress:
            n = len(spec.widths) * len(spec.learning_rates) * len(spec.emas)
            print(f"  training {spec.name} ({n} configurations)", flush=True)
        pred, grid = train_head(data, spec, seed=seed)
        p = pred.predict_data(data, test)
        rows[spec.name] = {"kind": "learned", "inputs": spec.inputs, "progress_features": spec.progress,
                           "params": pred.num_params, "width": int(pred.params[0][0].shape[1]), "ema": pred.ema,
                           "dev_grid_mae": grid, "test": _breakdown(np.abs(p - y), data, test)}
        preds[spec.name] = pred
    for name, p in (("source_mean", _source_stat_predictions(data, "mean")),
                    ("source_median", _source_stat_predictions(data, "median")),
                    ("source_median_given_g", _median_given_g(data))):
        rows[name] = {"kind": "statistic", "params": 0, "test": _breakdown(np.abs(p[test] - y), data, test)}
    return PredictorReport(rows, preds, data.summary())


def warn_untrained(reason: str) -> None:
    """The one warning of the load-balancing fallback (issue 18 G)."""
    warnings.warn(f"remaining-length predictor unavailable ({reason}); balancing on current load only",
                  RuntimeWarning, stacklevel=3)
