"""The causal-LM training loop: one host loop for every step program.

    from jaxsys.train import load_config, make_trainer
    result = make_trainer(load_config("tiny", ["steps=20"])).run()
    print(result.losses)

`Trainer` owns what is the same however a step runs: the deterministic data (the batch of step s
is samples s*B .. s*B+B-1), the learning-rate table, the progress bar, JSONL metrics, Orbax
checkpoints (periodic and final saves, `--resume`, `restore`) and the step counter. The step
itself is a `StepProgram` (`jaxsys.train.program`): `GSPMDStep` (the sharded XLA step, the fast
path), when `elastic.enabled`, `ElasticStep` (the layout-invariant step that survives device
loss and rejoin bit for bit), or, when `pipeline.enabled`, `PipelineStep` (pipeline parallelism
with recovery strategies chosen by a performance model, also bit for bit). The loop asks the
program to advance one step at a time; a program may answer "run step s again" (after a
recovery) or "go back to step r" (after restoring a checkpoint), and only committed steps are recorded,
counted and checkpointed.

The loop never blocks on the device to read a metric: a committed step's metrics are fetched
after the next step is dispatched (a program that had to wait for its step anyway hands them over
already on the host). Parameter init and dropout keys derive from `seed`; data from `data.seed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from jaxsys.train.checkpoint import CheckpointManager
from jaxsys.train.config import LMTrainConfig
from jaxsys.train.data import batch_for_step, make_source
from jaxsys.train.optim import lr_table
from jaxsys.train.program import CommittedStep, StepProgram


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
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = {"step": self.step, "loss": self.loss, "grad_norm": self.grad_norm, "lr": self.lr,
             "devices": self.num_devices, "step_time_s": round(self.step_time_s, 6)}
        if self.param_checksum is not None:
            d["param_checksum"] = self.param_checksum
        d.update(self.extra)
        if self.events:
            d["events"] = self.events
        return d


@dataclasses.dataclass
class TrainResult:
    records: list[StepRecord]
    """One per committed step, in the order they committed (a step re-run after a checkpoint
    fall back appears twice)."""
    start_step: int
    end_step: int

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self.records]

    @property
    def checksums(self) -> list[str | None]:
        return [r.param_checksum for r in self.records]

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for r in self.records for e in r.events]


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


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar on stderr (disabled: a no-op bar with the same methods)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr, unit="step",
                dynamic_ncols=True, leave=True)


class _RunOutputs:
    """The progress bar and the metrics file of one `run`; turns committed steps into records."""

    def __init__(self, writer: MetricsWriter, bar):
        self.writer, self.bar = writer, bar

    def log(self, msg: str) -> None:
        if not self.bar.disable:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def record(self, done: CommittedStep) -> StepRecord:
        m = jax.device_get(done.metrics)
        ck = m.get("param_checksum")
        step_time = done.step_time_s if done.step_time_s is not None else time.perf_counter() - done.started
        rec = StepRecord(step=done.step, loss=float(m["loss"]), grad_norm=float(m["grad_norm"]), lr=done.lr,
                         num_devices=done.num_devices, step_time_s=step_time,
                         param_checksum=None if ck is None else f"{int(ck[0]):08x}{int(ck[1]):08x}",
                         events=done.events, extra=done.extra)
        self.writer.write(rec.to_json())
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{rec.loss:.4f}", dev=rec.num_devices, refresh=False)
        return rec


def make_program(cfg: LMTrainConfig, *, devices: Sequence[jax.Device] | None = None) -> StepProgram:
    """`PipelineStep` when `pipeline.enabled`, `ElasticStep` when `elastic.enabled`, else `GSPMDStep`."""
    if cfg.pipeline.enabled:
        from jaxsys.train.pipeline.program import PipelineStep

        return PipelineStep(cfg, devices=devices)
    if cfg.elastic.enabled:
        from jaxsys.train.elastic.runtime import ElasticStep

        return ElasticStep(cfg, devices=devices)
    from jaxsys.train.gspmd import GSPMDStep

    return GSPMDStep(cfg, devices=devices)


class Trainer:
    """The host loop around a step program (see the module docstring).

    program: the step program (default `make_program(cfg, devices=devices)`); pass one to set
    program options, e.g. `Trainer(cfg, program=ElasticStep(cfg, faults=[...]))`.
    """

    def __init__(self, cfg: LMTrainConfig, *, program: StepProgram | None = None,
                 devices: Sequence[jax.Device] | None = None):
        if program is not None and devices is not None:
            raise ValueError("pass devices to the program, not to the Trainer, when giving a program")
        self.cfg = cfg
        self.program = program if program is not None else make_program(cfg, devices=devices)
        self.source = make_source(cfg.data, vocab_size=cfg.model.vocab_size)
        self.ckpt = (CheckpointManager(cfg.checkpoint.dir, keep=cfg.checkpoint.keep,
                                       async_save=cfg.checkpoint.async_save)
                     if cfg.checkpoint.dir else None)
        self.step = 0
        """The next step to run."""
        self._ready = False
        self._lr_table: np.ndarray | None = None

    @property
    def devices(self) -> list[jax.Device]:
        return self.program.devices

    def lr(self, count: int) -> np.float32:
        """The learning rate of the update number `count` (host table of the optax schedule)."""
        if self._lr_table is None or count >= len(self._lr_table):
            self._lr_table = lr_table(self.cfg.optim, self.cfg.steps, max(self.cfg.steps, count + 1))
        return self._lr_table[count]

    # ------------------------------------------------------------------ state and checkpoints
    def setup(self) -> None:
        """Build the program and its state: resumed from the latest checkpoint when
        `checkpoint.resume` and one exists, else fresh from the seed."""
        if self._ready:
            return
        self.program.build()
        ck = self.cfg.checkpoint
        if self.ckpt is not None and ck.resume and self.ckpt.latest_step() is not None:
            tree, meta = self.ckpt.restore(self.program.abstract_state())
            self.program.load_state(tree)
            self.step = int(meta["step"])
        else:
            self.program.init_state()
            self.step = 0
        self._ready = True

    def compile(self) -> Any:
        """Compile the step ahead of time; returns the executable (memory analysis etc.)."""
        self.setup()
        return self.program.compile()

    def restore(self, directory: str | Path, step: int | None = None) -> int:
        """Load a checkpoint (written by either program, any mesh) onto this program's layout."""
        self.setup()
        with CheckpointManager(directory, read_only=True) as mgr:
            tree, meta = mgr.restore(self.program.abstract_state(), step)
        self.program.load_state(tree)
        self.step = int(meta["step"])
        return self.step

    def save(self, step: int) -> None:
        if self.ckpt is None:
            return
        meta = {"config": self.cfg.to_dict(), "device_ids": [d.id for d in self.program.devices]}
        self.ckpt.save(step, self.program.state_tree(), meta)

    def state_tree(self) -> dict[str, Any]:
        """{"params", "mu", "nu", "count"} (device arrays) of the current state."""
        return self.program.state_tree()

    def params(self) -> Any:
        """Current parameters as a host (numpy) tree."""
        return self.program.params()

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
            self.ckpt = None

    # ------------------------------------------------------------------ the loop
    def run(self, steps: int | None = None, *, metrics_out: str | Path | None = None,
            progress: bool | None = None, on_step: Callable[[int, "Trainer"], None] | None = None) -> TrainResult:
        """Train until step `steps` (default cfg.steps). Returns the committed steps' records.

        on_step(s, trainer) runs after step s commits (its metrics are then fetched at once)."""
        end = self.cfg.steps if steps is None else steps
        self.setup()
        start = self.step
        records: list[StepRecord] = []
        with self._outputs(metrics_out, progress, end, start) as out:
            self.program.start(start, log=out.log, checkpoints=self.ckpt)
            unfetched: CommittedStep | None = None
            while self.step < end:
                done = self._advance()
                if done is None:
                    continue
                if unfetched is not None:
                    records.append(out.record(unfetched))
                unfetched = done
                self._checkpoint_if_due()
                if on_step is not None:
                    records.append(out.record(done))
                    unfetched = None
                    on_step(done.step, self)
            if unfetched is not None:
                records.append(out.record(unfetched))
            if self.ckpt is not None and end > start and not self._due(end):
                self.save(end)
        return TrainResult(records, start, end)

    def _advance(self) -> CommittedStep | None:
        """Run the next step; None when the program asks for a step again (nothing committed)."""
        s = self.step
        tokens_BxT1 = batch_for_step(self.source, s, self.cfg.data.global_batch)
        self.step, done = self.program.advance(s, tokens_BxT1, self.lr(self.program.count))
        return done

    def _due(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every) and step % every == 0

    def _checkpoint_if_due(self) -> None:
        if self.ckpt is not None and self._due(self.step):
            self.save(self.step)

    @contextlib.contextmanager
    def _outputs(self, metrics_out, progress, end: int, start: int) -> Iterator[_RunOutputs]:
        writer = MetricsWriter(metrics_out if metrics_out is not None else self.cfg.metrics_out)
        bar = progress_bar(end, start, self.cfg.progress if progress is None else progress)
        try:
            yield _RunOutputs(writer, bar)
        finally:
            bar.close()
            writer.close()
            if self.ckpt is not None:  # never leave a started save behind
                self.ckpt.wait()


def make_trainer(cfg: LMTrainConfig, *, devices: Sequence[jax.Device] | None = None) -> Trainer:
    """The trainer for `cfg`: the elastic step program when `elastic.enabled`, else GSPMD."""
    return Trainer(cfg, devices=devices)
