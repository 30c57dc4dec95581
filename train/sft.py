"""Supervised fine-tuning: a full fine-tune of given weights on rows whose prompts are masked.

The rows are a flat int32 `.npy` stream read by the `tokens` data source, one example per row of
`seq_len` tokens: prompt tokens written as -(t+1) (read as t, no loss; `objective.input_ids`),
completion tokens as themselves, -1 as padding. Whoever builds the examples writes that file (e.g.
`jaxsys.serve.graphcot.sft.write_rows` for GLM's oracle traces); the file is the interface, so the
trainer never imports the code that made it.

The run is the ordinary `Trainer` loop on one device (GSPMD step, AdamW without weight decay,
cosine schedule after a linear warm-up, gradient clipping), started from `params` instead of a
seeded init: the state is loaded with zero Adam moments before the step is compiled. The result
leaves as host arrays; `jaxsys.models.hf_export.save_hf_folder` writes them as a model folder that
`jaxsys.load_model` and `jaxsys serve --model` load.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

from jaxsys.models.config import ModelConfig
from jaxsys.train.config import (ElasticConfig, LMDataConfig, LMTrainConfig, MeshAxesConfig, OptimConfig)
from jaxsys.train.data import batch_for_step
from jaxsys.train.trainer import Trainer


def sft_config(model_cfg: ModelConfig, *, rows_path: str | os.PathLike, seq_len: int, batch: int, steps: int,
               lr: float, warmup_steps: int, seed: int, progress: bool = True) -> LMTrainConfig:
    """The trainer's config for a full fine-tune in float32 on one device: rows of `seq_len`
    tokens, `batch` rows per step, AdamW (no weight decay), cosine to 0.1 x `lr` after at most
    `steps - 1` warm-up steps. `seed` orders the rows."""
    if seq_len <= 0 or batch <= 0 or steps <= 0 or lr <= 0 or warmup_steps < 0:
        raise ValueError(f"seq_len, batch, steps and lr must be positive and warmup_steps non-negative; got "
                         f"seq_len={seq_len}, batch={batch}, steps={steps}, lr={lr}, warmup_steps={warmup_steps}")
    return LMTrainConfig(
        model=model_cfg.replace(dtype="float32"),
        data=LMDataConfig(source="tokens", paths=(str(rows_path),), seq_len=seq_len, global_batch=batch,
                          micro_batches=1, seed=seed),
        optim=OptimConfig(lr=lr, schedule="cosine", warmup_steps=min(warmup_steps, steps - 1), min_lr_ratio=0.1,
                          weight_decay=0.0, clip_norm=1.0),
        mesh=MeshAxesConfig(data=1, fsdp=1, tensor=1), elastic=ElasticConfig(enabled=False),
        steps=steps, seed=seed, devices=1, progress=progress)


def finetune(params: Any, model_cfg: ModelConfig, rows_path: str | os.PathLike, *, seq_len: int, batch: int,
             steps: int, lr: float, warmup_steps: int, seed: int, progress: bool = True
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fine-tune `params` on the rows at `rows_path` (see the module docstring).

    Returns the new parameters (host float32 arrays) and the run's record: its shape (`seq_len`,
    `global_batch`, `steps`, `tokens` = steps x batch x seq_len, `loss_tokens` = the tokens that
    carried loss), `lr`, `warmup_steps`, per-step `losses` and `step_time_s`, `compile_s`, `wall_s`.
    """
    cfg = sft_config(model_cfg, rows_path=rows_path, seq_len=seq_len, batch=batch, steps=steps, lr=lr,
                     warmup_steps=warmup_steps, seed=seed, progress=progress)
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        host = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
        trainer.program.load_state({"params": host, "mu": jax.tree.map(np.zeros_like, host),
                                    "nu": jax.tree.map(np.zeros_like, host), "count": np.zeros((), np.int32)})
        loss_tokens = sum(int(np.count_nonzero(batch_for_step(trainer.source, s, batch)[:, 1:] >= 0))
                          for s in range(steps))
        t0 = time.perf_counter()
        trainer.compile()
        compile_s = time.perf_counter() - t0
        result = trainer.run()
        wall_s = time.perf_counter() - t0
        new_params = trainer.params()
    finally:
        trainer.close()
    return new_params, {"seq_len": seq_len, "global_batch": batch, "steps": steps, "tokens": steps * batch * seq_len,
                        "loss_tokens": loss_tokens, "lr": lr, "warmup_steps": cfg.optim.warmup_steps,
                        "losses": result.losses, "step_time_s": [r.step_time_s for r in result.records],
                        "compile_s": compile_s, "wall_s": wall_s}
