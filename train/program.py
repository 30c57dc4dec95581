"""The step-program protocol: what the host loop (`jaxsys.train.trainer.Trainer`) drives.

The loop owns everything that is the same for every way of running a step: the data (the batch
of step s is a pure function of s), the learning-rate table, the progress bar, JSONL metrics,
Orbax checkpoints (saving, resuming, restoring) and the step counter. A step program owns the
train state on its devices and the compiled step, and answers one question per call to
`advance(s, batch, lr)`: which step runs next, and did step s commit?

Three programs implement it:

* `jaxsys.train.gspmd.GSPMDStep`: XLA's sharded step over a (data, fsdp, tensor) mesh, donated
  state. Every dispatched step commits; its metrics are device arrays that the loop fetches one
  step late, so the host never waits on the device.
* `jaxsys.train.elastic.runtime.ElasticStep`: the layout-invariant step with per-step snapshots.
  A step commits only if every device survived it; otherwise the program recovers and asks for
  the same step again (or for an earlier one, after a fall back to the last checkpoint).
* `jaxsys.train.pipeline.program.PipelineStep`: pipeline parallelism (stages x data-parallel
  pipelines, GPipe or 1F1B) whose bits do not depend on the layout; after a device loss it recovers
  with the strategy the performance model picks (`jaxsys.train.recovery`) and asks for the step again.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol, Sequence

import jax
import numpy as np

from jaxsys.models import decoder
from jaxsys.train.config import LMTrainConfig, TrainConfigError

if TYPE_CHECKING:
    from jaxsys.train.checkpoint import CheckpointManager


@dataclasses.dataclass
class CommittedStep:
    """A step whose update is now the train state."""

    step: int
    metrics: dict[str, Any]
    """loss, grad_norm (scalars; device arrays or host values) and, from programs whose bits do
    not depend on the layout, param_checksum ([2] uint32)."""
    lr: float
    num_devices: int
    started: float
    """`time.perf_counter()` when the step was dispatched."""
    step_time_s: float | None = None
    """Known when the program waited for the step; else the loop measures to the metrics fetch."""
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Further host values for the step's metrics line (e.g. the pipeline's bubble_fraction)."""


class Advance(NamedTuple):
    next_step: int
    """The step to run next: `step + 1` after a commit, `step` (or earlier) after a recovery."""
    committed: CommittedStep | None


class StepEventLog:
    """Log lines and membership events of a step program that changes its devices mid-run.

    `events` holds every event of the run; those of the step being committed also go into its
    `CommittedStep.events` (the subclass drains `_step_events` when it commits). Log lines go to
    the function given at construction, else the host loop's, else stderr.
    """

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self._step_events: list[dict[str, Any]] = []
        self._log_fn = log
        self._loop_log: Callable[[str], None] | None = None

    def _log(self, msg: str) -> None:
        if self._log_fn is not None:
            self._log_fn(msg)
        elif self._loop_log is not None:
            self._loop_log(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def _record_event(self, step: int, event: dict[str, Any]) -> None:
        event = {"step": step, **event}
        self.events.append(event)
        self._step_events.append(event)


class StepProgram(Protocol):
    """One training step on its own state (see the module docstring)."""

    devices: list[jax.Device]
    """The run's devices (the ones a checkpoint's metadata names)."""

    @property
    def count(self) -> int:
        """Optimizer updates applied to the current state (indexes the learning-rate table)."""

    def build(self) -> None:
        """Create the mesh and the step function (no state, no compile)."""

    def init_state(self) -> None:
        """Fresh state from the config's seed."""

    def abstract_state(self) -> dict[str, Any]:
        """{"params", "mu", "nu", "count"} as ShapeDtypeStructs with this program's shardings (the
        tree Orbax restores onto)."""

    def load_state(self, tree: dict[str, Any]) -> None:
        """Adopt a {"params", "mu", "nu", "count"} tree (from a checkpoint, any layout)."""

    def state_tree(self) -> dict[str, Any]:
        """The current state as a {"params", "mu", "nu", "count"} tree of device arrays."""

    def params(self) -> Any:
        """The current parameters as a host (numpy) tree."""

    def compile(self) -> Any:
        """Compile the step ahead of time; returns the executable (memory analysis etc.)."""

    def start(self, step: int, *, log: Callable[[str], None],
              checkpoints: "CheckpointManager | None") -> None:
        """Called when a `run` begins at `step`: `log` prints a line beside the progress bar;
        `checkpoints` is the run's checkpoint manager (a program may fall back to it)."""

    def advance(self, step: int, tokens_BxT1: np.ndarray, lr: np.float32) -> Advance:
        """Run step `step` on its batch [B, T+1] with learning rate `lr`."""


# ------------------------------------------------------------------ what every program shares
def select_devices(cfg: LMTrainConfig, devices: Sequence[jax.Device] | None = None) -> list[jax.Device]:
    """The first `cfg.devices` of `devices` (default: all of jax.devices())."""
    devs = list(jax.devices() if devices is None else devices)
    if cfg.devices is not None and cfg.devices > len(devs):
        msg = f"devices={cfg.devices} but only {len(devs)} are available"
        if devices is None and devs[0].platform == "cpu":
            from jaxsys.runtime import cpu_devices_hint

            msg += f"; {cpu_devices_hint(cfg.devices)}"
        raise TrainConfigError(msg)
    return devs if cfg.devices is None else devs[:cfg.devices]


def init_params_f32(cfg: LMTrainConfig) -> Any:
    """float32 master parameters from `seed` (the same tree on every layout), on the host."""
    model32 = cfg.model.replace(dtype="float32")
    return jax.device_get(jax.jit(lambda k: decoder.init_params(model32, k))(jax.random.key(cfg.seed)))


def example_ids(step: int, global_batch: int) -> np.ndarray:
    """[B] int32 global indices of the examples of step `step` (the dropout keys' input)."""
    return np.arange(step * global_batch, (step + 1) * global_batch, dtype=np.int32)


def target_count(tokens_BxT1: np.ndarray) -> np.ndarray:
    """Per-sequence number of targets ([B] int64): next tokens that are not padding (< 0)."""
    return np.count_nonzero(tokens_BxT1[:, 1:] >= 0, axis=1)
