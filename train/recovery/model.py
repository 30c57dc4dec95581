"""The performance model: step time, memory and recovery cost of a plan, and the expected time to
finish the job under each recovery strategy (Odyssey's unified model, arXiv 2508.21613).

A plan is a layout (dp pipelines x pp stages x tp tensor shards, a partition of the layers into
stages, a schedule) plus, after failures, a strategy that says how the failed devices' work is
covered:

* `reroute`   (ReCycle-like): a failed stage's micro-batches go to that stage's dp peers;
* `redundant` (Bamboo-like): a neighbouring stage of the same pipeline also runs the failed stage;
* `replan`    (Oobleck-like): the best new layout and partition over the survivors;
* `checkpoint`: restart from the last checkpoint on the best layout over the survivors.

Step time of a pipeline: with per-micro-batch stage times t_s = F_s + B_s (B includes the
re-run forward our stages do), the busiest device's work W plus the fill and drain of the
others: T = W + sum_s t_s - t_b, where t_b is the stage time of the busiest device (for an
unloaded grid: T = (n - 1) max_s t_s + sum_s t_s, the GPipe/1F1B formula). Stage-boundary
transfers add one activation (forward) and one cotangent (backward) per micro-batch and boundary
over the link between the two devices. The step ends with the data-parallel exchange of the
gradients and parameters (a reduce-scatter and an all-gather of the stage's parameters over its dp
peers) and the slowest pipeline.

Memory per device: the optimizer state (fully sharded), the held stages' compute copy, and
activations: one kept input per micro-batch in flight (all of them under GPipe, pp - s under
1F1B) plus one layer's backward working set per layer of the stage.

Expected time to finish after a failure = recovery cost + remaining steps x post-recovery step
time; `choose` takes the strategy that minimises it, `search_layouts` the best layout over a device
count (fast enough to run at failure time: `benchmarks/recovery.py` reports its time at 32 and 256
devices).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
from pathlib import Path
from typing import Iterable, Literal, Sequence

import yaml
from pydantic import Field

from jaxsys.config_base import ConfigSection

Strategy = Literal["reroute", "redundant", "replan", "checkpoint"]
STRATEGIES: tuple[str, ...] = ("reroute", "redundant", "replan", "checkpoint")
GB = 1e9


# ----------------------------------------------------------------------------- cluster config
class DeviceSection(ConfigSection):
    kind: str
    peak_tflops: float = Field(gt=0)
    mfu: float = Field(gt=0, le=1)
    memory_gib: float = Field(gt=0)


class LinkSection(ConfigSection):
    intra_node_gbps: float = Field(gt=0)
    inter_node_gbps: float = Field(gt=0)
    latency_us: float = Field(ge=0)


class ModelSection(ConfigSection):
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    seq_len: int = Field(gt=0)
    micro_size: int = Field(gt=0)
    global_batch: int = Field(gt=0)
    param_bytes: int = Field(gt=0)
    state_bytes_per_param: int = Field(gt=0)

    @property
    def num_micro(self) -> int:
        return self.global_batch // self.micro_size


class LayoutSection(ConfigSection):
    tp: int = Field(gt=0)
    """Tensor-parallel degree, kept through every re-plan (a different split of a contraction
    would change the bits); data and pipeline degrees, partition and schedule are searched."""


class FailureSection(ConfigSection):
    mtbf_hours_per_device: float = Field(gt=0)
    bursty_fraction: float = Field(ge=0, le=1)
    burst_size: int = Field(gt=0)
    repair_hours: float = Field(gt=0)


class RecoverySection(ConfigSection):
    detect_s: float = Field(ge=0)
    restart_s: float = Field(ge=0)
    checkpoint_every_s: float = Field(gt=0)
    checkpoint_read_gbps: float = Field(gt=0)
    compile_s: float = Field(ge=0)
    retarget_s: float = Field(ge=0)


class RunSection(ConfigSection):
    hours: float = Field(gt=0)


class ClusterConfig(ConfigSection):
    """A simulated cluster and job (`configs/cluster/*.yaml`): hardware, model shapes, the
    failure-free layout, failure and recovery parameters. Every number is an assumption."""

    name: str
    devices: int = Field(gt=0)
    devices_per_node: int = Field(gt=0)
    device: DeviceSection
    links: LinkSection
    model: ModelSection
    layout: LayoutSection
    failures: FailureSection
    recovery: RecoverySection
    run: RunSection


def load_cluster(name_or_path: str | Path) -> ClusterConfig:
    """A cluster config: a YAML path or a packaged name (`h100_32` -> configs/cluster/h100_32.yaml)."""
    p = Path(name_or_path)
    if not p.is_file():
        res = importlib.resources.files("jaxsys.configs").joinpath("cluster", f"{name_or_path}.yaml")
        if not res.is_file():
            known = sorted(x.name.removesuffix(".yaml") for x in
                           importlib.resources.files("jaxsys.configs").joinpath("cluster").iterdir()
                           if x.name.endswith(".yaml"))
            raise FileNotFoundError(f"no cluster config {name_or_path!r}; packaged: {', '.join(known)}")
        p = Path(str(res))
    return ClusterConfig.model_validate(yaml.safe_load(p.read_text()))


# ----------------------------------------------------------------------------- costs
def layer_flops(m: ModelSection) -> float:
    """Forward FLOPs of one decoder layer for one micro-batch: 2 x (its matmul parameters) per token
    plus the two attention matmuls (QK^T and PV over all T keys, as the masked kernel computes)."""
    D, F, T, b = m.hidden_size, m.intermediate_size, m.seq_len, m.micro_size
    dh = D // m.num_heads
    params = D * dh * (2 * m.num_heads + 2 * m.num_kv_heads) + 3 * D * F
    return b * T * (2.0 * params + 4.0 * T * D)


def head_flops(m: ModelSection) -> float:
    return m.micro_size * m.seq_len * 2.0 * m.hidden_size * m.vocab_size


@dataclasses.dataclass(frozen=True)
class Costs:
    """Per-micro-batch times (seconds) and sizes (bytes) of the units on the target device.

    `bwd_ratio`/`head_ratio`/`embed_ratio` are what our CPU measurements carry over
    (`benchmarks/recovery.py`): a backward as a multiple of a forward (our backward re-runs the
    forward), the head's and the embedding's time as a multiple of a layer's. The absolute scale is
    FLOPs / (peak x MFU) of the stated device."""

    layer_fwd: float
    layer_bwd: float
    head_fwd: float
    head_bwd: float
    embed_fwd: float
    embed_bwd: float
    act_bytes: float
    """One stage-boundary activation (micro-batch x tokens x hidden x compute bytes)."""
    layer_work_bytes: float
    """Backward working set of one layer for one micro-batch."""
    layer_params: float
    edge_params: float
    """Embedding + head parameters."""
    param_bytes: float
    state_bytes_per_param: float

    @classmethod
    def for_cluster(cls, c: ClusterConfig, *, bwd_ratio: float, head_ratio: float | None = None,
                    embed_ratio: float = 0.05) -> "Costs":
        m = c.model
        rate = c.device.peak_tflops * 1e12 * c.device.mfu
        f = layer_flops(m) / rate
        h = head_flops(m) / rate if head_ratio is None else head_ratio * f
        D, F, T, b = m.hidden_size, m.intermediate_size, m.seq_len, m.micro_size
        dh = D // m.num_heads
        lp = D * dh * (2 * m.num_heads + 2 * m.num_kv_heads) + 3 * D * F + 2 * D
        act = b * T * D * m.param_bytes
        work = b * T * (6 * D + 3 * F) * m.param_bytes + b * m.num_heads * T * T * 4
        return cls(layer_fwd=f, layer_bwd=bwd_ratio * f, head_fwd=h, head_bwd=bwd_ratio * h,
                   embed_fwd=embed_ratio * f, embed_bwd=embed_ratio * f, act_bytes=act, layer_work_bytes=work,
                   layer_params=lp, edge_params=2 * m.vocab_size * D + D, param_bytes=m.param_bytes,
                   state_bytes_per_param=m.state_bytes_per_param)


@dataclasses.dataclass(frozen=True)
class Hardware:
    devices_per_node: int
    intra_bw: float
    inter_bw: float
    latency: float
    memory: float

    @classmethod
    def of(cls, c: ClusterConfig) -> "Hardware":
        return cls(c.devices_per_node, c.links.intra_node_gbps * GB, c.links.inter_node_gbps * GB,
                   c.links.latency_us * 1e-6, c.device.memory_gib * 2**30)

    def transfer(self, nbytes: float, *, same_node: bool) -> float:
        return self.latency + nbytes / (self.intra_bw if same_node else self.inter_bw)


# ----------------------------------------------------------------------------- layouts and plans
@dataclasses.dataclass(frozen=True)
class Layout:
    dp: int
    pp: int
    tp: int
    partition: tuple[int, ...]
    schedule: str = "1f1b"

    @property
    def devices(self) -> int:
        return self.dp * self.pp * self.tp

    def __str__(self) -> str:
        return f"dp{self.dp}xpp{self.pp}xtp{self.tp}[{'+'.join(map(str, self.partition))}]/{self.schedule}"


@dataclasses.dataclass(frozen=True)
class Degraded:
    """Failed (pipeline, stage) cells of a layout and how each is covered."""

    strategy: Strategy
    cells: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Estimate:
    step_s: float
    feasible: bool
    why: str = ""
    memory_bytes: float = 0.0
    """Peak over devices."""
    bubble: float = 0.0
    """Time-weighted idle fraction of the pipelines' devices."""


def stage_times(layout: Layout, costs: Costs, hw: Hardware) -> list[float]:
    """t_s = F_s + B_s per micro-batch (tensor-parallel shards split the layer work and add two
    all-reduces of an activation per layer and pass)."""
    tp = layout.tp
    ar = 0.0 if tp == 1 else 4 * hw.transfer(2 * costs.act_bytes * (tp - 1) / tp, same_node=True)
    out = []
    L = len(layout.partition)
    for s, n in enumerate(layout.partition):
        t = n * ((costs.layer_fwd + costs.layer_bwd) / tp + ar)
        if s == 0:
            t += (costs.embed_fwd + costs.embed_bwd) / tp
        if s == L - 1:
            t += (costs.head_fwd + costs.head_bwd) / tp
        out.append(t)
    return out


def _boundary(layout: Layout, costs: Costs, hw: Hardware) -> float:
    """Forward + backward transfer of one micro-batch across one stage boundary."""
    same = layout.tp * 2 <= hw.devices_per_node
    return 2 * hw.transfer(costs.act_bytes / layout.tp, same_node=same)


def _dp_sync(layout: Layout, costs: Costs, hw: Hardware) -> float:
    if layout.dp == 1:
        return 0.0
    max_params = max(n * costs.layer_params for n in layout.partition) + costs.edge_params / 2
    nbytes = 2 * max_params / layout.tp * 4 * (layout.dp - 1) / layout.dp  # fp32 grads, RS + AG
    same = layout.devices <= hw.devices_per_node
    return hw.transfer(nbytes, same_node=same)


def memory(layout: Layout, costs: Costs, n_micro: int, *, extra_stage: int | None = None,
           extra_micro: float = 0.0) -> float:
    """Peak bytes on one device of the layout (see the module docstring)."""
    P = layout.pp
    total_params = sum(layout.partition) * costs.layer_params + costs.edge_params
    state = total_params * costs.state_bytes_per_param / layout.devices
    peak = 0.0
    for s, n in enumerate(layout.partition):
        params = n * costs.layer_params + (costs.edge_params / 2 if s in (0, P - 1) else 0.0)
        layers = n
        if extra_stage is not None and s == extra_stage:
            params += layout.partition[s] * costs.layer_params
            layers += n
        in_flight = n_micro if layout.schedule == "gpipe" else min(n_micro, P - s)
        acts = (in_flight + extra_micro) * costs.act_bytes / layout.tp + layers * costs.layer_work_bytes / layout.tp
        peak = max(peak, state + params * costs.param_bytes / layout.tp + acts)
    return peak


def estimate(layout: Layout, costs: Costs, hw: Hardware, num_micro: int,
             degraded: Degraded | None = None) -> Estimate:
    """Step time and peak memory of `layout` computing `num_micro` micro-batches, optionally with
    failed cells covered by a strategy (`reroute` or `redundant`)."""
    if layout.devices <= 0 or num_micro < layout.dp:
        return Estimate(math.inf, False, "fewer micro-batches than pipelines")
    t = stage_times(layout, costs, hw)
    comm = _boundary(layout, costs, hw) if layout.pp > 1 else 0.0
    t_eff = [x + (comm if layout.pp > 1 else 0.0) for x in t]
    n = num_micro / layout.dp
    base = (n - 1) * max(t_eff) + sum(t_eff)
    busy = n * sum(t)
    mem = memory(layout, costs, math.ceil(n))
    step = base
    if degraded is not None and degraded.cells:
        step, mem_extra, why = _degraded(layout, costs, hw, t_eff, n, degraded)
        if why:
            return Estimate(math.inf, False, why)
        mem = max(mem, mem_extra)
    if mem > hw.memory:
        return Estimate(math.inf, False, f"needs {mem / 2**30:.1f} GiB per device, has {hw.memory / 2**30:.0f}",
                        memory_bytes=mem)
    step += _dp_sync(layout, costs, hw)
    bubble = max(0.0, 1.0 - busy / (layout.pp * step)) if step > 0 else 0.0
    return Estimate(step, True, memory_bytes=mem, bubble=bubble)


def _degraded(layout: Layout, costs: Costs, hw: Hardware, t: list[float], n: float, deg: Degraded):
    """(step time, peak memory, reason if infeasible) with failed cells covered by deg.strategy."""
    dp, pp = layout.dp, layout.pp
    failed = set(deg.cells)
    per_stage_failed = [sum(1 for d, s in failed if s == st) for st in range(pp)]
    if deg.strategy == "reroute":
        if any(k >= dp for k in per_stage_failed):
            return math.inf, 0.0, "a stage lost every data-parallel replica"
        # the busiest peer of the most loaded stage takes its share of the lost cells' micro-batches
        worst, mem = 0.0, 0.0
        cross = 2 * hw.transfer(costs.act_bytes / layout.tp, same_node=False)
        for st in range(pp):
            k = per_stage_failed[st]
            if k == 0:
                continue
            load = n * dp / (dp - k)
            worst = max(worst, load * (t[st] + cross) + sum(t) - t[st])
            mem = max(mem, memory(layout, costs, math.ceil(n), extra_micro=load - n))
        base = (n - 1) * max(t) + sum(t)
        return max(worst, base), mem, ""
    if deg.strategy == "redundant":
        worst, mem = 0.0, 0.0
        for d, s in failed:
            nb = s - 1 if s > 0 else s + 1
            if pp == 1 or (d, nb) in failed:
                return math.inf, 0.0, "no live neighbouring stage to run the failed one"
            load = n * (t[s] + t[nb])
            worst = max(worst, load + sum(t) - t[s] - t[nb])
            mem = max(mem, memory(layout, costs, math.ceil(n), extra_stage=nb))
        base = (n - 1) * max(t) + sum(t)
        return max(worst, base), mem, ""
    raise ValueError(f"strategy {deg.strategy!r} does not degrade a layout (it changes it)")


# ----------------------------------------------------------------------------- search
def partition_for(num_layers: int, pp: int, costs: Costs) -> tuple[int, ...]:
    """Contiguous layers per stage that minimise the slowest stage (embedding on the first,
    head on the last); closed form for equal layers."""
    per = costs.layer_fwd + costs.layer_bwd
    first = (costs.embed_fwd + costs.embed_bwd) / per
    last = (costs.head_fwd + costs.head_bwd) / per
    return _balanced_partition(num_layers, pp, round(first, 3), round(last, 3))


@functools.lru_cache(maxsize=4096)
def _balanced_partition(L: int, pp: int, first: float, last: float) -> tuple[int, ...]:
    """Equal-cost layers: the smallest bound B such that stages (first carrying `first` extra layer
    units, last `last`) fit, found by bisection over integer bounds plus the fractional extras."""
    if pp == 1:
        return (L,)
    best = None
    lo, hi = 1, L
    while lo <= hi:
        mid = (lo + hi) // 2
        cap = mid + max(first, last)
        sizes = _fit(L, pp, cap, first, last)
        if sizes is not None:
            best, hi = sizes, mid - 1
        else:
            lo = mid + 1
    if best is None:
        base, extra = divmod(L, pp)
        best = tuple(base + (1 if s < extra else 0) for s in range(pp))
    return best


def _fit(L: int, pp: int, cap: float, first: float, last: float) -> tuple[int, ...] | None:
    sizes = []
    left = L
    for s in range(pp):
        extra = (first if s == 0 else 0.0) + (last if s == pp - 1 else 0.0)
        room = int(math.floor(cap - extra + 1e-9))
        need_after = pp - s - 1
        take = min(room, left - need_after)
        if take < 1:
            return None
        sizes.append(take)
        left -= take
    return tuple(sizes) if left == 0 else None


def candidate_layouts(num_devices: int, num_layers: int, costs: Costs, hw: Hardware,
                      tps: Iterable[int] = (1, 2, 4, 8), schedules: Sequence[str] = ("1f1b", "gpipe"),
                      fixed_tp: int | None = None) -> list[Layout]:
    out = []
    for tp in ([fixed_tp] if fixed_tp else tps):
        if tp > hw.devices_per_node or tp > num_devices:
            continue
        for pp in range(1, min(num_layers, num_devices // tp) + 1):
            dp = num_devices // (pp * tp)
            if dp < 1:
                continue
            part = partition_for(num_layers, pp, costs)
            for sched in schedules:
                out.append(Layout(dp, pp, tp, part, sched))
    return out


def search_layouts(num_devices: int, costs: Costs, hw: Hardware, num_layers: int, num_micro: int, *,
                   fixed_tp: int | None = None) -> tuple[Layout, Estimate] | None:
    """The fastest feasible layout over `num_devices` (devices left over idle); None if none fits."""
    best = None
    for lay in candidate_layouts(num_devices, num_layers, costs, hw, fixed_tp=fixed_tp):
        if num_micro < lay.dp:
            continue
        est = estimate(lay, costs, hw, num_micro)
        if est.feasible and (best is None or est.step_s < best[1].step_s):
            best = (lay, est)
    return best


# ----------------------------------------------------------------------------- recovery choice
@dataclasses.dataclass(frozen=True)
class Option:
    strategy: str
    layout: Layout
    degraded: Degraded | None
    recovery_s: float
    step_s: float
    lost_s: float = 0.0
    feasible: bool = True
    why: str = ""

    def time_to_finish(self, remaining_steps: float) -> float:
        """Expected time to finish = recovery cost (incl. lost work) + remaining steps x step time."""
        if not self.feasible:
            return math.inf
        return self.recovery_s + self.lost_s + remaining_steps * self.step_s


@dataclasses.dataclass(frozen=True)
class RecoveryParams:
    detect_s: float
    restart_s: float
    checkpoint_every_s: float
    checkpoint_read_bw: float
    compile_s: float
    retarget_s: float

    @classmethod
    def of(cls, c: ClusterConfig) -> "RecoveryParams":
        r = c.recovery
        return cls(r.detect_s, r.restart_s, r.checkpoint_every_s, r.checkpoint_read_gbps * GB, r.compile_s,
                   r.retarget_s)


def options(layout: Layout, failed_cells: Sequence[tuple[int, int]], survivors: int, costs: Costs, hw: Hardware,
            rp: RecoveryParams, *, num_layers: int, num_micro: int, since_checkpoint_s: float) -> list[Option]:
    """Every strategy's option after the cells `failed_cells` of `layout` were lost (`survivors`
    devices remain). Reroute and redundancy keep the layout; re-planning and checkpoint restart
    move to the best layout over the survivors (with tp kept: a tensor split changes the bits)."""
    state_per_dev = _state_per_device(survivors, costs, num_layers)
    reshard = hw.transfer(state_per_dev / max(survivors, 1), same_node=False)  # the lost shard, spread out
    out = []
    for strat in ("reroute", "redundant"):
        deg = Degraded(strat, tuple(sorted(set(failed_cells))))
        est = estimate(layout, costs, hw, num_micro, deg)
        out.append(Option(strat, layout, deg, rp.detect_s + reshard + rp.retarget_s, est.step_s,
                          feasible=est.feasible, why=est.why))
    return out + relayout_options(layout, survivors, costs, hw, rp, num_layers=num_layers, num_micro=num_micro,
                                  since_checkpoint_s=since_checkpoint_s)


def _state_per_device(survivors: int, costs: Costs, num_layers: int) -> float:
    total_params = num_layers * costs.layer_params + costs.edge_params
    return total_params * costs.state_bytes_per_param / max(survivors, 1)


def relayout_options(layout: Layout, survivors: int, costs: Costs, hw: Hardware, rp: RecoveryParams, *,
                     num_layers: int, num_micro: int, since_checkpoint_s: float) -> list[Option]:
    """The options that move to a new layout over the `survivors` (re-planning and checkpoint
    restart), with `layout`'s tp kept; they do not depend on how the old layout was covered, so
    they also apply after a failure of a layout that an earlier recovery degraded."""
    found = search_layouts(survivors, costs, hw, num_layers, num_micro, fixed_tp=layout.tp)
    if found is None:
        why = f"no layout of {survivors} devices fits in memory ({hw.memory / 2**30:.3g} GiB per device)"
        return [Option("replan", layout, None, math.inf, math.inf, feasible=False, why=why),
                Option("checkpoint", layout, None, math.inf, math.inf, feasible=False, why=why)]
    new, est = found
    state_per_dev = _state_per_device(survivors, costs, num_layers)
    move = hw.transfer(state_per_dev, same_node=False)  # a new layout moves (up to) every device's state
    load = state_per_dev / rp.checkpoint_read_bw
    return [Option("replan", new, None, rp.detect_s + move + rp.compile_s, est.step_s),
            Option("checkpoint", new, None, rp.detect_s + rp.restart_s + load + rp.compile_s, est.step_s,
                   lost_s=since_checkpoint_s)]


def choose(opts: Sequence[Option], remaining_steps: float) -> Option:
    """The option with the least expected time to finish (ties: the listed order)."""
    return min(opts, key=lambda o: o.time_to_finish(remaining_steps))
