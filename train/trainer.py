"""The causal-LM trainer: one jitted step with explicit shardings over (data, fsdp, tensor) and
donated state; a deterministic data pipeline; Orbax checkpoints; JSONL metrics and a progress bar.

    from jaxsys.train import Trainer, load_config
    result = Trainer(load_config("tiny", ["steps=20"])).run()
    print(result.losses)

The step (`Trainer`, GSPMD) shards parameters and Adam moments by the logical rules of
`jaxsys.sharding` (fsdp on the embed dimension, tensor on heads/mlp/vocab), the batch over data x
fsdp, and lets XLA insert the collectives. It is the fast path; its reductions depend on the mesh,
so its bits change with the device count. `jaxsys.train.elastic.ElasticTrainer` is the same
loop on the layout-invariant step, used when `elastic.enabled` (see there).

The loop never blocks on the device to read a metric: step s's metrics are fetched after step s+1
is dispatched. Parameter init and dropout keys derive from `seed`; data from `data.seed`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxsys.models import decoder
from jaxsys.sharding import MeshConfig, activate, logical_sharding, make_mesh, tree_shardings
from jaxsys.sharding import axes as ax
from jaxsys.train import objective
from jaxsys.train.checkpoint import CheckpointManager
from jaxsys.train.config import LMTrainConfig, TrainConfigError
from jaxsys.train.data import batch_for_step, make_source
from jaxsys.train.optim import clip_by_norm, lr_table, make_optimizer, opt_state_from, opt_state_parts


@dataclasses.dataclass
class StepRecord:
    step: int
    loss: float
    grad_norm: float
    lr: float
    num_devices: int
    step_time_s: float
    param_checksum: str | None = None
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = {"step": self.step, "loss": self.loss, "grad_norm": self.grad_norm, "lr": self.lr,
             "devices": self.num_devices, "step_time_s": round(self.step_time_s, 6)}
        if self.param_checksum is not None:
            d["param_checksum"] = self.param_checksum
        if self.events:
            d["events"] = self.events
        return d


@dataclasses.dataclass
class TrainResult:
    records: list[StepRecord]
    events: list[dict[str, Any]]
    start_step: int
    end_step: int

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self.records]

    @property
    def checksums(self) -> list[str | None]:
        return [r.param_checksum for r in self.records]


class MetricsWriter:
    """One JSON object per line; floats keep full precision (repr of the float32 value)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._f = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")

    def write(self, obj: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(obj) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr, unit="step",
                dynamic_ncols=True, leave=True)


def select_devices(cfg: LMTrainConfig, devices: Sequence[jax.Device] | None = None) -> list[jax.Device]:
    devs = list(jax.devices() if devices is None else devices)
    if cfg.devices is not None:
        if cfg.devices > len(devs):
            raise TrainConfigError(f"devices={cfg.devices} but only {len(devs)} are available")
        devs = devs[:cfg.devices]
    return devs


def init_params_f32(cfg: LMTrainConfig) -> Any:
    """float32 master parameters from `seed` (the same tree on every layout)."""
    model32 = cfg.model.replace(dtype="float32")
    return jax.device_get(jax.jit(lambda k: decoder.init_params(model32, k))(jax.random.key(cfg.seed)))


def decay_mask_tree(cfg: LMTrainConfig) -> Any:
    from jaxsys.train.elastic.layout import FlatSpec

    spec = FlatSpec.from_shapes(decoder.param_shapes(cfg.model))
    return jax.tree.unflatten(spec.treedef, list(spec.decay))


class Trainer:
    """GSPMD causal-LM trainer over a (data, fsdp, tensor) mesh."""

    def __init__(self, cfg: LMTrainConfig, *, devices: Sequence[jax.Device] | None = None):
        self.cfg = cfg
        self.devices = select_devices(cfg, devices)
        self.source = make_source(cfg.data, vocab_size=cfg.model.vocab_size)
        self.ckpt = (CheckpointManager(cfg.checkpoint.dir, keep=cfg.checkpoint.keep,
                                       async_save=cfg.checkpoint.async_save)
                     if cfg.checkpoint.dir else None)
        self.step = 0
        self._count = 0
        self._state: Any = None
        self._lr_table: np.ndarray | None = None

    def lr(self, count: int) -> np.float32:
        """The learning rate of the update number `count` (host table of the optax schedule)."""
        if self._lr_table is None or count >= len(self._lr_table):
            self._lr_table = lr_table(self.cfg.optim, self.cfg.steps, max(self.cfg.steps, count + 1))
        return self._lr_table[count]

    # ------------------------------------------------------------------ subclass hooks
    def _setup_mesh(self) -> None:
        m = self.cfg.mesh
        try:
            self.mesh = make_mesh(MeshConfig(data=m.data, fsdp=m.fsdp, tensor=m.tensor), devices=self.devices)
        except ValueError as e:
            raise TrainConfigError(f"mesh: {e}") from None
        shapes = decoder.param_shapes(self.cfg.model)
        self._param_sh = tree_shardings(decoder.param_logical_axes(self.cfg.model), shapes, self.mesh)
        self._rep = NamedSharding(self.mesh, PartitionSpec())
        B, T = self.cfg.data.global_batch, self.cfg.data.seq_len
        self._batch_sh = logical_sharding((ax.BATCH, None), (B, T + 1), self.mesh)
        self._ex_sh = logical_sharding((ax.BATCH,), (B,), self.mesh)
        self._state_sh = {"params": self._param_sh, "mu": self._param_sh, "nu": self._param_sh,
                          "count": self._rep}

    def _build_step(self) -> Callable:
        cfg = self.cfg
        mask = decay_mask_tree(cfg)
        mesh = self.mesh

        def step_fn(state, tokens_BxT1, example_ids_B, step, n_valid, lr):
            root = jax.random.key(cfg.seed)
            keys_B = objective.example_keys(root, step, example_ids_B)
            with activate(mesh):
                loss_sum, grads = jax.value_and_grad(
                    lambda p: objective.lm_loss_sum(p, tokens_BxT1, keys_B, cfg=cfg.model,
                                                    dropout=cfg.dropout))(state["params"])
            grads = jax.tree.map(lambda g: g / n_valid, grads)
            g_norm = optax.tree.norm(grads)
            grads = clip_by_norm(grads, g_norm, cfg.optim.clip_norm)
            params = state["params"]
            decay_in = jax.tree.map(lambda p, m: p if m else jnp.zeros_like(p), params, mask)
            opt = opt_state_from(state["count"], state["mu"], state["nu"])
            upd, new_opt = make_optimizer(cfg.optim, lr).update(grads, opt, decay_in)
            count, mu, nu = opt_state_parts(new_opt)
            new = {"params": optax.apply_updates(params, upd), "mu": mu, "nu": nu, "count": count}
            metrics = {"loss": loss_sum / n_valid, "grad_norm": g_norm}
            return new, metrics

        return jax.jit(step_fn,
                       in_shardings=(self._state_sh, self._batch_sh, self._ex_sh, self._rep, self._rep, self._rep),
                       out_shardings=(self._state_sh, self._rep), donate_argnums=(0,))

    def _init_state(self) -> Any:
        params = init_params_f32(self.cfg)
        zeros = jax.tree.map(np.zeros_like, params)
        tree = {"params": params, "mu": zeros, "nu": jax.tree.map(np.zeros_like, params),
                "count": np.zeros((), np.int32)}
        return jax.device_put(tree, self._state_sh)

    def state_tree(self) -> dict[str, Any]:
        """{"params", "mu", "nu", "count"} (device arrays) of the current state."""
        return self._state

    def _load_tree(self, tree: dict[str, Any]) -> None:
        self._state = jax.device_put(tree, self._state_sh)
        self._count = int(jax.device_get(tree["count"]))

    def abstract_state(self) -> dict[str, Any]:
        shapes = decoder.param_shapes(self.cfg.model)
        sd = lambda s, sh: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh)  # noqa: E731
        is_shape = lambda s: isinstance(s, tuple) and all(isinstance(i, int) for i in s)  # noqa: E731
        p = jax.tree.map(sd, shapes, self._param_sh, is_leaf=is_shape)
        return {"params": p, "mu": p, "nu": p,
                "count": jax.ShapeDtypeStruct((), jnp.int32, sharding=self._rep)}

    # ------------------------------------------------------------------ shared
    def params(self) -> Any:
        """Current parameters as a host (numpy) tree."""
        return jax.device_get(self.state_tree()["params"])

    def _maybe_resume(self) -> int:
        if self.ckpt is None or not self.cfg.checkpoint.resume or self.ckpt.latest_step() is None:
            return 0
        tree, meta = self.ckpt.restore(self.abstract_state())
        self._load_tree(tree)
        return int(meta["step"])

    def restore(self, directory: str | Path, step: int | None = None) -> int:
        """Load a checkpoint (written by either trainer, any mesh) onto this trainer's layout."""
        with CheckpointManager(directory, read_only=True) as mgr:
            tree, meta = mgr.restore(self.abstract_state(), step)
        self._load_tree(tree)
        self.step = int(meta["step"])
        return self.step

    def save(self, step: int) -> None:
        if self.ckpt is None:
            return
        meta = {"config": self.cfg.to_dict(), "device_ids": [d.id for d in self.devices]}
        self.ckpt.save(step, self.state_tree(), meta)

    def _host_batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.float32]:
        B = self.cfg.data.global_batch
        tokens = batch_for_step(self.source, step, B)
        ex = np.arange(step * B, (step + 1) * B, dtype=np.int32)
        n_valid = np.float32(np.count_nonzero(tokens[:, 1:] >= 0))
        return tokens, ex, n_valid

    def setup(self) -> None:
        """Build the mesh, the step and the state (resuming from a checkpoint when asked)."""
        if self._state is not None:
            return
        self._setup_mesh()
        self._step_fn = self._build_step()
        start = self._maybe_resume()
        if self._state is None:
            self._state = self._init_state()
        self.step = start

    def compile(self) -> Any:
        """Compile the step ahead of time; returns the compiled executable (memory analysis etc.)."""
        self.setup()
        B, T = self.cfg.data.global_batch, self.cfg.data.seq_len
        args = (self.abstract_state(),
                jax.ShapeDtypeStruct((B, T + 1), jnp.int32, sharding=self._batch_sh),
                jax.ShapeDtypeStruct((B,), jnp.int32, sharding=self._ex_sh),
                jax.ShapeDtypeStruct((), jnp.int32, sharding=self._rep),
                jax.ShapeDtypeStruct((), jnp.float32, sharding=self._rep),
                jax.ShapeDtypeStruct((), jnp.float32, sharding=self._rep))
        self._compiled = self._step_fn.lower(*args).compile()
        return self._compiled

    def run(self, steps: int | None = None, *, metrics_out: str | Path | None = None,
            progress: bool | None = None, on_step: Callable[[int, "Trainer"], None] | None = None) -> TrainResult:
        """Train until step `steps` (default cfg.steps). Returns the per-step records."""
        cfg = self.cfg
        end = cfg.steps if steps is None else steps
        self.setup()
        if not hasattr(self, "_compiled"):
            self.compile()
        start = self.step
        writer = MetricsWriter(metrics_out if metrics_out is not None else cfg.metrics_out)
        bar = _progress(end, start, cfg.progress if progress is None else progress)
        records: list[StepRecord] = []
        pending = None
        try:
            for s in range(start, end):
                tokens, ex, n_valid = self._host_batch(s)
                t0 = time.perf_counter()
                lr = self.lr(self._count)
                self._state, metrics = self._compiled(self._state, tokens, ex, np.int32(s), n_valid, lr)
                self._count += 1
                if pending is not None:
                    records.append(self._finish(pending, writer, bar))
                pending = (s, metrics, t0, lr)
                self.step = s + 1
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save(self.step)
                if on_step is not None:
                    records.append(self._finish(pending, writer, bar))
                    pending = None
                    on_step(s, self)
            if pending is not None:
                records.append(self._finish(pending, writer, bar))
            if self.ckpt is not None and end > start and (not cfg.checkpoint.every or end % cfg.checkpoint.every):
                self.save(end)
        finally:
            bar.close()
            writer.close()
            if self.ckpt is not None:  # never leave a started save behind
                self.ckpt.wait()
        return TrainResult(records, [], start, end)

    def _finish(self, pending, writer: MetricsWriter, bar) -> StepRecord:
        s, metrics, t0, lr = pending
        m = jax.device_get(metrics)
        rec = StepRecord(step=s, loss=float(m["loss"]), grad_norm=float(m["grad_norm"]), lr=float(lr),
                         num_devices=len(self.devices), step_time_s=time.perf_counter() - t0)
        writer.write(rec.to_json())
        bar.update(1)
        bar.set_postfix(loss=f"{rec.loss:.4f}", dev=rec.num_devices, refresh=False)
        return rec

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
            self.ckpt = None


def make_trainer(cfg: LMTrainConfig, *, devices: Sequence[jax.Device] | None = None) -> Trainer:
    """`ElasticTrainer` when `elastic.enabled`, else the GSPMD `Trainer`."""
    if cfg.elastic.enabled:
        from jaxsys.train.elastic.runtime import ElasticTrainer

        return ElasticTrainer(cfg, devices=devices)
    return Trainer(cfg, devices=devices)
