"""Causal-LM training: the shared loop (`Trainer`), its typed config, the deterministic data
pipeline and Orbax train-state checkpoints; `jaxsys.train.elastic` builds elastic training on it.

    from jaxsys.train import load_config, make_trainer
    trainer = make_trainer(load_config("tiny", ["steps=100"]))
    result = trainer.run(metrics_out="metrics.jsonl")

Names load on first use, so `jaxsys train lm --help` answers without importing jax.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "jaxsys.train.config",
    "TrainConfigError": "jaxsys.train.config",
    "load_config": "jaxsys.train.config",
    "apply_overrides": "jaxsys.train.config",
    "Trainer": "jaxsys.train.trainer",
    "TrainResult": "jaxsys.train.trainer",
    "StepRecord": "jaxsys.train.trainer",
    "make_trainer": "jaxsys.train.trainer",
    "CheckpointManager": "jaxsys.train.checkpoint",
    "make_source": "jaxsys.train.data",
    "batch_for_step": "jaxsys.train.data",
    "ElasticTrainer": "jaxsys.train.elastic.runtime",
    "run_demo": "jaxsys.train.demo",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxsys.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
