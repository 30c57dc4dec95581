"""A simulated cluster (SimPy discrete events): a training job, failure traces, recovery policies.

SIMULATED. Nothing here runs on the devices it describes: step times, memory and recovery costs
come from the performance model (`jaxsys.train.recovery.model`) with the cluster's stated
parameters (`configs/cluster/*.yaml`) and per-layer time ratios measured on this machine.

Failure traces (`make_trace`): each device fails after an exponential time with the stated
per-device MTBF (Poisson), or, for a `bursty_fraction` of the failures, `burst_size` devices of one
node fail together; a failed device is back `repair_hours` later. Traces are generated once per
seed and replayed identically for every policy.

The job (`simulate`): trains for `run.hours`; between events it completes steps at the current
plan's step time (a step cut short by a failure is lost). A failure interrupts it; the policy
picks a strategy, the job pays its recovery cost (detection, state movement, compilation, restart,
work lost since the last checkpoint for a restart) and continues at the post-recovery step time.
A failure during a recovery interrupts the recovery, whose time is lost, and the next recovery
covers every failure so far. A repaired device rejoins at the next event: the job re-plans over the
devices it has (state movement plus a precompiled program), the same for every policy.

Policies: `reroute` (always reroute, ReCycle-like), `replan` (always re-plan, Oobleck-like),
`redundant` (always redundant computation, Bamboo-like), `checkpoint` (always restart from the last
checkpoint) and `ours` (the strategy with the least expected time to finish, Odyssey). A fixed
policy whose strategy cannot cover a failure (reroute when a stage lost all its replicas,
redundancy when the neighbour is gone too) falls back to re-planning; the fallbacks are counted.
`ours` weighs each option over the time the plan is expected to last, not over the whole rest of
the run: until the first down device is expected back (its failure time + `repair_hours`; a
returning device makes every policy re-plan) or the end of the run, whichever comes first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from jaxsys.train.recovery.model import (ClusterConfig, Costs, Degraded, Hardware, Layout, RecoveryParams, choose,
                                         options, search_layouts)

POLICIES: tuple[str, ...] = ("ours", "reroute", "replan", "redundant", "checkpoint")
HOUR = 3600.0


@dataclasses.dataclass(frozen=True)
class TraceEvent:
    time_s: float
    kind: str  # "fail" | "repair"
    devices: tuple[int, ...]


def make_trace(c: ClusterConfig, *, kind: str, seed: int) -> list[TraceEvent]:
    """A failure trace over the job's hours: `poisson` (independent devices) or `bursty` (a share of
    the failures hit `burst_size` devices of one node at once). Per-device MTBF as configured."""
    if kind not in ("poisson", "bursty"):
        raise ValueError(f"unknown trace kind {kind!r} (poisson, bursty)")
    rng = np.random.default_rng(seed)
    horizon = c.run.hours * HOUR
    mtbf = c.failures.mtbf_hours_per_device * HOUR
    n, node = c.devices, c.devices_per_node
    frac = c.failures.bursty_fraction if kind == "bursty" else 0.0
    k = min(c.failures.burst_size, node)
    single_rate = (1 - frac) * n / mtbf
    burst_rate = frac * n / mtbf / k
    events: list[TraceEvent] = []
    down_until = np.zeros(n)
    t = 0.0
    total = single_rate + burst_rate
    while True:
        t += rng.exponential(1.0 / total)
        if t >= horizon:
            break
        if rng.random() < burst_rate / total:
            nd = int(rng.integers(0, n // node))
            first = int(rng.integers(0, node - k + 1))
            devs = [nd * node + first + i for i in range(k)]
        else:
            devs = [int(rng.integers(0, n))]
        devs = tuple(d for d in devs if down_until[d] <= t)
        if not devs:
            continue
        events.append(TraceEvent(t, "fail", devs))
        back = t + c.failures.repair_hours * HOUR
        down_until[list(devs)] = back
        if back < horizon:
            events.append(TraceEvent(back, "repair", devs))
    return sorted(events, key=lambda e: (e.time_s, e.kind != "repair"))


@dataclasses.dataclass
class RecoveryLog:
    time_s: float
    strategy: str
    fallback: bool
    recovery_s: float
    lost_s: float
    step_before_s: float
    step_after_s: float
    layout: str
    step_best_s: float  # the best layout of the live devices: what a free, instant re-plan would reach


@dataclasses.dataclass
class SimResult:
    policy: str
    trace: str
    steps: float
    hours: float
    failure_free_step_s: float
    recoveries: list[RecoveryLog]
    fallbacks: int

    @property
    def throughput(self) -> float:
        """Steps per hour over the whole run."""
        return self.steps / self.hours

    def post_recovery_ratio(self) -> float:
        """Mean over recoveries of failure-free step time / post-recovery step time (1.0 = as fast
        as without failures)."""
        if not self.recoveries:
            return 1.0
        return float(np.mean([self.failure_free_step_s / r.step_after_s for r in self.recoveries]))

    def post_recovery_ceiling(self) -> float:
        """The same mean for the best layout of the devices still alive at each recovery: no
        strategy can beat it, because the lost devices' work has to go somewhere."""
        if not self.recoveries:
            return 1.0
        return float(np.mean([self.failure_free_step_s / r.step_best_s for r in self.recoveries]))

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "trace": self.trace, "steps": self.steps, "hours": self.hours,
                "throughput_steps_per_hour": self.throughput, "failure_free_step_s": self.failure_free_step_s,
                "post_recovery_ratio": self.post_recovery_ratio(),
                "post_recovery_ceiling": self.post_recovery_ceiling(), "fallbacks": self.fallbacks,
                "recoveries": len(self.recoveries),
                "strategies": {s: sum(1 for r in self.recoveries if r.strategy == s) for s in
                               ("reroute", "redundant", "replan", "checkpoint")}}


class _Job:
    """The job's plan state between events."""

    def __init__(self, c: ClusterConfig, costs: Costs, hw: Hardware):
        self.c, self.costs, self.hw = c, costs, hw
        self.rp = RecoveryParams.of(c)
        self.live = list(range(c.devices))
        self._best_of: dict[int, tuple[Layout, Any]] = {}  # the best layout per live-device count
        self.layout, est = self._best(len(self.live))
        self.failure_free_step_s = est.step_s
        self.step_s = est.step_s
        self.degraded: Degraded | None = None
        self.failed_cells: set[tuple[int, int]] = set()
        self.members = list(self.live)  # devices the layout uses, in cell order

    def _best(self, n: int) -> tuple[Layout, Any]:
        if n not in self._best_of:
            found = search_layouts(n, self.costs, self.hw, self.c.model.num_layers, self.c.model.num_micro,
                                   fixed_tp=self.c.layout.tp)
            if found is None:
                raise RuntimeError(f"no layout of {n} devices fits (the job cannot run)")
            self._best_of[n] = found
        return self._best_of[n]

    def cells_of(self, devs: Sequence[int]) -> set[tuple[int, int]]:
        lay = self.layout
        out = set()
        for d in devs:
            if d in self.members:
                i = self.members.index(d)
                if i < lay.devices:
                    out.add((i // (lay.pp * lay.tp), (i // lay.tp) % lay.pp))
        return out

    def adopt(self, strategy: str, opt) -> None:
        if strategy in ("reroute", "redundant"):
            self.degraded = opt.degraded
        else:
            self.layout, self.degraded, self.failed_cells = opt.layout, None, set()
            self.members = list(self.live)
        self.step_s = opt.step_s

    def rejoin(self) -> float:
        """Re-plan over every live device; returns the cost."""
        self.layout, est = self._best(len(self.live))
        self.degraded, self.failed_cells, self.members = None, set(), list(self.live)
        self.step_s = est.step_s
        total = self.c.model.num_layers * self.costs.layer_params + self.costs.edge_params
        move = self.hw.transfer(total * self.costs.state_bytes_per_param / len(self.live), same_node=False)
        return move + self.rp.retarget_s


def simulate(c: ClusterConfig, costs: Costs, trace: Sequence[TraceEvent], policy: str, *,
             trace_name: str = "") -> SimResult:
    """Run the job under `policy` on `trace` (see the module docstring)."""
    import simpy

    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    hw = Hardware.of(c)
    job = _Job(c, costs, hw)
    env = simpy.Environment()
    horizon = c.run.hours * HOUR
    ckpt_every_steps = max(1, int(c.recovery.checkpoint_every_s / job.failure_free_step_s))
    state = {"steps": 0.0, "ckpt_steps": 0.0, "pending": [], "fallbacks": 0, "down": {}}
    logs: list[RecoveryLog] = []

    def pick(new_cells: set[tuple[int, int]]):
        cells = sorted(job.failed_cells | new_cells)
        back_s = min(state["down"].values(), default=math.inf) + c.failures.repair_hours * HOUR
        lasts_s = max(0.0, min(horizon, back_s) - env.now)
        remaining = max(0.0, lasts_s / job.failure_free_step_s)
        since = (state["steps"] - state["ckpt_steps"]) * job.step_s
        opts = options(job.layout, cells, len(job.live), costs, hw, job.rp, num_layers=c.model.num_layers,
                       num_micro=c.model.num_micro, since_checkpoint_s=since)
        by = {o.strategy: o for o in opts}
        if policy == "ours":
            return choose(opts, remaining), False, cells
        o = by[policy]
        if o.feasible:
            return o, False, cells
        return by["replan"], True, cells

    def training():
        while env.now < horizon:
            seg_start = env.now
            try:
                yield env.timeout(horizon - env.now)
                state["steps"] += (env.now - seg_start) / job.step_s
            except simpy.Interrupt:
                state["steps"] += math.floor((env.now - seg_start) / job.step_s)
                state["ckpt_steps"] = math.floor(state["steps"] / ckpt_every_steps) * ckpt_every_steps
                yield from handle()

    def handle():
        """Process pending events; a failure during recovery restarts the recovery."""
        while state["pending"]:
            ev = state["pending"].pop(0)
            if ev.kind == "repair":
                for d in ev.devices:
                    state["down"].pop(d, None)
                    if d not in job.live:
                        job.live.append(d)
                job.live.sort()
                cost = job.rejoin()
                yield from pause(cost)
                continue
            hit = job.cells_of(ev.devices)
            state["down"].update({d: ev.time_s for d in ev.devices})
            for d in ev.devices:
                if d in job.live:
                    job.live.remove(d)
            if not hit:
                continue  # an idle spare failed
            before = job.step_s
            opt, fallback, cells = pick(hit)
            state["fallbacks"] += int(fallback)
            if not opt.feasible:
                raise RuntimeError(f"no strategy can continue after losing {ev.devices}: {opt.why}")
            job.failed_cells = set(cells)
            job.adopt(opt.strategy, opt)
            if opt.strategy == "checkpoint":
                state["steps"] = state["ckpt_steps"]
            logs.append(RecoveryLog(env.now, opt.strategy, fallback, opt.recovery_s, opt.lost_s, before, job.step_s,
                                    str(job.layout), job._best(len(job.live))[1].step_s))
            yield from pause(opt.recovery_s)

    def pause(seconds: float):
        try:
            yield env.timeout(max(0.0, min(env.now + seconds, horizon) - env.now))
        except simpy.Interrupt:
            pass  # an event during recovery: its time is lost; the next plan covers every failure

    proc = env.process(training())

    def injector():
        for ev in trace:
            if ev.time_s >= horizon:
                break
            yield env.timeout(ev.time_s - env.now)
            state["pending"].append(ev)
            if proc.is_alive:
                proc.interrupt()

    env.process(injector())
    env.run(until=horizon + 1.0)  # events at exactly `until` would not run
    return SimResult(policy, trace_name, state["steps"], c.run.hours, job.failure_free_step_s, logs,
                     state["fallbacks"])
