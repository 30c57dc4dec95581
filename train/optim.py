"""The optimizer: optax AdamW (decoupled weight decay), learning-rate schedule, clipping by global
norm. Both step functions (GSPMD and elastic) use this same chain on the same math; they differ
only in how the gradient and its norm are reduced.

The chain is `scale_by_adam -> add_decayed_weights -> scale_by_learning_rate`, exactly what
`optax.adamw` builds; the decay mask is applied by passing `params * mask` as the decay input, so
the optimizer state is the same pytree whether the parameters are a tree or a flat shard:
`(ScaleByAdamState(count, mu, nu), EmptyState(), EmptyState())`.

The learning rate of each step is an input of the compiled step, looked up on the host in a table
of the optax schedule (`lr_table`): the executable then does not depend on the schedule or the
run length, so one compile serves runs of any length and a resumed run with a new horizon.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsys.train.config import OptimConfig, lr_schedule


def make_optimizer(optim: OptimConfig, lr: jax.Array | float) -> optax.GradientTransformation:
    """AdamW with learning rate `lr` (a traced scalar inside the step)."""
    return optax.chain(
        optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
        optax.add_decayed_weights(optim.weight_decay),
        optax.scale_by_learning_rate(lr),
    )


def compiled_optim(optim: OptimConfig) -> OptimConfig:
    """`optim` with the schedule fields neutralized: what a compiled step depends on (for cache keys)."""
    return optim.model_copy(update={"lr": 1.0, "schedule": "constant", "warmup_steps": 0,
                                    "decay_steps": None, "min_lr_ratio": 0.0})


def lr_table(optim: OptimConfig, total_steps: int, length: int | None = None) -> np.ndarray:
    """float32 learning rate of every step 0..length-1 from the optax schedule."""
    n = max(total_steps if length is None else length, 1)
    schedule = lr_schedule(optim, total_steps)
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(n, dtype=jnp.int32)), np.float32)


def opt_state_from(count: jax.Array, mu: Any, nu: Any) -> Any:
    """The chain's state from its parts (count is the number of updates applied)."""
    return (optax.ScaleByAdamState(count=count, mu=mu, nu=nu), optax.EmptyState(), optax.EmptyState())


def opt_state_parts(state: Any) -> tuple[jax.Array, Any, Any]:
    adam = state[0]
    return adam.count, adam.mu, adam.nu


def clip_by_norm(grads: Any, g_norm: jax.Array, max_norm: float | None) -> Any:
    """optax.clip_by_global_norm's formula, with the norm computed by the caller."""
    if max_norm is None:
        return grads
    trigger = g_norm < max_norm
    return jax.tree.map(lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm), grads)


def masked_for_decay(params: Any, decay_mask: Any) -> Any:
    return jax.tree.map(lambda p, m: p * m if not isinstance(m, bool) else (p if m else jnp.zeros_like(p)),
                        params, decay_mask)
