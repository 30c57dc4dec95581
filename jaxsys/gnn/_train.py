"""Training and evaluation of CSGNN / KP-GNN / GIN: k-fold or one split, early stopping.

Design:
* The host builds structures once (cached on disk), then packs graphs into padded
  `jraph.GraphsTuple`s of one static shape per dataset (`GraphBatcher`).
* The train and eval steps are jitted and compiled ahead of time once per run
  (`jit(...).lower(...).compile()`); a compiled executable cannot silently recompile, so every
  batch of every split and fold runs the same program (`RunStats.compiles` counts compilations).
* The train state is donated; per-step dropout keys come from `fold_in(key, step)` inside the
  step; losses and metric sums stay on the device and are fetched once per epoch.
* Early stopping on the validation score (accuracy, ties broken by lower loss; or MAE), with the
  best parameters restored for the test evaluation.
* `train.test_curve` (k-fold) additionally scores the test fold after every epoch and trains on
  past the early stop, to report the protocol most published TU-dataset numbers use (Xu et al.,
  2019: the epoch with the best mean test score over the folds). That selects on test data, so
  it is reported next to, never instead of, the validation-selected result.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsys.gnn._batching import GraphBatcher
from jaxsys.gnn._config import GNNExperimentConfig
from jaxsys.gnn._datasets import Dataset, load_dataset
from jaxsys.gnn._models import GraphNet
from jaxsys.gnn._structures import dataset_relations

__all__ = ["Trainer", "kfold_splits", "random_split", "run_experiment", "best_mean_epoch"]


def kfold_splits(labels: np.ndarray | None, n: int, folds: int, seed: int
                 ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(train, val, test) index arrays per fold: test = fold i, val = fold i+1, train = rest.

    Folds are stratified by `labels` when given (classes are dealt round-robin after a shuffle).
    """
    rng = np.random.default_rng(seed)
    fold_of = np.empty(n, np.int64)
    if labels is None:
        perm = rng.permutation(n)
        fold_of[perm] = np.arange(n) % folds
    else:
        pos = 0
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            members = members[rng.permutation(members.shape[0])]
            fold_of[members] = (pos + np.arange(members.shape[0])) % folds
            pos += members.shape[0]
    out = []
    for i in range(folds):
        test = np.flatnonzero(fold_of == i)
        val = np.flatnonzero(fold_of == (i + 1) % folds)
        train = np.flatnonzero((fold_of != i) & (fold_of != (i + 1) % folds))
        out.append((train, val, test))
    return out


def random_split(n: int, fractions: tuple[float, float, float], seed: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_tr = int(round(fractions[0] * n))
    n_va = int(round(fractions[1] * n))
    return perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]


@dataclasses.dataclass
class RunStats:
    compiles: int = 0
    train_steps: int = 0
    train_graphs: int = 0
    train_seconds: float = 0.0


class Trainer:
    """Compiled train/eval steps for one model over one dataset's padded batch shape."""

    def __init__(self, model: GraphNet, batcher: GraphBatcher, *, regression: bool, loss: str,
                 lr_schedule: Callable, weight_decay: float, seed: int,
                 grad_clip: float | None = None):
        self.model = model
        self.batcher = batcher
        self.regression = regression
        self.loss_name = loss
        self.tx = optax.adamw(lr_schedule, weight_decay=weight_decay)
        if grad_clip is not None:
            self.tx = optax.chain(optax.clip_by_global_norm(grad_clip), self.tx)
        self.stats = RunStats()
        self.key = jax.random.key(seed)
        example = batcher.batch(np.arange(1))
        self.example = example
        self._train = None
        self._eval = None
        self._init = None

    # -- state ---------------------------------------------------------------------------------

    def init_state(self, seed: int) -> dict[str, Any]:
        if self._init is None:
            self._init = jax.jit(self.model.init)  # compiled once; eager init is much slower
        variables = self._init({"params": jax.random.key(seed),
                                "dropout": jax.random.key(seed + 1)}, self.example)
        params = variables["params"]
        return {"params": params, "batch_stats": variables.get("batch_stats", {}),
                "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}

    # -- steps ---------------------------------------------------------------------------------

    def _loss(self, out_GxO, y, mask_G):
        m = mask_G.astype(out_GxO.dtype)
        if self.loss_name == "cross_entropy":
            per = optax.softmax_cross_entropy_with_integer_labels(out_GxO, y)
        elif self.loss_name == "l1":
            per = jnp.abs(out_GxO - y).mean(axis=1)
        else:
            per = jnp.square(out_GxO - y).mean(axis=1)
        return jnp.sum(per * m), jnp.sum(m)

    def _train_step(self, state, graph):
        step_key = jax.random.fold_in(self.key, state["step"])
        mask = jax.lax.stop_gradient(_graph_mask(graph))

        def loss_fn(params):
            out, upd = self.model.apply(
                {"params": params, "batch_stats": state["batch_stats"]}, graph, train=True,
                rngs={"dropout": step_key}, mutable=["batch_stats"])
            total, count = self._loss(out, graph.globals["y"], mask)
            return total / jnp.maximum(count, 1.0), (upd, total, count)

        grads, (upd, total, count) = jax.grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "batch_stats": upd.get("batch_stats", {}),
                     "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, jnp.stack([total, count])

    def _eval_step(self, params, batch_stats, graph):
        out = self.model.apply({"params": params, "batch_stats": batch_stats}, graph, train=False)
        mask = _graph_mask(graph)
        y = graph.globals["y"]
        total, count = self._loss(out, y, mask)
        m = mask.astype(out.dtype)
        if self.regression:
            abs_err = jnp.sum(jnp.abs(out - y) * m.reshape(-1, 1), axis=0)  # [T]
            return jnp.concatenate([jnp.stack([total, count]), abs_err])
        correct = jnp.sum((jnp.argmax(out, axis=1) == y).astype(out.dtype) * m)
        return jnp.stack([total, count, correct])

    def compile(self, state) -> None:
        """Compile both steps once for the dataset's padded shape."""
        if self._train is None:
            self._train = jax.jit(self._train_step, donate_argnums=0).lower(
                state, self.example).compile()
            self._eval = jax.jit(self._eval_step).lower(
                state["params"], state["batch_stats"], self.example).compile()
            self.stats.compiles += 2

    # -- loops ---------------------------------------------------------------------------------

    def train_epoch(self, state, indices: np.ndarray, rng: np.random.Generator):
        self.compile(state)
        sums = []
        t0 = time.perf_counter()
        n = 0
        for ids in self.batcher.pack(indices[rng.permutation(indices.shape[0])].tolist()):
            state, s = self._train(state, self.batcher.batch(ids))
            sums.append(s)
            n += ids.shape[0]
        tot = np.asarray(jax.device_get(jnp.stack(sums).sum(0)))
        self.stats.train_seconds += time.perf_counter() - t0
        self.stats.train_steps += len(sums)
        self.stats.train_graphs += n
        return state, float(tot[0] / max(tot[1], 1.0))

    def evaluate(self, state, indices: np.ndarray) -> dict[str, Any]:
        """{"loss", "accuracy"} or {"loss", "mae", "mae_per_target"} over `indices`."""
        self.compile(state)
        sums = [self._eval(state["params"], state["batch_stats"], self.batcher.batch(ids))
                for ids in self.batcher.pack(indices.tolist())]
        tot = np.asarray(jax.device_get(jnp.stack(sums).sum(0)), np.float64)
        count = max(tot[1], 1.0)
        out: dict[str, Any] = {"loss": float(tot[0] / count)}
        if self.regression:
            per = tot[2:] / count
            out["mae"] = float(per.mean())
            out["mae_per_target"] = [float(v) for v in per]
        else:
            out["accuracy"] = float(tot[2] / count)
        return out


def _graph_mask(graph) -> jax.Array:
    import jraph

    return jraph.get_graph_padding_mask(graph)


def _score(metrics: dict[str, Any], regression: bool) -> tuple[float, float]:
    """Higher is better."""
    if regression:
        return (-metrics["mae"], -metrics["loss"])
    return (metrics["accuracy"], -metrics["loss"])


def best_mean_epoch(curves: list[list[float]], regression: bool) -> dict[str, float]:
    """Xu et al. (2019)'s k-fold protocol: the epoch with the best mean test score over folds.

    Returns {"epoch" (1-based), "mean", "std"} of the per-fold test scores at that epoch.
    """
    scores = np.asarray(curves, np.float64)  # [folds, epochs]
    mean = scores.mean(axis=0)
    e = int(np.argmin(mean) if regression else np.argmax(mean))
    return {"epoch": e + 1, "mean": float(mean[e]), "std": float(scores[:, e].std())}


def run_experiment(cfg: GNNExperimentConfig, *, dataset: Dataset | None = None,
                   progress: bool = True, use_cache: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and test one configuration; returns the metrics dict (also the CLI's JSON)."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    ds = dataset if dataset is not None else load_dataset(
        cfg.data.name, seed=cfg.data.seed, self_loops=cfg.data.self_loops,
        multi_edges=cfg.data.multi_edges)
    if ds.task == "none":
        raise ValueError(f"dataset {ds.name!r} has no labels to train on (expressiveness only: "
                         "use `jaxsys bench gnn --expressiveness`)")
    regression = ds.task == "regression"
    loss = cfg.train.loss if cfg.train.loss != "auto" else ("l1" if regression else "cross_entropy")
    t0 = time.perf_counter()
    rels = dataset_relations(ds, cfg.structure, progress=progress, use_cache=use_cache)
    t_struct = time.perf_counter() - t0
    batcher = GraphBatcher(ds.graphs, rels, batch_size=cfg.train.batch_size,
                           regression=regression)
    model = GraphNet(num_types=batcher.num_types, num_outputs=ds.num_outputs,
                     width=cfg.model.width, depth=cfg.model.depth, norm=cfg.model.norm,
                     dropout=cfg.model.dropout)
    if cfg.train.folds:
        labels = None if regression else ds.labels
        splits = kfold_splits(labels, len(ds), cfg.train.folds, cfg.train.seed)
    else:
        splits = [random_split(len(ds), cfg.train.split, cfg.train.seed)]
    if cfg.train.max_folds is not None:
        splits = splits[:cfg.train.max_folds]

    steps_per_epoch = max(1, len(batcher.pack(splits[0][0].tolist())))
    schedule = optax.exponential_decay(cfg.train.lr, cfg.train.lr_decay_every * steps_per_epoch,
                                       0.5, staircase=True)
    trainer = Trainer(model, batcher, regression=regression, loss=loss, lr_schedule=schedule,
                      weight_decay=cfg.train.weight_decay, seed=cfg.train.seed,
                      grad_clip=cfg.train.grad_clip)
    key = "mae" if regression else "accuracy"
    folds_out = []
    for fi, (tr, va, te) in enumerate(splits):
        state = trainer.init_state(cfg.train.seed + 1000 * fi)
        rng = np.random.default_rng(cfg.train.seed + fi)
        best_score, best_epoch, best_params, best_bs, best_val = None, -1, None, None, None
        stopped_at, curve = None, []
        bar = tqdm(range(cfg.train.epochs), desc=f"{cfg.structure.kind} {ds.name} "
                   f"fold {fi + 1}/{len(splits)}", disable=not progress, leave=False)
        for epoch in bar:
            state, train_loss = trainer.train_epoch(state, tr, rng)
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training loss became {train_loss} at epoch {epoch}; "
                                         "lower train.lr")
            if cfg.train.test_curve:
                curve.append(trainer.evaluate(state, te)[key])
            if stopped_at is None:  # with test_curve, training goes on after the early stop
                val = trainer.evaluate(state, va)
                score = _score(val, regression)
                if best_score is None or score > best_score:
                    best_score, best_epoch, best_val = score, epoch, val
                    best_params = jax.tree_util.tree_map(jnp.copy, state["params"])
                    best_bs = jax.tree_util.tree_map(jnp.copy, state["batch_stats"])
                bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val[key]:.4f}",
                                best=f"{best_val[key]:.4f}")
                if epoch - best_epoch >= cfg.train.patience:
                    stopped_at = epoch
            if stopped_at is not None and not cfg.train.test_curve:
                break
        bar.close()
        epochs_run = (stopped_at if stopped_at is not None else epoch) + 1
        best_state = {"params": best_params, "batch_stats": best_bs}
        test = trainer.evaluate(best_state, te)
        train_m = trainer.evaluate(best_state, tr)
        folds_out.append({"fold": fi, "best_epoch": best_epoch, "epochs_run": epochs_run,
                          "train": train_m, "val": best_val, "test": test,
                          "sizes": [int(tr.shape[0]), int(va.shape[0]), int(te.shape[0])]})
        if cfg.train.test_curve:
            folds_out[-1]["test_curve"] = curve
        log(f"fold {fi + 1}/{len(splits)}: best epoch {best_epoch + 1}, val {key} "
            f"{best_val[key]:.4f}, test {key} {test[key]:.4f}")

    tests = np.asarray([f["test"][key] for f in folds_out])
    summary: dict[str, Any] = {
        "metric": key,
        "test_mean": float(tests.mean()),
        "test_std": float(tests.std()),
        "val_mean": float(np.mean([f["val"][key] for f in folds_out])),
    }
    if cfg.train.test_curve:
        summary["xu_protocol"] = best_mean_epoch([f["test_curve"] for f in folds_out],
                                                 regression)
    if regression:
        per = np.asarray([f["test"]["mae_per_target"] for f in folds_out])
        summary["test_mae_per_target"] = dict(zip(ds.target_names or [str(i) for i in
                                                  range(per.shape[1])], per.mean(0).tolist()))
    st = trainer.stats
    return {
        "config": cfg.model_dump(mode="json"),
        "dataset": ds.name,
        "model": cfg.structure.kind,
        "summary": summary,
        "folds": folds_out,
        "num_relation_types": batcher.num_types,
        "pad": dataclasses.asdict(batcher.pad),
        "compiles": st.compiles,
        "train_graphs_per_s": st.train_graphs / st.train_seconds if st.train_seconds else None,
        "structure_seconds": t_struct,
        "seconds": time.perf_counter() - t_start,
        "device": str(jax.devices()[0].device_kind),
    }
