"""Host side of the pipelined step: a layout (devices, work plan, partition, schedule), the train
state on it, and one call per training step.

    run = PipelineRun(setup, devices, layout=PipelineLayout.grid(dp=2, pp=2, partition=...))
    run.init_state(params)
    metrics = run.step(step, tokens_BxT1, lr)

`PipelineRun` is deliberately small: it owns the flat state ([3, N*S] elastic layout), the
compiled programs (an `ExecutableCache`, keyed by spec and device set) and the host inputs of a
step. Recovery strategies (`jaxsys.train.recovery`) change its layout and move its state;
the trainer's host loop drives `step`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.models.config import ModelConfig
from jaxsys.train.config import OptimConfig
from jaxsys.train.elastic import canonical
from jaxsys.train.elastic.compile import ExecutableCache
from jaxsys.train.elastic.layout import FlatLayout, ceil_div
from jaxsys.train.optim import compiled_optim
from jaxsys.train.pipeline.partition import StageMap, StagePartition
from jaxsys.train.pipeline.schedule import ScheduleTables, WorkPlan, compile_schedule
from jaxsys.train.pipeline.step import (ReduceSpec, abstract_gather_args, abstract_update_args, held_layer_table,
                                        make_gather, make_update, pack_gradients, run_schedule)
from jaxsys.train.pipeline.units import UnitPrograms


@dataclasses.dataclass(frozen=True)
class PipelineSetup:
    """What does not change when the layout does: the model, optimizer and global batch."""

    model: ModelConfig
    optim: OptimConfig
    num_micro: int
    micro_size: int
    seq_len: int
    dropout: float = 0.0
    seed: int = 0
    chunk: int = 1024
    keep_input: bool = False
    """The update keeps the state it starts from instead of donating it (a per-step snapshot holds
    that state as its primary copy)."""

    @property
    def global_batch(self) -> int:
        return self.num_micro * self.micro_size


@dataclasses.dataclass(frozen=True)
class PipelineLayout:
    """A partition into stages, a work plan over N devices and a schedule."""

    partition: StagePartition
    plan: WorkPlan
    schedule: str = "1f1b"

    @classmethod
    def grid(cls, *, dp: int, pp: int, num_micro: int, partition: StagePartition | None = None,
             num_layers: int | None = None, schedule: str = "1f1b",
             num_devices: int | None = None) -> "PipelineLayout":
        """dp pipelines of pp stages (`WorkPlan.grid`) on the first dp*pp of `num_devices` devices
        (default dp*pp; the others hold only their shard of the state)."""
        if partition is None:
            if num_layers is None:
                raise ValueError("give a partition or num_layers")
            partition = StagePartition.balanced(num_layers, pp)
        if partition.num_stages != pp:
            raise ValueError(f"partition {partition} has {partition.num_stages} stages, pp={pp}")
        plan = WorkPlan.grid(dp, pp, num_micro)
        return cls(partition, plan if num_devices is None else plan.widened(num_devices), schedule)

    def tables(self) -> ScheduleTables:
        return compile_schedule(self.plan, self.schedule)


class PipelineRun:
    """The flat train state on `devices` and the pipelined step of `layout` (module docstring)."""

    def __init__(self, setup: PipelineSetup, devices: Sequence[jax.Device], layout: PipelineLayout, *,
                 cache: ExecutableCache | None = None):
        self.setup = setup
        self.cache = cache if cache is not None else ExecutableCache()
        self.flat_spec = StageMap.make(setup.model, layout.partition).flat
        self.flat: jax.Array | None = None
        self.count = 0
        self.compile_s = 0.0
        self._units: UnitPrograms | None = None
        self._pack_cache: dict = {}
        self.last_counts: dict[str, int] = {}
        self.set_layout(devices, layout)

    # ------------------------------------------------------------------ layout
    def set_layout(self, devices: Sequence[jax.Device], layout: PipelineLayout) -> None:
        """Adopt a new device set and layout (the state must already be laid out on `devices`)."""
        if layout.plan.num_devices != len(devices):
            raise ValueError(f"the work plan is for {layout.plan.num_devices} devices, got {len(devices)}")
        if layout.plan.num_micro != self.setup.num_micro:
            raise ValueError(f"the work plan has {layout.plan.num_micro} micro-batches, the global batch "
                             f"{self.setup.num_micro}: every layout computes the same global batch")
        self.devices = list(devices)
        self.layout = layout
        self.tables = layout.tables()
        self.held = held_layer_table(self.tables, layout.partition)
        self.spec = ReduceSpec(model=self.setup.model, partition=layout.partition,
                               optim=compiled_optim(self.setup.optim), num_devices=len(devices),
                               num_micro=self.setup.num_micro, grad_slots=self.tables.num_grad_slots,
                               held_layers=self.held.shape[1], chunk=self.setup.chunk,
                               donate=not self.setup.keep_input)
        self.mesh = canonical.layout_mesh(self.devices)

    @property
    def flat_layout(self) -> FlatLayout:
        return FlatLayout(self.flat_spec.num_params, tuple(d.id for d in self.devices))

    def programs(self, spec: ReduceSpec | None = None, devices: Sequence[jax.Device] | None = None):
        """(gather, update) executables for `spec` on `devices` (default: the current ones)."""
        spec = self.spec if spec is None else spec
        devices = self.devices if devices is None else list(devices)
        t0 = time.perf_counter()
        gather = self.cache.get("pipeline_gather", spec, devices, lambda devs: (
            make_gather(spec, canonical.layout_mesh(devs)), abstract_gather_args(spec, canonical.layout_mesh(devs))))
        update = self.cache.get("pipeline_update", spec, devices, lambda devs: (
            make_update(spec, canonical.layout_mesh(devs)), abstract_update_args(spec, canonical.layout_mesh(devs))))
        self.compile_s += time.perf_counter() - t0
        return gather, update

    def precompile(self) -> None:
        """Compile the programs and the units of the current layout (no step runs)."""
        self.programs()
        for dev in self.devices:
            for name in ("keys", "embed_forward", "embed_backward", "layer_forward", "layer_backward", "head_backward"):
                self.units.get(name, dev)

    @property
    def units(self) -> UnitPrograms:
        if self._units is None:
            st = self.setup
            self._units = UnitPrograms.shared(st.model, micro_size=st.micro_size, seq_len=st.seq_len,
                                              dropout=st.dropout, seed=st.seed)
        return self._units

    # ------------------------------------------------------------------ state
    def init_state(self, params: Any) -> None:
        """Fresh state: `params` (a float32 host tree), zero Adam moments, count 0."""
        P = self.flat_spec.num_params
        host = np.zeros((3, P), np.float32)
        host[0] = self.flat_spec.flatten_np(params)
        self.load_flat_host(host, count=0)

    def load_flat_host(self, host_3xP: np.ndarray, *, count: int) -> None:
        N, P = len(self.devices), self.flat_spec.num_params
        S = ceil_div(P, N)
        buf = np.zeros((3, N * S), np.float32)
        buf[:, :P] = host_3xP
        self.flat = jax.device_put(buf, canonical.state_sharding(self.mesh))
        self.count = count

    def flat_host(self) -> np.ndarray:
        """[3, P] params, Adam mu, Adam nu (host copy)."""
        return np.asarray(jax.device_get(self.flat))[:, :self.flat_spec.num_params]

    # ------------------------------------------------------------------ step
    def step(self, step: int, tokens_BxT1: np.ndarray, lr: float) -> dict[str, Any]:
        """Run training step `step` on its global batch [B, T+1]; returns its metrics (host values)."""
        st = self.setup
        B = st.global_batch
        if tokens_BxT1.shape != (B, st.seq_len + 1):
            raise ValueError(f"tokens must be [{B}, {st.seq_len + 1}], got {list(tokens_BxT1.shape)}")
        gather, update = self.programs()
        tok = tokens_BxT1.astype(np.int32).reshape(st.num_micro, st.micro_size, -1)
        ex = np.arange(step * B, (step + 1) * B, dtype=np.int32).reshape(st.num_micro, st.micro_size)
        n_valid = np.float32(np.count_nonzero(tokens_BxT1[:, 1:] >= 0))
        layers, embed, head = gather(self.flat, self.held)
        pieces, losses, counts = run_schedule(self.units, self.tables, self.layout.partition, self.devices, self.held,
                                              layers, embed, head, tok, ex, step)
        smax = StageMap.make(st.model, self.layout.partition).max_stage_size
        g, l = pack_gradients(pieces, losses, self.devices, smax, self.mesh, self._pack_cache)
        self.flat, _, metrics = update(self.flat, g, l, self.tables.grad_stage, self.tables.grad_row,
                                       np.int32(self.count), n_valid, np.float32(lr))
        self.count += 1
        self.last_counts = counts
        return jax.device_get(metrics)

    def memory_report(self) -> dict[str, Any]:
        """Per-device memory of the current layout, from the schedule: the parameters of the held
        stages, the activations kept between a micro-batch's forward and backward (each layer's
        input, for every micro-batch in flight), the gradient slots; plus the compiled gather and
        update programs' own analysis."""
        cfg, st = self.setup.model, self.setup
        smap = StageMap.make(cfg, self.layout.partition)
        t = self.tables
        act_bytes = st.micro_size * st.seq_len * cfg.hidden_size * jnp.dtype(cfg.dtype).itemsize
        in_flight = t.peak_in_flight()
        per_device = []
        for d in range(len(self.devices)):
            held = [int(s) for s in t.param_stages[d] if s >= 0]
            layers = sum(self.layout.partition.layers[s] for s in held)
            per_device.append({
                "device": self.devices[d].id, "stages": held,
                "param_bytes": int(4 * sum(smap.stage_sizes[s] for s in held)),
                "micro_batches_in_flight": int(in_flight[d]),
                "kept_activation_bytes": int(in_flight[d] * layers * act_bytes + t.peak_buffers[d] * act_bytes),
                "grad_slot_bytes": int(4 * (t.grad_stage[d] >= 0).sum() * smap.max_stage_size),
            })
        gather, update = self.programs()
        out = {"per_device": per_device, "activation_bytes": int(act_bytes),
               "bubble_fraction_slots": t.bubble_fraction(), "rounds": t.num_rounds}
        for name, exe in (("gather", gather), ("update", update)):
            try:
                ma = exe.memory_analysis()
                out[f"compiled_{name}"] = {k: int(getattr(ma, k)) for k in (
                    "temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes") if hasattr(ma, k)}
            except Exception as e:  # not every backend reports it
                out[f"compiled_{name}"] = {"unavailable": str(e)}
        return out
