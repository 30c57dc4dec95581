"""The planner: keep, recompute or offload each named residual, the fastest plan within a budget.

A plan is one decision per residual name (a name covers the stack of layers: the layers share one
scanned body, hence one policy). Its cost comes from the profile (`jaxsys.train.memory.profiler`):

* memory: the step's modelled peak per device: the probe timeline minus the residuals not kept,
  plus what recomputation and host staging add inside the layer scans;
* time: the probe step's time, plus the recomputation the plan adds (its FLOPs at the measured
  throughput), plus the host transfers that compute cannot hide (a layer's offload overlaps the
  next layer's forward, its reload the previous layer's backward, at the measured link rate).

With up to 12 names every one of the 3^n plans is scored (vectorised; the decoder tags 10 per dense
layer), so the plan is the optimum of that model; beyond that a greedy pass runs. Keeping
everything without any checkpoint is a candidate too when the budget allows it. A plan is executed
through `MemoryPlan.remat` (or `.policy()`, a `jax.checkpoint` policy built with
`save_and_offload_only_these_names`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from jaxsys.train.memory.costs import Hardware
from jaxsys.train.memory.profiler import DECISIONS, KEEP, OFFLOAD, RECOMPUTE, Profile
from jaxsys.train.memory.remat import Remat

EXHAUSTIVE_MAX_NAMES = 12
NO_BUDGET = 2**62
"""The budget of a plan made without one (a fixed policy that no budget constrains)."""


class InfeasibleBudgetError(ValueError):
    """No plan fits the budget; `smallest_bytes` is the least any plan needs."""

    def __init__(self, budget_bytes: int, smallest_bytes: int, what: str = "no keep/recompute/offload plan"):
        self.budget_bytes, self.smallest_bytes = int(budget_bytes), int(smallest_bytes)
        super().__init__(
            f"memory budget {_mib(budget_bytes)} is too small: {what} fits it; the smallest feasible "
            f"budget for this step is {_mib(smallest_bytes)} ({smallest_bytes} bytes, modelled peak per "
            "device with every residual offloaded or recomputed); raise memory.budget, shorten the "
            "sequences or shard over more devices")


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def resolve_budget(budget: float | int, hardware: Hardware | None) -> int:
    """A budget in bytes (> 1) or as a fraction of the device's memory (0 < budget <= 1)."""
    if budget <= 0:
        raise ValueError(f"memory budget must be positive, got {budget}")
    if budget <= 1:
        if hardware is None or not hardware.device_bytes:
            raise ValueError(f"memory budget {budget} is a fraction of device memory, but the size of "
                             "this device's memory is unknown (CPU): give the budget in bytes")
        return int(budget * hardware.device_bytes)
    return int(budget)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-name decisions for one program, with the model's predictions for them."""

    decisions: tuple[tuple[str, str], ...]  # (name, keep|recompute|offload), profile order
    keep_all: bool  # no checkpoint at all: every residual of the plain backward pass is kept
    budget_bytes: int
    peak_bytes: int  # modelled, per device
    host_bytes: int  # offloaded, per device
    step_s: float  # predicted
    fingerprint: str
    shards: int
    label: str = "auto"
    profile: Profile | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def decision(self) -> dict[str, str]:
        return dict(self.decisions)

    def policy(self) -> Callable | None:
        """The `jax.checkpoint` policy that executes the plan (None: no checkpoint)."""
        if self.keep_all:
            return None
        d = self.decision
        keep = [n for n, v in d.items() if v == KEEP]
        off = [n for n, v in d.items() if v == OFFLOAD]
        if not off:
            return jax.checkpoint_policies.save_only_these_names(*keep)
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=keep, names_which_can_be_offloaded=off,
            offload_src="device", offload_dst="pinned_host")

    @property
    def remat(self) -> Remat:
        """What the step passes its loss through: `jax.value_and_grad(plan.remat(loss_fn))`."""
        return Remat(self.policy(), f"{self.label}:{self.fingerprint}")

    def table(self) -> str:
        """The plan as a text table, one block per layer kind."""
        prof = self.profile
        lines = [f"memory plan ({self.label}) for program {self.fingerprint}: "
                 f"{'keep everything (no checkpoint)' if self.keep_all else 'per-layer checkpoint'}"]
        if prof is not None:
            head = f"  {'residual':<16}{'per layer':<22}{'all layers':>12}  {'decision':<10}{'recompute':>11}{'swap':>11}"
            by_kind: dict[str, list] = {}
            for r in prof.residuals:
                by_kind.setdefault(r.kind, []).append(r)
            for kind, rs in by_kind.items():
                lines.append(f" {kind} ({rs[0].layers} layers)")
                lines.append(head)
                for r in rs:
                    dec = KEEP if self.keep_all else self.decision.get(r.name, KEEP)
                    shape = "x".join(map(str, r.shape)) + f" {r.dtype}"
                    lines.append(f"  {r.name:<16}{shape:<22}{_mib(r.stacked_bytes / self.shards):>12}  "
                                 f"{dec:<10}{r.recompute_s * 1e3:>9.2f}ms{_mib(r.swap_bytes / self.shards):>11}")
            if prof.unused_names:
                lines.append(f" tagged but never read by the backward pass: {', '.join(prof.unused_names)}")
        budget = "no budget" if self.budget_bytes >= NO_BUDGET else f"budget {_mib(self.budget_bytes)}"
        lines.append(f" modelled peak {_mib(self.peak_bytes)} per device ({budget}, {self.shards} "
                     f"shard{'s' if self.shards > 1 else ''}); offloaded {_mib(self.host_bytes)}; "
                     f"predicted step {self.step_s * 1e3:.1f} ms")
        return "\n".join(lines)

    def by_kind(self) -> dict[str, dict[str, str]]:
        """{layer kind: {residual name: decision}} (empty without the profile)."""
        out: dict[str, dict[str, str]] = {}
        for r in self.profile.residuals if self.profile is not None else ():
            out.setdefault(r.kind, {})[r.name] = KEEP if self.keep_all else self.decision.get(r.name, KEEP)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "fingerprint": self.fingerprint, "keep_all": self.keep_all,
                "decisions": self.decision,
                "budget_bytes": None if self.budget_bytes >= NO_BUDGET else self.budget_bytes,
                "peak_bytes": self.peak_bytes, "host_bytes": self.host_bytes,
                "predicted_step_s": self.step_s, "shards": self.shards}


@functools.lru_cache(maxsize=8)
def _all_plans(n: int) -> np.ndarray:
    """[3^n, n] int8: every assignment of the three decisions (index into DECISIONS)."""
    return np.array(list(itertools.product(range(3), repeat=n)), np.int8).reshape(-1, n)


def _score(prof: Profile, choice: np.ndarray, link: float, shards: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(peak per device, host bytes per device, predicted seconds) for plans [m, n] of DECISIONS
    indices."""
    keep, rec, off = ((choice == d).astype(np.float64) for d in range(3))
    peak = prof.peak_bytes_batch(keep, rec, off) / shards
    stacked = np.array([r.stacked_bytes for r in prof.residuals], np.float64)
    layer = np.array([r.layer_bytes for r in prof.residuals], np.float64)
    host = off @ stacked / shards
    n = len(prof.residuals)
    saved_mask = ((1.0 - rec) @ (2.0 ** np.arange(n))).astype(np.int64)
    rec_s = prof.layers * prof.scale * prof.recompute_table()[saved_mask]
    keep_saved_s = prof.keep_s_per_byte * prof.layers * (rec @ layer)
    moved = off @ layer / shards
    # without a host link (rate nan or 0) only the plans that offload get an unusable time
    with np.errstate(invalid="ignore", divide="ignore"):
        transfer = np.where(moved > 0, moved / link, 0.0)
    bwd_layer = prof.layer_backward_s + rec_s / prof.layers
    exposed = prof.layers * (np.maximum(0.0, transfer - prof.layer_forward_s) + np.maximum(0.0, transfer - bwd_layer))
    return peak, host, prof.step_s + rec_s - keep_saved_s + exposed


def _fit_peak(prof: Profile, others: Sequence[Profile], choice: np.ndarray, shards: int) -> np.ndarray:
    """The largest modelled peak per device of plans [m, n] over `prof` and `others`."""
    masks = [choice == d for d in range(3)]
    peak = prof.peak_bytes_batch(*masks) / shards
    for q in others:
        peak = np.maximum(peak, q.peak_bytes_batch(*masks) / shards)
    return peak


def _greedy(prof: Profile, budget: int, link: float, shards: int, allowed: list[int],
            others: Sequence[Profile] = ()) -> np.ndarray:
    """Start from keeping everything; while over budget (on `prof` or any of `others`), apply the
    single change (per name, to an allowed decision) with the least added time per byte saved."""
    n = len(prof.residuals)
    cur = np.zeros(n, np.int8)
    while True:
        t = _score(prof, cur[None], link, shards)[2]
        peak = _fit_peak(prof, others, cur[None], shards)
        if peak[0] <= budget:
            return cur
        cands = []
        for i in range(n):
            for d in allowed:
                if d != cur[i] and d != 0:
                    c = cur.copy()
                    c[i] = d
                    cands.append(c)
        if not cands:
            return cur
        cands = np.stack(cands)
        tt = _score(prof, cands, link, shards)[2]
        saved = peak[0] - _fit_peak(prof, others, cands, shards)
        merit = np.where(saved > 0, (tt - t[0]) / np.maximum(saved, 1), np.inf)
        best = int(np.argmin(merit))
        if not np.isfinite(merit[best]):
            return cur
        cur = cands[best]


def plan(profile: Profile, budget_bytes: int, hardware: Hardware | None = None, *, shards: int = 1,
         allow_offload: bool = True, host_budget_bytes: int | None = None,
         also_within: Sequence[Profile] = ()) -> MemoryPlan:
    """The fastest plan (by the profile's model) whose modelled peak per device fits the budget.

    hardware: rates for the host link (default: the profile's, measured when it was made).
    shards: the step runs fully sharded over this many devices (FSDP + data parallel): every
      buffer of the traced (global) program is split that many ways. A device-count change with the
      same global batch is the same program: re-plan with the new `shards`, no new profile.
    allow_offload: consider offloading to host memory (off: keep or recompute only).
    host_budget_bytes: host memory available for offloaded residuals, per device.
    also_within: profiles of other programs with the same residuals (the same step on fewer
      devices, say) on which the plan must fit the budget too: the plan then stays valid when the
      program changes to one of them. Time is still that of `profile`'s program.
    Raises `InfeasibleBudgetError` (naming the smallest feasible budget) when nothing fits.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    for q in also_within:
        if q.names != profile.names:
            raise ValueError(f"plan: also_within profiles must have the residuals {list(profile.names)}, "
                             f"got {list(q.names)}")
    budget_bytes = int(budget_bytes)
    link = (hardware or profile.hardware).link_bytes_per_s
    if not np.isfinite(link) or link <= 0:
        allow_offload = False
    allowed = [0, 1, 2] if allow_offload else [0, 1]
    n = len(profile.residuals)
    if n <= EXHAUSTIVE_MAX_NAMES:
        choice = _all_plans(n)
        if not allow_offload:
            choice = choice[(choice != 2).all(1)]
    else:
        choice = _greedy(profile, budget_bytes, link, shards, allowed, also_within)[None]
    peak, host, seconds = _score(profile, choice, link, shards)
    fit_peak = _fit_peak(profile, also_within, choice, shards) if also_within else peak
    ok = fit_peak <= budget_bytes
    if host_budget_bytes is not None:
        ok &= host <= host_budget_bytes
    best_keep_all = None
    if budget_bytes * shards >= profile.probe_peak_bytes:
        keep_all_peak = profile.keep_all_peak_bytes / shards
        if max([keep_all_peak] + [q.keep_all_peak_bytes / shards for q in also_within]) <= budget_bytes:
            best_keep_all = (int(keep_all_peak), profile.keep_all_step_s)
    if not ok.any() and best_keep_all is None:
        feasible_host = np.ones_like(ok) if host_budget_bytes is None else host <= host_budget_bytes
        smallest = fit_peak[feasible_host].min() if feasible_host.any() else fit_peak.min()
        raise InfeasibleBudgetError(budget_bytes, int(np.ceil(smallest)))
    label = "auto" if allow_offload else "auto (no offload)"
    if best_keep_all is not None and (not ok.any() or best_keep_all[1] <= seconds[ok].min()):
        return MemoryPlan(tuple((nm, KEEP) for nm in profile.names), True, budget_bytes,
                          best_keep_all[0], 0, best_keep_all[1], profile.fingerprint, shards, label, profile)
    idx = np.nonzero(ok)[0]
    order = np.lexsort((peak[idx], seconds[idx]))  # fastest, then smallest
    i = idx[order[0]]
    decisions = tuple((nm, DECISIONS[int(c)]) for nm, c in zip(profile.names, choice[i]))
    return MemoryPlan(decisions, False, budget_bytes, int(np.ceil(peak[i])), int(host[i]),
                      float(seconds[i]), profile.fingerprint, shards, label, profile)


def evaluate(profile: Profile, like: MemoryPlan) -> MemoryPlan:
    """`like`'s decisions scored on another program with the same residuals (`profile`: the same
    step on another device count, say): its modelled peak, host bytes and step time there. The
    budget is not checked: compare `peak_bytes` with `budget_bytes`."""
    if tuple(like.decision) != profile.names:
        raise ValueError(f"evaluate: the plan is for residuals {list(like.decision)}, the profile has "
                         f"{list(profile.names)}")
    shards = like.shards
    if like.keep_all:
        return dataclasses.replace(like, peak_bytes=int(np.ceil(profile.keep_all_peak_bytes / shards)),
                                   host_bytes=0, step_s=profile.keep_all_step_s,
                                   fingerprint=profile.fingerprint, profile=profile)
    choice = np.array([[DECISIONS.index(like.decision[n]) for n in profile.names]], np.int8)
    peak, host, seconds = _score(profile, choice, profile.hardware.link_bytes_per_s, shards)
    return dataclasses.replace(like, peak_bytes=int(np.ceil(peak[0])), host_bytes=int(host[0]),
                               step_s=float(seconds[0]), fingerprint=profile.fingerprint, profile=profile)


def fixed_plan(profile: Profile, decision: str, budget_bytes: int, *, shards: int = 1) -> MemoryPlan:
    """Every name gets the same decision (`keep`, `recompute` or `offload`), scored by the same
    model; raises `InfeasibleBudgetError` when it does not fit."""
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
    dec = {n: decision for n in profile.names}
    choice = np.full((1, len(profile.names)), DECISIONS.index(decision), np.int8)
    peak, host, seconds = _score(profile, choice, profile.hardware.link_bytes_per_s, shards)
    if peak[0] > budget_bytes:
        raise InfeasibleBudgetError(budget_bytes, int(np.ceil(peak[0])), f"`{decision}` for every residual")
    return MemoryPlan(tuple(dec.items()), False, int(budget_bytes), int(np.ceil(peak[0])), int(host[0]),
                      float(seconds[0]), profile.fingerprint, shards, decision, profile)
