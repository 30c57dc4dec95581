"""Typed configuration for graph experiments: YAML files validated by pydantic, `key=value` overrides.

A config has four sections (every field has a default, so a YAML file names only what differs):

```yaml
data:      {name: csl, seed: 0}
structure: {kind: csgnn, length_bound: 10}
model:     {width: 64, depth: 4}
train:     {epochs: 200, folds: 5, lr: 1.0e-3}
```

Overrides use dotted keys and YAML values: `structure.kind=gin train.epochs=50`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from jaxsys.config_base import ConfigSection

__all__ = [
    "GNNExperimentConfig",
    "GNNModelConfig",
    "GNNTrainConfig",
    "GraphDataConfig",
    "StructureConfig",
    "apply_overrides",
    "load_config",
]


class GraphDataConfig(ConfigSection):
    """Which graph dataset `run_experiment` loads, and what to do with non-simple graphs."""

    name: str = Field(description="dataset: csl, exp, cexp, counting, mutag, proteins, "
                                  "micro_zinc, sr25, brec_{basic,regular,str,extension}")
    seed: int = Field(0, description="seed of generated datasets (CSL relabellings, counting)")
    self_loops: Literal["error", "drop"] = "error"
    multi_edges: Literal["error", "merge"] = "error"


class StructureConfig(ConfigSection):
    """Which relations the host builds (see `jaxsys.gnn.build_relations`)."""

    kind: Literal["csgnn", "kpgnn", "gin"] = "csgnn"
    # CSGNN
    length_bound: int = Field(10, ge=3, description="longest chordless cycle used")
    max_distance: int | None = Field(None, ge=0, description="largest cyclic distance "
                                     "(default: length_bound // 2)")
    typed_by_length: bool = Field(False, description="one relation type per (length, distance)")
    complement: bool = Field(False, description="add relations from the complement graph")
    complement_length_bound: int = Field(6, ge=3)
    flag_lengths: tuple[int, ...] = Field((), description="per-node flags: on a chordless "
                                          "cycle of each of these lengths")
    max_cycles: int | None = Field(200_000, ge=1, description="per-graph cap on chordless cycles")
    on_exceed: Literal["error", "warn"] = "error"
    # KP-GNN
    hops: int = Field(3, ge=1, description="K of KP-GNN")
    peripheral: bool = Field(True, description="KP-GNN peripheral edge counts per hop")

    @model_validator(mode="after")
    def _check(self) -> StructureConfig:
        if any(length < 3 or length > self.length_bound for length in self.flag_lengths):
            raise ValueError(f"flag_lengths {self.flag_lengths} must lie in 3..length_bound "
                             f"({self.length_bound})")
        return self

    def cache_key(self) -> dict[str, Any]:
        """Fields that change the relations of this kind (others do not invalidate the cache)."""
        if self.kind == "gin":
            return {"kind": "gin"}
        if self.kind == "kpgnn":
            return {"kind": "kpgnn", "hops": self.hops, "peripheral": self.peripheral}
        return self.model_dump(exclude={"hops", "peripheral"})


class GNNModelConfig(ConfigSection):
    """The message-passing network (`GraphNet`) run over the relations of `structure`."""

    width: int = Field(64, ge=1)
    depth: int = Field(4, ge=1, description="message-passing layers")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    norm: Literal["batch", "layer", "none"] = "batch"


class GNNTrainConfig(ConfigSection):
    """Optimiser, early stopping and evaluation protocol of `run_experiment`.

    Model selection is on validation data only: with k folds, fold i is the test fold and fold
    i+1 (one of the k-1 non-test folds) the validation fold; the reported test score is the test
    fold's at the epoch with the best validation score. `test_curve` adds the test-fold-selected
    figure of Xu et al. (2019), for comparison with results published that way.
    """

    epochs: int = Field(200, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="clip gradients to this global norm "
                                    "(None: off)")
    lr_decay_every: int = Field(50, ge=1, description="halve the learning rate every N epochs")
    patience: int = Field(50, ge=1, description="early stopping: epochs without a better "
                                                "validation score")
    folds: int = Field(0, ge=0, description="k-fold cross-validation (0: one random split)")
    max_folds: int | None = Field(None, ge=1, description="run only the first N folds")
    split: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train/val/test "
                                              "fractions when folds = 0")
    seed: int = 0
    loss: Literal["auto", "cross_entropy", "l1", "mse"] = "auto"
    test_curve: bool = Field(False, description="k-fold only: train every fold for all epochs, "
                             "score the test fold after each, and report the protocol of Xu et "
                             "al. (2019): the epoch whose mean test score over the folds is best. "
                             "It selects on test data, so it is only for comparison with "
                             "results published that way; the early-stopped, "
                             "validation-selected result is unchanged")

    @model_validator(mode="after")
    def _check(self) -> GNNTrainConfig:
        if self.folds == 1 or (self.folds and self.folds < 3):
            raise ValueError("folds must be 0 (one split) or >= 3 (test fold, validation fold, "
                             "training folds)")
        if self.test_curve and not self.folds:
            raise ValueError("test_curve needs k-fold cross-validation (folds >= 3)")
        if abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) <= 0:
            raise ValueError(f"split fractions must be positive and sum to 1, got {self.split}")
        return self


class GNNExperimentConfig(ConfigSection):
    """One graph experiment (`jaxsys train gnn --config ...`): the four sections and an output."""

    data: GraphDataConfig
    structure: StructureConfig = StructureConfig()
    model: GNNModelConfig = GNNModelConfig()
    train: GNNTrainConfig = GNNTrainConfig()
    output: str | None = Field(None, description="metrics JSON path (default: print only)")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `key=value` overrides (dotted keys, YAML-parsed values) to a copy of a raw config."""
    from jaxsys._overrides import dotted_overrides

    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    return dotted_overrides(out, overrides, example="structure.kind=gin")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> GNNExperimentConfig:
    """Read a YAML config (or start empty), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: a config is a mapping with sections data/structure/model/train")
    return GNNExperimentConfig.model_validate(apply_overrides(raw, list(overrides)))
