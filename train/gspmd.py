"""The GSPMD step program: one jitted step over a (data, fsdp, tensor) mesh, state donated.

Parameters and Adam moments are sharded by the logical rules of `jaxsys.sharding` (fsdp on the
embed dimension, tensor on heads/mlp/vocab), the batch over data x fsdp; XLA inserts the
collectives. It is the fast path; its reductions depend on the mesh, so its bits change with the
device count (`jaxsys.train.elastic` is the step whose bits do not).

Every dispatched step commits: `advance` returns the step's metrics as device arrays and the loop
fetches them one step late, so the host never waits on the device.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsys.models import decoder
from jaxsys.sharding import MeshConfig, activate, logical_sharding, make_mesh, tree_shardings
from jaxsys.sharding import axes as ax
from jaxsys.train import objective
from jaxsys.train.config import LMTrainConfig, TrainConfigError
from jaxsys.train.memory import KEEP_ALL, MemoryPlan, Remat
from jaxsys.train.memory.training import StepMemory
from jaxsys.train.optim import clip_by_norm, make_optimizer, opt_state_from, opt_state_parts
from jaxsys.train.program import Advance, CommittedStep, example_ids, init_params_f32, select_devices, target_count


class StepInputs(NamedTuple):
    """What the step reads besides the state; `STEP_INPUT_AXES` names each field's logical axes."""

    tokens_BxT1: Any
    """[B, T+1] int32: inputs are [:, :-1], targets [:, 1:] (< 0: padding, no loss)."""
    example_ids_B: Any
    """[B] int32: global example indices (the per-example dropout keys)."""
    step: Any
    """[] int32."""
    n_valid: Any
    """[] float32: targets in the batch (the loss and gradient scale)."""
    lr: Any
    """[] float32."""


STEP_INPUT_AXES = StepInputs(tokens_BxT1=(ax.BATCH, None), example_ids_B=(ax.BATCH,), step=(), n_valid=(), lr=())


def decay_mask_tree(cfg: LMTrainConfig) -> Any:
    """Per-leaf bool: which parameters get weight decay (the same rule as the elastic flat layout)."""
    from jaxsys.train.elastic.layout import FlatSpec

    spec = FlatSpec.from_shapes(decoder.param_shapes(cfg.model))
    return jax.tree.unflatten(spec.treedef, list(spec.decay))


def make_step_fn(cfg: LMTrainConfig, mesh, remat: Remat = KEEP_ALL) -> Callable:
    """step(state, inputs: StepInputs) -> (state, {"loss", "grad_norm"}), traced under `mesh`'s
    activation constraints (none for `mesh=None`). The loss goes through `remat`, the memory plan's
    `jax.checkpoint` policy per layer (`KEEP_ALL`: the step as written)."""
    mask = decay_mask_tree(cfg)

    def step_fn(state, inp: StepInputs):
        keys_B = objective.example_keys(jax.random.key(cfg.seed), inp.step, inp.example_ids_B)
        with activate(mesh):
            loss_sum, grads = jax.value_and_grad(remat(
                lambda p: objective.lm_loss_sum(p, inp.tokens_BxT1, keys_B, cfg=cfg.model,
                                                dropout=cfg.dropout)))(state["params"])
        grads = jax.tree.map(lambda g: g / inp.n_valid, grads)
        g_norm = optax.tree.norm(grads)
        grads = clip_by_norm(grads, g_norm, cfg.optim.clip_norm)
        params = state["params"]
        decay_in = jax.tree.map(lambda p, m: p if m else jnp.zeros_like(p), params, mask)
        opt = opt_state_from(state["count"], state["mu"], state["nu"])
        upd, new_opt = make_optimizer(cfg.optim, inp.lr).update(grads, opt, decay_in)
        count, mu, nu = opt_state_parts(new_opt)
        new = {"params": optax.apply_updates(params, upd), "mu": mu, "nu": nu, "count": count}
        return new, {"loss": loss_sum / inp.n_valid, "grad_norm": g_norm}

    return step_fn


def memory_shards(mesh) -> int:
    """How many ways the step splits its buffers, for the memory plan's per-device peak: the batch
    is split over data x fsdp, the parameters and optimizer state over fsdp x tensor, so
    fsdp x min(data, tensor) under-counts neither (exact for the default all-fsdp mesh)."""
    shape = dict(mesh.shape)
    return shape.get("fsdp", 1) * min(shape.get("data", 1), shape.get("tensor", 1))


class GSPMDStep:
    """The GSPMD step program (implements `jaxsys.train.program.StepProgram`).

    With a `memory:` section other than the default (`policy: keep`, no budget), the step's
    backward pass follows a memory plan (`jaxsys.train.memory.training`): planned in `build`,
    before compiling (an infeasible budget is an error there), printed when the run starts and
    written into the metrics file with the first step.
    """

    def __init__(self, cfg: LMTrainConfig, *, devices: Sequence[jax.Device] | None = None):
        self.cfg = cfg
        self.devices = select_devices(cfg, devices)
        self._count = 0
        self._state: dict[str, Any] | None = None
        self._compiled: Any = None
        self._log: Callable[[str], None] | None = None

    @property
    def count(self) -> int:
        return self._count

    # ------------------------------------------------------------------ layout
    def build(self) -> None:
        m = self.cfg.mesh
        try:
            self.mesh = make_mesh(MeshConfig(data=m.data, fsdp=m.fsdp, tensor=m.tensor), devices=self.devices)
        except ValueError as e:
            raise TrainConfigError(f"mesh: {e}") from None
        shapes = decoder.param_shapes(self.cfg.model)
        param_sh = tree_shardings(decoder.param_logical_axes(self.cfg.model), shapes, self.mesh)
        self._rep = logical_sharding((), (), self.mesh)
        self._state_sh = {"params": param_sh, "mu": param_sh, "nu": param_sh, "count": self._rep}
        self._input_sh = StepInputs(*(logical_sharding(axes, shape, self.mesh)
                                      for axes, shape in zip(STEP_INPUT_AXES, self._input_shapes())))
        self.memory = StepMemory(self.cfg.memory, self._planned_step, device=self.devices[0],
                                 shards=memory_shards(self.mesh), donate_argnums=(0,))
        remat = self.memory.remat_for(*self._global_args())
        self._step_fn = jax.jit(make_step_fn(self.cfg, self.mesh, remat),
                                in_shardings=(self._state_sh, self._input_sh),
                                out_shardings=(self._state_sh, self._rep), donate_argnums=(0,))

    def _planned_step(self, remat: Remat, state, inp: StepInputs):
        """The step in the memory planner's form, over global arrays (no mesh constraints)."""
        return make_step_fn(self.cfg, None, remat)(state, inp)

    def _global_args(self) -> tuple[Any, StepInputs]:
        """(state, inputs) as unsharded ShapeDtypeStructs: what the memory planner traces."""
        unsharded = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
        return jax.tree.map(unsharded, (self.abstract_state(), self._abstract_inputs()))

    @property
    def memory_plan(self) -> MemoryPlan | None:
        """The step's memory plan (None: `memory.policy=keep` without a budget, nothing planned)."""
        return self.memory.plan

    def _input_shapes(self) -> StepInputs:
        B, T = self.cfg.data.global_batch, self.cfg.data.seq_len
        return StepInputs(tokens_BxT1=(B, T + 1), example_ids_B=(B,), step=(), n_valid=(), lr=())

    def abstract_state(self) -> dict[str, Any]:
        shapes = decoder.param_shapes(self.cfg.model)
        is_shape = lambda s: isinstance(s, tuple) and all(isinstance(i, int) for i in s)  # noqa: E731
        p = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh), shapes,
                         self._state_sh["params"], is_leaf=is_shape)
        return {"params": p, "mu": p, "nu": p, "count": jax.ShapeDtypeStruct((), jnp.int32, sharding=self._rep)}

    def _abstract_inputs(self) -> StepInputs:
        dtypes = StepInputs(jnp.int32, jnp.int32, jnp.int32, jnp.float32, jnp.float32)
        return StepInputs(*(jax.ShapeDtypeStruct(shape, dt, sharding=sh)
                            for shape, dt, sh in zip(self._input_shapes(), dtypes, self._input_sh)))

    # ------------------------------------------------------------------ state
    def init_state(self) -> None:
        params = init_params_f32(self.cfg)
        tree = {"params": params, "mu": jax.tree.map(np.zeros_like, params),
                "nu": jax.tree.map(np.zeros_like, params), "count": np.zeros((), np.int32)}
        self.load_state(tree)

    def load_state(self, tree: dict[str, Any]) -> None:
        self._state = jax.device_put(tree, self._state_sh)
        self._count = int(jax.device_get(tree["count"]))

    def state_tree(self) -> dict[str, Any]:
        return self._state

    def params(self) -> Any:
        return jax.device_get(self._state["params"])

    # ------------------------------------------------------------------ the step
    def compile(self) -> Any:
        if self._compiled is None:
            self._compiled = self._step_fn.lower(self.abstract_state(), self._abstract_inputs()).compile()
        return self._compiled

    def start(self, step: int, *, log, checkpoints) -> None:
        self._log = log
        self.compile()

    def advance(self, step: int, tokens_BxT1: np.ndarray, lr: np.float32) -> Advance:
        inputs = StepInputs(tokens_BxT1=tokens_BxT1, example_ids_B=example_ids(step, tokens_BxT1.shape[0]),
                            step=np.int32(step), n_valid=np.float32(target_count(tokens_BxT1).sum()), lr=lr)
        started = time.perf_counter()
        self._state, metrics = self._compiled(self._state, inputs)
        self._count += 1
        events = [{"step": step, **e} for e in self.memory.report(self._log)]
        return Advance(step + 1, CommittedStep(step, metrics, float(lr), len(self.devices), started,
                                               events=events))
