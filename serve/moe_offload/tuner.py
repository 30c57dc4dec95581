"""Roofline tuner for MoE offloading with speculative decoding (SpecMoEOff's optimizer).

One cost model prices a verify step of B requests x (gamma + 1) tokens, layer by layer:

- expert fetch: the step needs U(B, gamma + 1) distinct experts per layer (measured on real text,
  `routing_stats.unique_experts`); a fraction h(C) hits the device cache of C experts (measured
  LRU replay); the misses cross the link: misses * expert_bytes / link_bandwidth;
- expert compute on the accelerator: max(FLOPs / peak, U * expert_bytes / memory bandwidth);
- the rest of the layer (attention projections, router, shared expert) likewise from its weights;
- attention over S cached tokens per request, on the accelerator or on the host (host roofline,
  plus the q/k/v/o transfers), the KV cache then not taking accelerator memory;
- fetch overlaps compute (prefetch / pipelining) when `overlap`; host attention overlaps the
  accelerator's work (two micro-batches) when placed on the host;
- the draft: n-gram lookup is free; an early-exit draft of n layers runs gamma single-token
  steps through n layers of the same machine;
- fixed overheads per layer and per step (launches, the routing read-back, bookkeeping).

Where the hardware carries the served model's compute measured on the machine itself
(`HardwareSpec.compute`, `MeasuredCompute`: this CPU), the device compute of plans that run the
offloaded runner as it is (device attention) is priced from those timings instead, piecewise-
linearly in the step's rows: the attention piece, the LM head, and the expert FFN as the runner
computes it, every row on each of the (rounded) active experts, in groups of cache slots padded to
power-of-two buckets. Fetches, overheads and everything else keep the model above.

A step emits B * (1 - a^(gamma+1)) / (1 - a) tokens (Leviathan et al.), or B times the tokens per
step measured for the draft at that gamma where the workload has them; throughput = tokens / time.
`choose` searches (gamma, batch, cache size, attention place, draft) within the memory sizes.

The same model prices the baselines of the comparison: offloading without speculation
(gamma = 0; Mixtral-offloading-like), Fiddler-like (missing experts computed on the host instead
of fetched) and MoE-Lightning-like (CPU attention + fetch/compute/attention fully pipelined,
no speculation, batch as large as memory allows).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from pydantic import Field, model_validator

from jaxsys.config_base import ConfigSection
from jaxsys.serve.speculative.acceptance import expected_tokens_per_step
from jaxsys.shapes import pow2_bucket


class TunerError(ValueError):
    """A tuning request that cannot be priced (bad hardware file, cache below top-k, gamma outside
    the compiled set, ...)."""


# ---------------------------------------------------------------------- hardware

class Accelerator(ConfigSection):
    flops: float = Field(gt=0, description="peak FLOP/s at the model's dtype")
    bandwidth: float = Field(gt=0, description="memory bandwidth, bytes/s")
    memory_bytes: float = Field(gt=0)
    reserved_bytes: float = Field(ge=0, default=0.0, description="context, activations, workspace")


class Link(ConfigSection):
    bandwidth: float = Field(gt=0, description="host -> accelerator copy bandwidth, bytes/s")
    overlaps_compute: bool = Field(default=True, description="copies run concurrently with the accelerator's "
                                   "compute (DMA engines: GPUs; not XLA:CPU, where a copy is the CPU's work)")


class Host(ConfigSection):
    flops: float = Field(gt=0)
    bandwidth: float = Field(gt=0)
    memory_bytes: float = Field(gt=0)


class Overhead(ConfigSection):
    per_layer_s: float = Field(ge=0, default=0.0)
    per_step_s: float = Field(ge=0, default=0.0)


def piecewise(rows_X: Sequence[int], times_X: Sequence[float], n: float) -> float:
    """The time at `n` rows, linear between measured row counts: below the first, the first's time;
    beyond the last, the last segment's slope (never negative) carried on. Monotone wherever the
    measured times are, and exact at every measured point."""
    if n <= rows_X[0]:
        return float(times_X[0])
    for r0, r1, t0, t1 in zip(rows_X, rows_X[1:], times_X, times_X[1:]):
        if n <= r1:
            return float(t0 + (t1 - t0) * (n - r0) / (r1 - r0))
    if len(rows_X) == 1:
        return float(times_X[0]) * n / rows_X[0]
    slope = max((times_X[-1] - times_X[-2]) / (rows_X[-1] - rows_X[-2]), 0.0)
    return float(times_X[-1] + slope * (n - rows_X[-1]))


class MeasuredCompute(ConfigSection):
    """One layer's and the LM head's compute, timed on the served model's own compiled pieces at
    several row counts (`machine.measure_compute`), which `predict` prices piecewise-linearly in
    rows instead of with one FLOP rate.

    Why: a backend's cost per row is not constant on the skinny shapes decode and verify steps run.
    On XLA:CPU a [1, D] x [D, V] product runs as a matrix-vector kernel and a few rows more as a
    general matrix product several times slower per row, so a single FLOP rate fits at most one of
    the row counts the tuner compares (1 for plain decode, gamma + 1 and more for verify steps).

    Every list is indexed like `rows` (tokens in the step: batch x tokens per request):
    - layer_decode_s: the layer's attention piece (norms, q/k/v/o, attention over `context`
      cached tokens per request, router, shared expert) for `rows` requests of one token each;
    - layer_verify_s: the same for one request of `rows` tokens (a verify step's attention reads one
      request's cache); a step of B requests x T tokens is priced between the two;
    - ffn_fixed_s, expert_s: the FFN call over the device expert cache, computed for every row on
      each active expert (`experts.routed_experts`): ffn_fixed_s + U * expert_s for U active
      experts (timed at 1 and at all experts);
    - head_s: final norm and LM head.
    shape: the `ModelShape` fields of the model measured (num_layers aside): the table prices that
    model only."""

    shape: dict[str, float]
    context: int = Field(ge=0)
    rows: tuple[int, ...]
    layer_decode_s: tuple[float, ...]
    layer_verify_s: tuple[float, ...]
    ffn_fixed_s: tuple[float, ...]
    expert_s: tuple[float, ...]
    head_s: tuple[float, ...]

    @model_validator(mode="after")
    def _check(self) -> "MeasuredCompute":
        if not self.rows or self.rows[0] < 1 or any(b <= a for a, b in zip(self.rows, self.rows[1:])):
            raise ValueError(f"rows must be increasing positive row counts, got {list(self.rows)}")
        for name in ("layer_decode_s", "layer_verify_s", "ffn_fixed_s", "expert_s", "head_s"):
            times = getattr(self, name)
            if len(times) != len(self.rows) or any(t < 0 for t in times):
                raise ValueError(f"{name} needs one time >= 0 per row count ({len(self.rows)}), got {list(times)}")
        return self

    def layer(self, batch: int, tokens: int) -> float:
        """The attention piece for `batch` requests of `tokens` tokens each."""
        n = batch * tokens
        decode, verify = piecewise(self.rows, self.layer_decode_s, n), piecewise(self.rows, self.layer_verify_s, n)
        return verify + (decode - verify) * ((batch - 1) / (n - 1) if n > 1 else 0.0)

    def experts(self, rows: int, active: float, slots: int) -> float:
        """The runner's FFN calls for `active` experts (rounded) with `slots` device slots per
        layer: groups of at most `slots` experts, each computed at its power-of-two bucket of slots."""
        fixed, per = piecewise(self.rows, self.ffn_fixed_s, rows), piecewise(self.rows, self.expert_s, rows)
        left, total = max(1, math.floor(active + 0.5)), 0.0
        while left > 0:
            group = min(left, slots)
            total += fixed + pow2_bucket(group, maximum=slots) * per
            left -= group
        return total

    def head(self, rows: int) -> float:
        return piecewise(self.rows, self.head_s, rows)


class HardwareSpec(ConfigSection):
    name: str
    accelerator: Accelerator
    link: Link
    host: Host
    overhead: Overhead = Overhead()
    compute: MeasuredCompute | None = Field(default=None, description="the served model's compute measured on "
                                            "this machine (`machine.measure_compute`); None: the roofline")


HARDWARE_DIR = Path(__file__).resolve().parents[2] / "configs" / "hardware"


def load_hardware(name_or_path: str | Path) -> HardwareSpec:
    """A hardware YAML by path, or by name from `configs/hardware/` (e.g. 'h100-pcie5.yaml')."""
    path = Path(name_or_path)
    if not path.exists():
        from importlib import resources

        candidates = [path.name, f"{path.name}.yaml"]
        try:
            folder = resources.files("jaxsys.configs") / "hardware"
        except ModuleNotFoundError:
            folder = HARDWARE_DIR
        found = [folder / c for c in candidates if (folder / c).is_file()]
        if not found:
            known = sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml"))
            raise TunerError(f"no hardware file {str(name_or_path)!r}; give a path or one of: {', '.join(known)}")
        text = found[0].read_text()
    else:
        text = path.read_text()
    try:
        return HardwareSpec.model_validate(yaml.safe_load(text))
    except Exception as e:  # pydantic's message names the bad field
        raise TunerError(f"invalid hardware file {str(name_or_path)!r}: {e}") from None


# ---------------------------------------------------------------------- model and workload

@dataclasses.dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    num_experts: int
    top_k: int
    expert_ffn: int
    shared_ffn: int = 0
    weight_bytes: float = 2.0  # per parameter
    kv_bytes: float = 2.0

    @property
    def expert_bytes(self) -> float:
        return 3 * self.hidden * self.expert_ffn * self.weight_bytes

    @property
    def dense_layer_bytes(self) -> float:
        D, Dh = self.hidden, self.head_dim
        attn = D * Dh * (2 * self.num_heads + 2 * self.num_kv_heads)
        return (attn + D * self.num_experts + 3 * D * self.shared_ffn) * self.weight_bytes

    @property
    def head_bytes(self) -> float:
        return self.vocab * self.hidden * self.weight_bytes

    @classmethod
    def from_config(cls, cfg: Any, weight_bytes: float | None = None) -> "ModelShape":
        nbytes = weight_bytes or (2.0 if cfg.dtype == "bfloat16" else 4.0)
        return cls(num_layers=cfg.num_layers, hidden=cfg.hidden_size, num_heads=cfg.num_heads,
                   num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab=cfg.vocab_size,
                   num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok, expert_ffn=cfg.moe_intermediate_size,
                   shared_ffn=cfg.shared_expert_intermediate_size, weight_bytes=nbytes, kv_bytes=nbytes)


MIXTRAL_8X7B = ModelShape(num_layers=32, hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128, vocab=32000,
                          num_experts=8, top_k=2, expert_ffn=14336)


@dataclasses.dataclass(frozen=True)
class Workload:
    """Measured statistics. unique_experts: {(batch, tokens per request): distinct experts per
    layer}; hit_rate: {cache slots: LRU hit rate}; acceptance: {draft name: per-token acceptance};
    draft_layers: {draft name: layers it runs (0 for n-gram lookup)}; context: cached tokens per
    request; tokens_per_step: {draft name: {gamma: tokens a request emits per verify step}} where
    measured (`step_tokens`)."""

    unique_experts: dict[tuple[int, int], float]
    hit_rate: dict[int, float]
    acceptance: dict[str, float]
    draft_layers: dict[str, int]
    context: int = 512
    tokens_per_step: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)

    def step_tokens(self, draft: str, gamma: int) -> float:
        """Tokens a request emits per verify step of `gamma` drafts: the measured value where there
        is one (a draft whose acceptances are not independent, like n-gram lookup, which proposes
        nothing or whole copied runs, is only described by it), else Leviathan et al.'s
        (1 - a^(g+1)) / (1 - a) with the per-token acceptance a."""
        if gamma == 0:
            return 1.0
        measured = self.tokens_per_step.get(draft, {})
        if gamma in measured:
            return measured[gamma]
        return expected_tokens_per_step(self.acceptance[draft], gamma)

    def unique(self, batch: int, tokens: int, num_experts: int) -> float:
        """U(b, t), interpolated in log(b * t) over the measured table, capped at E."""
        n = batch * tokens
        pts = sorted({(b * t, u) for (b, t), u in self.unique_experts.items()})
        if n <= pts[0][0]:
            return min(pts[0][1], num_experts)
        for (n0, u0), (n1, u1) in zip(pts, pts[1:]):
            if n <= n1:
                w = (math.log(n) - math.log(n0)) / max(math.log(n1) - math.log(n0), 1e-12)
                return min(u0 + w * (u1 - u0), num_experts)
        return min(pts[-1][1], num_experts)

    def hits(self, slots: int, num_experts: int) -> float:
        if slots >= num_experts:
            return 1.0
        known = sorted(self.hit_rate)
        below = [c for c in known if c <= slots]
        return self.hit_rate[below[-1]] if below else 0.0

    def rescaled(self, num_experts: int, top_k: int, from_experts: int, from_top_k: int) -> "Workload":
        """Carry the statistics of a model with (from_experts, from_top_k) to (num_experts, top_k).

        Distinct experts: each token picks k distinct experts, so n independent tokens leave an
        expert unused with probability (1 - k/E)^n. A measured U over a token set gives the set's
        effective number of independent tokens, n = log(1 - U/E') / log(1 - k'/E') (below the real
        count where consecutive tokens reuse experts), and that n is carried over:
        U = E (1 - (1 - k/E)^n). One token then needs exactly k experts, as it must. The hit rate is
        taken at the same cache fraction."""
        def carry(u: float) -> float:
            if u >= from_experts or from_top_k >= from_experts:  # every expert used: nothing to carry
                return float(num_experts)
            n = math.log(1 - u / from_experts) / math.log(1 - from_top_k / from_experts)
            return num_experts * (1 - (1 - top_k / num_experts) ** n)

        uniq = {bt: carry(u) for bt, u in self.unique_experts.items()}
        hits = {}
        for c in range(top_k, num_experts + 1):
            frac_slots = max(from_top_k, round(c / num_experts * from_experts))
            hits[c] = self.hits(frac_slots, from_experts)
        return dataclasses.replace(self, unique_experts=uniq, hit_rate=hits)


# ---------------------------------------------------------------------- the cost model

@dataclasses.dataclass(frozen=True)
class Plan:
    gamma: int
    batch: int
    cache_slots: int
    attention: str  # "device" | "host"
    draft: str  # a key of Workload.acceptance, or "none" when gamma == 0
    system: str = "ours"  # ours | offload | fiddler | moe-lightning


@dataclasses.dataclass(frozen=True)
class Prediction:
    plan: Plan
    step_s: float
    tokens_per_step: float
    tokens_per_s: float
    fits: bool
    parts: dict[str, float]


def _roof(flops: float, nbytes: float, peak: float, bw: float) -> float:
    return max(flops / peak, nbytes / bw)


def memory_fits(hw: HardwareSpec, m: ModelShape, plan: Plan, context: int) -> bool:
    acc = hw.accelerator
    dense = m.num_layers * m.dense_layer_bytes + 2 * m.head_bytes
    experts = plan.cache_slots * m.num_layers * m.expert_bytes
    kv = plan.batch * (context + plan.gamma + 1) * m.num_layers * 2 * m.num_kv_heads * m.head_dim * m.kv_bytes
    on_device = dense + experts + (kv if plan.attention == "device" else 0.0)
    host = m.num_layers * m.num_experts * m.expert_bytes + (kv if plan.attention == "host" else 0.0)
    return on_device <= acc.memory_bytes - acc.reserved_bytes and host <= hw.host.memory_bytes


def _measured_compute(hw: HardwareSpec, m: ModelShape, plan: Plan) -> MeasuredCompute | None:
    """The hardware's measured compute where it prices this plan (the runner's own pieces: attention
    and experts on the device), else None (the roofline). A table measured on another model's
    shapes prices nothing here: refused."""
    c = hw.compute
    if c is None or plan.attention != "device" or plan.system == "fiddler":
        return None
    mine = measured_shape(m)
    if {k: float(v) for k, v in c.shape.items()} != mine:
        raise TunerError(f"{hw.name}'s measured compute is for a model of shape {c.shape}; this model has {mine}: "
                         "measure it on this model (machine.measure_compute)")
    return c


def measured_shape(m: ModelShape) -> dict[str, float]:
    """The shape fields a `MeasuredCompute` table is valid for (every field but the depth: it times one layer)."""
    return {k: float(v) for k, v in dataclasses.asdict(m).items() if k != "num_layers"}


def predict(hw: HardwareSpec, m: ModelShape, w: Workload, plan: Plan, *, overlap: bool = True) -> Prediction:
    """Decode throughput of one plan under the cost model (module docstring)."""
    if plan.cache_slots < m.top_k:
        raise TunerError(f"an expert cache of {plan.cache_slots} slots per layer is smaller than top-k "
                         f"({m.top_k}): one token's experts would not fit")
    if plan.gamma > 0 and plan.draft not in w.acceptance:
        raise TunerError(f"no acceptance rate for draft {plan.draft!r}; measured: {', '.join(w.acceptance)}")
    acc, host = hw.accelerator, hw.host
    E, k, L = m.num_experts, m.top_k, m.num_layers
    t_req = plan.gamma + 1
    N = plan.batch * t_req
    U = w.unique(plan.batch, t_req, E)
    # a cache of C slots cannot hold more than C of the U experts a step needs
    misses = max(U * (1.0 - w.hits(plan.cache_slots, E)), U - plan.cache_slots)
    fetch = misses * m.expert_bytes / hw.link.bandwidth
    expert_flops = 2 * 3 * m.hidden * m.expert_ffn * N * k
    measured = _measured_compute(hw, m, plan)
    if measured is not None:  # the served model's pieces timed on this machine (attention in `dense`)
        experts = measured.experts(N, U, plan.cache_slots)
    elif plan.system == "fiddler":  # missing experts run on the host, where their weights are
        tok_per_expert = N * k / max(U, 1e-9)
        host_experts = misses * _roof(2 * 3 * m.hidden * m.expert_ffn * tok_per_expert, m.expert_bytes,
                                      host.flops, host.bandwidth)
        gpu_experts = _roof(expert_flops * (1 - misses / max(U, 1e-9)), (U - misses) * m.expert_bytes,
                            acc.flops, acc.bandwidth)
        fetch, experts = 0.0, max(gpu_experts, host_experts)
    else:
        experts = _roof(expert_flops, U * m.expert_bytes, acc.flops, acc.bandwidth)
    dense = _roof(2 * N * m.dense_layer_bytes / m.weight_bytes, m.dense_layer_bytes, acc.flops, acc.bandwidth)
    S = w.context + plan.gamma + 1
    attn_flops = 4 * N * S * m.num_heads * m.head_dim
    kv_bytes = plan.batch * S * 2 * m.num_kv_heads * m.head_dim * m.kv_bytes
    if measured is not None:
        dense, attention = measured.layer(plan.batch, t_req), 0.0
    elif plan.attention == "host":
        qkvo = N * (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim * m.kv_bytes
        attention = _roof(attn_flops, kv_bytes, host.flops, host.bandwidth) + qkvo / hw.link.bandwidth
    else:
        attention = _roof(attn_flops, kv_bytes, acc.flops, acc.bandwidth)
    device_work = dense + experts + (attention if plan.attention == "device" else 0.0)
    moved = max(fetch, device_work) if overlap else fetch + device_work
    if plan.attention == "host":
        layer = max(moved, attention) if plan.system in ("ours", "moe-lightning") else moved + attention
    else:
        layer = moved
    layer += hw.overhead.per_layer_s
    if measured is not None:
        head = measured.head(N)
    else:
        head = _roof(2 * N * m.head_bytes / m.weight_bytes, m.head_bytes, acc.flops, acc.bandwidth)
    target_step = L * layer + head + hw.overhead.per_step_s
    draft = 0.0
    if plan.gamma > 0 and w.draft_layers.get(plan.draft, 0) > 0:
        one = predict(hw, m, w, dataclasses.replace(plan, gamma=0, draft="none"), overlap=overlap)
        draft = plan.gamma * one.step_s * w.draft_layers[plan.draft] / L
    step = target_step + draft
    tps = plan.batch * w.step_tokens(plan.draft, plan.gamma)
    parts = {"fetch_s": L * fetch, "experts_s": L * experts, "dense_s": L * dense, "attention_s": L * attention,
             "head_s": head, "draft_s": draft, "overhead_s": L * hw.overhead.per_layer_s + hw.overhead.per_step_s,
             "misses_per_layer": misses, "unique_per_layer": U}
    return Prediction(plan, step, tps, tps / step, memory_fits(hw, m, plan, w.context), parts)


def max_cache_slots(hw: HardwareSpec, m: ModelShape, plan: Plan, context: int) -> int:
    """The most experts per layer that fit beside everything else (0 if not even top-k fits)."""
    best = 0
    for c in range(m.top_k, m.num_experts + 1):
        if memory_fits(hw, m, dataclasses.replace(plan, cache_slots=c), context):
            best = c
    return best


def candidate_plans(hw: HardwareSpec, m: ModelShape, w: Workload, *, system: str, gammas: Iterable[int],
                    batches: Iterable[int], attentions: Iterable[str], cache_slots: int | None = None
                    ) -> list[Plan]:
    plans = []
    drafts = [d for d in w.acceptance] or ["none"]
    for g in gammas:
        for b in batches:
            for place in attentions:
                for d in (drafts if g > 0 else ["none"]):
                    plan = Plan(g, b, m.top_k, place, d, system)
                    c = cache_slots if cache_slots is not None else max_cache_slots(hw, m, plan, w.context)
                    if c >= m.top_k:
                        plans.append(dataclasses.replace(plan, cache_slots=c))
    return plans


def choose(hw: HardwareSpec, m: ModelShape, w: Workload, plans: list[Plan], *, overlap: bool = True) -> Prediction:
    """The fitting plan with the highest predicted throughput."""
    preds = [p for p in (predict(hw, m, w, plan, overlap=overlap) for plan in plans) if p.fits]
    if not preds:
        raise TunerError("no plan fits the accelerator's and host's memory")
    return max(preds, key=lambda p: p.tokens_per_s)


SYSTEMS = {
    # system: (gammas, attention places, overlap)
    "ours": ((0, 1, 2, 3, 4, 5, 6, 8), ("device", "host"), True),
    "offload": ((0,), ("device",), True),
    "fiddler": ((0,), ("device",), True),
    "moe-lightning": ((0,), ("host",), True),
}


def best_of_system(hw: HardwareSpec, m: ModelShape, w: Workload, system: str, batches: Iterable[int]) -> Prediction:
    gammas, places, overlap = SYSTEMS[system]
    return choose(hw, m, w, candidate_plans(hw, m, w, system=system, gammas=gammas, batches=batches,
                                            attentions=places), overlap=overlap)


def check_gamma(gamma: int, compiled: Iterable[int]) -> None:
    compiled = sorted(set(compiled))
    if gamma not in compiled:
        raise TunerError(f"gamma {gamma} is outside the compiled set {compiled}; compile it or pick one of them")


def workload_from_evaluation(ev: dict[str, Any], *, mode: str = "greedy", context: int = 512) -> Workload:
    """A `Workload` from `moefy.evaluate`'s record: U(b, t), LRU hit rates and the drafts'
    acceptance (early exit: teacher-forced `mode` = greedy or sampled; n-gram: the reference loop)."""
    r = ev["routing"]
    uniq = {tuple(int(x) for x in key.split(",")): float(u) for key, u in r["unique_experts"].items()}
    hits = {int(c): float(h) for c, h in r["lru_hit_rate"].items()}
    acc, layers_ = {}, {}
    for name, a in ev.get("acceptance_teacher_forced", {}).items():
        acc[name] = float(a[mode])
        layers_[name] = int(name.rsplit("_", 1)[1])
    per_step = {}
    if "ngram" in ev:
        acc["ngram"] = float(ev["ngram"]["acceptance"])
        layers_["ngram"] = 0
        per_step["ngram"] = {int(g): float(r["tokens_per_step"]) for g, r in ev["ngram"].get("by_gamma", {}).items()}
    return Workload(uniq, hits, acc, layers_, context, per_step)
