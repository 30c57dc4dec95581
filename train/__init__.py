"""Causal-LM training: the shared host loop (`Trainer`) around a step program (`GSPMDStep`, or
`ElasticStep` from `jaxsys.train.elastic`), its typed config, the deterministic data pipeline and
Orbax train-state checkpoints.

    from jaxsys.train import load_config, make_trainer
    trainer = make_trainer(load_config("tiny", ["steps=100"]))
    result = trainer.run(metrics_out="metrics.jsonl")

Names load on first use, so `jaxsys train lm --help` answers without importing jax.
"""

from __future__ import annotations


from jaxsys._lazy import lazy_exports

_LAZY = {
    "LMTrainConfig": "jaxsys.train.config",
    "LMDataConfig": "jaxsys.train.config",
    "TrainConfigError": "jaxsys.train.config",
    "load_config": "jaxsys.train.config",
    "apply_overrides": "jaxsys.train.config",
    "Trainer": "jaxsys.train.trainer",
    "TrainResult": "jaxsys.train.trainer",
    "StepRecord": "jaxsys.train.trainer",
    "make_trainer": "jaxsys.train.trainer",
    "StepProgram": "jaxsys.train.program",
    "GSPMDStep": "jaxsys.train.gspmd",
    "CheckpointManager": "jaxsys.train.checkpoint",
    "make_source": "jaxsys.train.data",
    "batch_for_step": "jaxsys.train.data",
    "ElasticStep": "jaxsys.train.elastic.runtime",
    "run_demo": "jaxsys.train.demo",
}

__getattr__, __dir__, __all__ = lazy_exports("jaxsys.train", _LAZY)
