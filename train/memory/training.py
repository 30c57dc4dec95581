"""The `memory:` section of a training config, applied to the trainers' step programs.

    memory:
      policy: auto     # keep (default) | remat | offload | auto
      budget: 50%      # per device: bytes (4e9, 512MiB, 4GB) or a fraction of its memory (0.5, 50%)

`StepMemory` serves the GSPMD step: the program gives it its step in the planner's form,
`step(remat, *args)` over the global arrays (`*args` may be `jax.ShapeDtypeStruct`s: nothing runs),
and specialises its jitted step with the `Remat` that `remat_for(*args)` returns. The profile is of
the global program; a plan's modelled peak per device is that program's divided by `shards`, the
number of ways the step splits its buffers (see `jaxsys.train.memory.plan`). `ElasticMemory` serves
the elastic step, one plan per device count: its program is per device already (a `shard_map`), and
a device loss or join changes it (see the class).

Plans are made when the program is built, before anything compiles: a budget that no plan meets
raises `InfeasibleBudgetError`, naming the smallest feasible budget, while the trainer sets up (not
from inside jit). Time is modelled from the layer body, compiled and timed on one device
(`Profiler(measure_steps=False)`: the whole step is not run and the trainer's state is not touched).
On CPU, XLA does not lower host offloading, so `auto` plans keep / recompute only there and
`offload` is an error.

Re-planning: plans are keyed by program (the step's argument shapes); a new program (another
sequence-length bucket, another device count) is profiled incrementally: its layer body, if seen
before, is not measured again. `StepMemory.set_shards(n)` re-plans every program for a new split
from the profiles already made. Each new plan is reported once (`report`): its table goes to the
log and its JSON into the metrics file, with the step that first runs it.

`policy: keep` without a budget is the step as written: no profile, no plan, `KEEP_ALL`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, Sequence

import jax

from jaxsys.train.config import MemoryConfig, TrainConfigError
from jaxsys.train.memory.online import MemoryPlanner
from jaxsys.train.memory.planner import NO_BUDGET, InfeasibleBudgetError, MemoryPlan, evaluate
from jaxsys.train.memory.profiler import Profiler
from jaxsys.train.memory.remat import KEEP_ALL, Remat


def device_memory_bytes(device: jax.Device) -> int | None:
    """The memory the device reports it can allocate (None where it reports none, e.g. CPU)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without memory statistics raise instead of returning None
        return None
    limit = stats.get("bytes_limit")
    return int(limit) if limit else None


def budget_bytes(cfg: MemoryConfig, device: jax.Device) -> int | None:
    """`cfg.budget` in bytes per device (a fraction is of `device`'s memory); None: no budget. The
    `auto` policy without a budget plans within the device's whole memory."""
    budget = cfg.budget
    if budget is None and cfg.policy == "auto":
        budget = 1.0
        why = "memory.policy=auto plans within memory.budget (default: the device's memory)"
    else:
        why = f"memory.budget={budget!r} is a fraction of the device's memory"
    if budget is None:
        return None
    if isinstance(budget, float) and budget <= 1:
        total = device_memory_bytes(device)
        if total is None:
            raise TrainConfigError(f"{why}, but this {device.platform} device does not report its memory "
                                   "size: give the budget in bytes, e.g. memory.budget=512MiB")
        return int(budget * total)
    return int(budget)


def plan_event(plan: MemoryPlan, planner_events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The metrics-file record of a new plan: the plan (decisions per name and per layer kind,
    modelled peak, budget) and, when it was just made, what profiling and planning cost."""
    cost = planner_events[-1] if planner_events else {}
    return {"event": "memory_plan", **plan.to_json(), "by_kind": plan.by_kind(),
            **{k: cost[k] for k in ("reused", "profile_s", "plan_s") if k in cost}}


class StepMemory:
    """The memory plans of one step program (see the module docstring).

    step_fn: `step_fn(remat, *args)`, the step over global arrays; it differentiates
      `remat(loss_fn)` (None: each `planner.plan_for` call names its step).
    device: the device whose memory a fractional budget refers to.
    shards: how many ways the step splits its buffers (per-device peak = global / shards).
    donate_argnums: which of `args` the step donates (their buffers die at their last use).
    """

    def __init__(self, cfg: MemoryConfig, step_fn: Callable | None, *, device: jax.Device, shards: int = 1,
                 donate_argnums: Sequence[int] = (), profiler: Profiler | None = None):
        self.cfg = cfg
        self.planner: MemoryPlanner | None = None
        self.budget_bytes: int | None = None
        host_offload = device.platform != "cpu"
        if cfg.policy == "offload" and not host_offload:
            raise TrainConfigError(
                "memory.policy=offload: XLA's CPU backend does not lower host offloading (the residuals "
                "would stay where they are: on CPU, device memory is host memory); use remat or auto")
        if cfg.policy != "keep" or cfg.budget is not None:
            self.budget_bytes = budget_bytes(cfg, device)
            self.planner = MemoryPlanner(
                step_fn, NO_BUDGET if self.budget_bytes is None else self.budget_bytes, policy=cfg.policy,
                shards=shards, donate_argnums=donate_argnums, allow_offload=host_offload,
                profiler=profiler or Profiler(measure_steps=False))
        self.plan: MemoryPlan | None = None
        """The plan of the program last asked for (None without planning)."""
        self._remats: dict[tuple, Remat] = {}
        self._reported: set[tuple] = set()
        self._pending: list[tuple[MemoryPlan, dict[str, Any]]] = []

    @property
    def enabled(self) -> bool:
        return self.planner is not None

    def remat_for(self, *args) -> Remat:
        """The `Remat` that executes the plan of the program `step_fn(remat, *args)` (planned on the
        first call for that program; `KEEP_ALL` without planning). Raises `InfeasibleBudgetError`."""
        if self.planner is None:
            return KEEP_ALL
        n_events = len(self.planner.events)
        plan = self.planner.plan_for(*args)
        self.plan = plan
        key = (plan.fingerprint, plan.decisions, plan.keep_all, plan.shards)
        if key not in self._reported:
            self._reported.add(key)
            self._pending.append((plan, plan_event(plan, self.planner.events[n_events:])))
        remat_key = (plan.decisions, plan.keep_all)  # one Remat object per policy: jit caches by it
        if remat_key not in self._remats:
            self._remats[remat_key] = KEEP_ALL if plan.keep_all else plan.remat
        return self._remats[remat_key]

    def set_shards(self, shards: int) -> None:
        """A device-count change: the next `remat_for` of each program re-plans (no new profile)."""
        if self.planner is not None:
            self.planner.set_shards(shards)

    def report(self, log: Callable[[str], None] | None) -> list[dict[str, Any]]:
        """The plans not reported yet: their tables to `log`, their JSON events returned (for the
        metrics file)."""
        pending, self._pending = self._pending, []
        for plan, _ in pending:
            if log is not None:
                log(plan.table())
        return [event for _, event in pending]


@dataclasses.dataclass(frozen=True)
class _CanonicalStep:
    """The elastic step of `spec` in the planner's form: `(remat, flat, inputs)`. Equal specs and
    device counts are the same program (the planner keys its plans by this object)."""

    spec: Any  # jaxsys.train.elastic.canonical.StepSpec, without a remat
    devices: tuple

    def __call__(self, remat, flat_3xNS, inputs):
        from jaxsys.train.elastic import canonical

        spec = dataclasses.replace(self.spec, remat=remat)
        return canonical.make_step(spec, canonical.layout_mesh(self.devices))(flat_3xNS, inputs)


class ElasticMemory:
    """The memory plans of the elastic step, one per device set size, chosen so that a device loss
    or join does not change the math.

    The elastic step (`jaxsys.train.elastic.canonical`) runs each micro-batch's forward and backward
    pass on one device inside a `shard_map`, so the profile is of the per-device program as it is
    (shards=1): the micro-batch's activations, plus what the device holds around them (its state
    shard, the gathered parameters, the gradients of its slots). A device loss or join changes that
    program (shard size, slots per device), and with it the memory left for activations.

    The canonical step gives the same bits on any device count because every micro-batch runs the
    same compiled loss and gradient whichever device runs it. A remat plan is part of that program:
    under another plan XLA fuses the recomputed forward into the backward pass differently from
    the forward itself (other fusions, other floating-point contractions), and the gradients differ
    in their last bits. So a count does not simply get the fastest plan for itself:

    * the first count planned (the run's start) gets the fastest plan that fits the budget on it
      and on one device fewer (when some plan does; else on it alone);
    * every other count keeps the plan of its neighbour towards the start (one device more below
      the start, one fewer above it) while that plan fits it: a loss the plan absorbs, or any join,
      runs the same micro-batch program, hence the same bits;
    * a count the neighbour's plan does not fit gets a new plan (again with a device of headroom
      where one fits). The budget wins over the bits there, and the log says so.

    Each count's program is profiled once, from the layer body measured first (reused: `body`).
    Thread-safe: the elastic runtime compiles the likely next device sets in the background.
    """

    def __init__(self, cfg: MemoryConfig, *, device: jax.Device):
        self.memory = StepMemory(cfg, None, device=device)
        self._planning = threading.Lock()  # one plan at a time: the profiler is not thread-safe
        self._lock = threading.Lock()  # the bookkeeping (never held while planning)
        self._specs: dict[Any, Any] = {}
        self._start: int | None = None
        self._profiles: dict[int, tuple[Any, dict[str, Any]]] = {}  # count -> profile, its cost
        self._plans: dict[int, tuple[MemoryPlan, int | None]] = {}  # count -> plan, count it came from
        self._remats: dict[tuple, Remat] = {}
        self._events: dict[int, tuple[MemoryPlan, dict[str, Any]]] = {}
        self._reported: set[int] = set()

    @property
    def enabled(self) -> bool:
        return self.memory.enabled

    def with_remat(self, spec, devices: Sequence[jax.Device]):
        """`spec` with the `Remat` of its plan (`spec` itself without planning). devices: the run's
        devices, at least `spec.num_devices` (the program does not depend on which)."""
        if not self.enabled:
            return spec
        found = self._specs.get(spec)  # the step loop asks every step: no lock on a hit
        if found is not None:
            return found
        with self._planning:
            found = self._specs.get(spec)
            if found is not None:
                return found
            n = spec.num_devices
            if self._start is None:
                self._start = n
            plan, source = self._plan_of(n, spec, devices)
            key = (plan.decisions, plan.keep_all)  # one Remat per policy: equal plans, equal programs
            if key not in self._remats:
                self._remats[key] = KEEP_ALL if plan.keep_all else plan.remat
            out = dataclasses.replace(spec, remat=self._remats[key])
            cost = self._profiles[n][1]
            event = {**plan_event(plan, [cost]), "devices": n, "plan_of_devices": source}
            with self._lock:
                self._events[n] = (plan, event)
                self._specs[spec] = out
            return out

    def _profile(self, n: int, spec, devices: Sequence[jax.Device]):
        """The profile of the step on `n` devices (made once; `spec` is that step on any count)."""
        if n not in self._profiles:
            from jaxsys.train.elastic import canonical
            from jaxsys.train.elastic.layout import MicroBatchPlan

            if spec.num_devices != n:  # a neighbour of the count asked for: the balanced split
                spec = dataclasses.replace(spec, num_devices=n, slots=MicroBatchPlan.balanced(spec.num_micro, n).slots)
            devs = tuple(devices[:n])
            profiler = self.memory.planner.profiler
            t0 = time.perf_counter()
            prof = profiler.profile(_CanonicalStep(dataclasses.replace(spec, remat=None), devs),
                                    *canonical.abstract_step_args(spec, canonical.layout_mesh(devs)))
            self._profiles[n] = (prof, {"reused": prof.cost.reused, "profile_s": time.perf_counter() - t0})
        return self._profiles[n][0]

    def _plan_of(self, n: int, spec, devices: Sequence[jax.Device]) -> tuple[MemoryPlan, int | None]:
        """(the plan for `n` devices, the count whose plan it keeps or None: chosen for `n`)."""
        if n in self._plans:
            return self._plans[n]
        planner = self.memory.planner
        prof = self._profile(n, spec, devices)
        t0 = time.perf_counter()
        found = None
        toward = n + 1 if n < self._start else n - 1 if n > self._start else None
        if toward is not None:
            near, _ = self._plan_of(toward, spec, devices)
            same = evaluate(prof, near)
            if same.peak_bytes <= planner.budget_bytes:
                found = (same, toward if self._plans[toward][1] is None else self._plans[toward][1])
        if found is None:
            chosen = None
            if planner.policy == "auto" and n > 1:
                try:
                    chosen = planner.choose(prof, also_within=(self._profile(n - 1, spec, devices),))
                except InfeasibleBudgetError:
                    pass  # no plan fits one device fewer: plan this count alone
            found = (chosen or planner.choose(prof), None)
        self._profiles[n][1].setdefault("plan_s", time.perf_counter() - t0)
        self._plans[n] = found
        return found

    def plan(self, num_devices: int) -> MemoryPlan | None:
        """The plan of the step on `num_devices` devices (None: not planned)."""
        with self._lock:
            found = self._events.get(num_devices)
        return None if found is None else found[0]

    def report(self, num_devices: int, log: Callable[[str], None] | None) -> list[dict[str, Any]]:
        """The plan of the step on `num_devices` devices, the first time it runs: its table to `log`,
        its JSON event returned (for the metrics file)."""
        with self._lock:
            if num_devices in self._reported or num_devices not in self._events:
                return []
            self._reported.add(num_devices)
            plan, event = self._events[num_devices]
        if log is not None:
            source = event["plan_of_devices"]
            if source is not None:
                why = f"the plan of {source} devices, which fits: the same micro-batch program, the same bits"
            elif num_devices != self._start:
                why = ("a new plan: the previous one does not fit this device count; the micro-batch "
                       "program changes, and with it the gradients' last bits")
            else:
                why = "the run's first plan"
            log(f"memory plan for {num_devices} devices ({why}):\n{plan.table()}")
        return [event]
