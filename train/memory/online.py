"""Online planning: the plan for whatever program the next step is, re-planned when it changes.

    planner = MemoryPlanner(step, budget_bytes=2**30)
    for batch in batches:                     # shapes may change (sequence-length buckets)
        state, metrics = planner.jitted(state, batch)(state, batch)

`plan_for(*args)` looks the call up by its signature (the step and the argument shapes): a program
seen before costs a dictionary lookup. A new one is profiled incrementally (see
`jaxsys.train.memory.profiler`: a known layer body or layer structure is not measured again) and
planned; each change is recorded in `events` with what it cost. `jitted(*args)` returns the step
compiled for that plan (cached per plan).

`policy` picks the mode: `auto` (the planner), `keep` (no checkpoint), `remat` (recompute every
named residual: per-layer full rematerialisation) or `offload` (offload every named residual).
Every mode checks the budget and raises `InfeasibleBudgetError` when its modelled peak exceeds it.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Sequence

import jax

from jaxsys.train.memory.costs import Hardware
from jaxsys.train.memory.planner import InfeasibleBudgetError, MemoryPlan, fixed_plan, plan
from jaxsys.train.memory.profiler import KEEP, OFFLOAD, RECOMPUTE, Profile, Profiler, call_signature

POLICIES = ("auto", "keep", "remat", "offload")


class MemoryPlanner:
    """Plans (and compiles) a step for each program it is called with.

    step_fn: `step_fn(remat, *args)`; it differentiates `remat(loss_fn)` (None: every `plan_for`
      names its step).
    budget_bytes: device memory per device the step may use (the modelled peak must fit).
    shards: the step runs fully sharded over this many devices (see `plan`); `set_shards` after a
      device-count change re-plans every program without profiling it again.
    """

    def __init__(self, step_fn: Callable | None, budget_bytes: int, *, policy: str = "auto",
                 hardware: Hardware | None = None, shards: int = 1, donate_argnums: Sequence[int] = (),
                 allow_offload: bool = True, profiler: Profiler | None = None):
        if policy not in POLICIES:
            raise ValueError(f"memory policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.step_fn = step_fn
        self.budget_bytes = int(budget_bytes)
        self.policy = policy
        self.shards = shards
        self.donate_argnums = tuple(donate_argnums)
        self.allow_offload = allow_offload
        self.profiler = profiler or Profiler(hardware)
        self.events: list[dict[str, Any]] = []
        self._plans: dict[tuple, MemoryPlan] = {}
        self._jitted: dict[tuple, Callable] = {}

    def set_shards(self, shards: int) -> None:
        """A new device count (same global batch): plans are redone on the next call of each
        program, from the profiles already made."""
        if shards != self.shards:
            self.shards = shards
            self._plans.clear()  # compiled steps stay: a plan that does not change is not recompiled

    def plan_for(self, *args, step_fn: Callable | None = None) -> MemoryPlan:
        """The plan of the program `step_fn(remat, *args)` (default: the planner's step). A step
        given here is one of a family the planner serves (the same step for several device
        counts, say); equal step objects are the same program."""
        step_fn = self.step_fn if step_fn is None else step_fn
        sig = call_signature(step_fn, args, self.donate_argnums)
        found = self._plans.get(sig)
        if found is not None:
            return found
        t0 = time.perf_counter()
        prof = self.profiler.profile(step_fn, *args, donate_argnums=self.donate_argnums)
        t1 = time.perf_counter()
        chosen = self.choose(prof)
        t2 = time.perf_counter()
        self._plans[sig] = chosen
        self.events.append({"fingerprint": prof.fingerprint, "reused": prof.cost.reused,
                            "profile_s": t1 - t0, "plan_s": t2 - t1,
                            "trace_s": prof.cost.trace_s, "analyse_s": prof.cost.analyse_s,
                            "measure_s": prof.cost.measure_s, "shards": self.shards,
                            **{k: v for k, v in chosen.to_json().items() if k != "decisions"}})
        return chosen

    def choose(self, prof: Profile, also_within: Sequence[Profile] = ()) -> MemoryPlan:
        """The plan of this planner's policy for a profiled program; `auto` plans that must fit
        `also_within` as well (see `plan`). Raises `InfeasibleBudgetError`."""
        if self.policy == "auto":
            return plan(prof, self.budget_bytes, shards=self.shards, allow_offload=self.allow_offload,
                        also_within=also_within)
        if self.policy == "keep":
            peak = prof.keep_all_peak_bytes // self.shards
            if peak > self.budget_bytes:
                raise InfeasibleBudgetError(self.budget_bytes, peak, "memory.policy=keep (no checkpoint)")
            return MemoryPlan(tuple((n, KEEP) for n in prof.names), True, self.budget_bytes, peak, 0,
                              prof.keep_all_step_s, prof.fingerprint, self.shards, "keep", prof)
        decision = RECOMPUTE if self.policy == "remat" else OFFLOAD
        return fixed_plan(prof, decision, self.budget_bytes, shards=self.shards)

    def jitted(self, *args) -> Callable:
        """The step compiled (lazily, by jit) for the plan of this call's program."""
        chosen = self.plan_for(*args)
        key = (chosen.fingerprint, chosen.decisions, chosen.keep_all)
        fn = self._jitted.get(key)
        if fn is None:
            fn = jax.jit(functools.partial(self.step_fn, chosen.remat), donate_argnums=self.donate_argnums)
            self._jitted[key] = fn
        return fn
