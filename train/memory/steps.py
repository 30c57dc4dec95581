"""The decoder's training step in the form the memory planner takes: `step(remat, *args)`.

    step = lm_train_step(model_cfg)
    opt_state = init_opt_state(params)
    params, opt_state, loss = jax.jit(functools.partial(step, plan.remat))(params, opt_state, tokens)

Next-token cross-entropy (`jaxsys.train.objective`, mean over targets) and Adam (optax); the loss
goes through `remat`, so a plan decides what its backward pass keeps. Used by the memory
benchmark, the GPU check and the tests; the trainer hooks the same `remat` into its own step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxsys.models.config import ModelConfig
from jaxsys.train import objective


def lm_train_step(cfg: ModelConfig, *, learning_rate: float = 1e-3) -> Callable:
    """step(remat, params, opt_state, tokens_BxT1) -> (params, opt_state, loss)."""
    opt = optax.adam(learning_rate)

    def loss_fn(params, tokens_BxT1):
        n = jnp.maximum(jnp.sum(tokens_BxT1[:, 1:] >= 0), 1).astype(jnp.float32)
        return objective.lm_loss_sum(params, tokens_BxT1, None, cfg=cfg, dropout=0.0) / n

    def step(remat, params, opt_state, tokens_BxT1):
        loss, grads = jax.value_and_grad(remat(loss_fn))(params, tokens_BxT1)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step.__name__ = step.__qualname__ = f"lm_train_step[{cfg.num_layers}x{cfg.hidden_size}]"
    return step


def init_opt_state(params: Any) -> Any:
    """The Adam state `lm_train_step` expects (its learning rate does not enter the state)."""
    return optax.adam(1e-3).init(params)
