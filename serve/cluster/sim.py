"""A discrete-event simulator (SimPy) of decode instances behind a router, with live KV migration.

Why a simulator: the rescheduling policies matter at tens to hundreds of instances, far beyond the
machines we have. The simulator replays our own generations (`workload.Workload`) on instances
whose costs come from `hardware.HardwareParams` (a step-time model fitted to our engine, or a
stated H100-like roofline), so every figure it produces is labelled simulated.

The model, per instance (one SimPy process):

- A decode step runs every running request one token; it takes `step_time(B, K)` for B running
  requests holding K KV tokens, plus `prefill_time` of any request that needs its prompt (and
  tokens so far) computed in that step.
- Admission is first come, first served, while a batch slot is free and the KV cache has room
  for the request's context plus one token (page-rounded).
- Before each step every running request must fit one more token; if the cache would overflow,
  the most recently admitted request is preempted (its KV freed; it returns to the front of the
  queue and is recomputed when readmitted, vLLM's recompute preemption).
- Prefill placement: "disaggregated" (DistServe/Splitwise): prompts are prefilled on a separate,
  sufficiently provisioned prefill pool, the first token is emitted there, and the request joins a
  decode instance chosen at that moment; "colocated": the request is dispatched on arrival and
  its prefill runs inside a decode step of its instance.
- Migration (Llumnix-style live migration): the destination reserves a batch slot and KV pages,
  the request's KV streams over the link (`migration_time`) while it keeps decoding on the
  source, then it moves (the final stop-and-copy is the fixed migration latency). A request that
  finishes or is preempted meanwhile cancels its migration.

The router's policy (`policies`) picks the instance of each new request and, every
`rebalance_interval_s`, may order migrations. Instance loads the policies read (KV tokens,
batch, queue, predicted KV profile over the next steps) live in cluster-wide arrays updated by
each step, so a
decision over 256 instances is a few vectorised operations.

Per request the result has TTFT (arrival to first token) and TPOT (time between the first and
last token over the tokens in between); the summary has their p50/p99 and SLO attainment (the
benchmark derives goodput, the highest rate with 90% attainment, from a sweep over rates).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

import numpy as np

from jaxsys.serve.cluster.hardware import HardwareParams
from jaxsys.serve.cluster.workload import PredictionTable, Trace, Workload

__all__ = ["Cluster", "SimConfig", "SimResult", "goodput_rate", "simulate"]

PREFILL_MODES = ("disaggregated", "colocated")


@dataclasses.dataclass(frozen=True)
class SimConfig:
    num_instances: int
    prefill: str = "disaggregated"
    rebalance_interval_s: float | None = None  # None: 20 decode steps of an idle instance
    horizon_steps: int = 128  # how far ahead the predicted load looks (steps)
    max_time_s: float | None = None  # stop the simulation here (None: when every request is done)

    def __post_init__(self):
        if self.num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {self.num_instances}")
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {PREFILL_MODES}, got {self.prefill!r}")


class Instance:
    """One decode instance: fixed batch slots (numpy arrays) and a FCFS queue."""

    def __init__(self, cluster: "Cluster", index: int):
        hw = cluster.hw
        self.cluster, self.index, self.hw = cluster, index, hw
        S = hw.max_batch
        self.rid = np.full(S, -1, np.int64)
        self.ctx = np.zeros(S, np.int64)  # prompt tokens + tokens generated (resident KV tokens)
        self.active = np.zeros(S, bool)  # decoding here
        self.reserved = np.zeros(S, bool)  # held for an incoming migration
        self.needs_prefill = np.zeros(S, bool)
        self.admitted_at = np.zeros(S, np.int64)  # admission order, for LIFO preemption
        self.reserved_pages = 0
        self.queue: deque[int] = deque()
        self.queued_tokens = 0  # context tokens of the queued requests (constant while queued)
        self.queued_profile = np.zeros(len(cluster.horizon_points))  # their predicted KV profile
        self.wake = cluster.env.event()
        self.migrating_out = False
        self.migrating_in = False
        self._order = 0

    # ---------------------------------------------------------------- bookkeeping
    def used_pages(self) -> int:
        return int(self.hw.pages(self.ctx[self.active]).sum()) + self.reserved_pages

    def free_slot(self) -> int:
        free = np.nonzero(~self.active & ~self.reserved)[0]
        return int(free[0]) if len(free) else -1

    def notify(self) -> None:
        if not self.wake.triggered:
            self.wake.succeed()

    def enqueue(self, rid: int, *, front: bool = False) -> None:
        (self.queue.appendleft if front else self.queue.append)(rid)
        self._count_queued(rid, +1)
        self.cluster.instance_of[rid] = self.index
        self.notify()

    def _count_queued(self, rid: int, sign: int) -> None:
        c = self.cluster
        self.queued_tokens += sign * int(c.prompt_len[rid] + c.generated[rid])
        if c.track_future:
            ctx = np.array([c.prompt_len[rid] + c.generated[rid]])
            self.queued_profile += sign * c.kv_profile(np.array([rid]), ctx)[0]

    def place(self, slot: int, rid: int, *, prefill: bool) -> None:
        c = self.cluster
        self.rid[slot] = rid
        self.ctx[slot] = c.prompt_len[rid] + c.generated[rid]
        self.active[slot] = True
        self.reserved[slot] = False
        self.needs_prefill[slot] = prefill
        self._order += 1
        self.admitted_at[slot] = self._order
        c.instance_of[rid] = self.index

    def _admit(self) -> None:
        c, hw = self.cluster, self.hw
        while self.queue:
            rid = self.queue[0]
            slot = self.free_slot()
            need = int(hw.pages(c.prompt_len[rid] + c.generated[rid] + 1))
            if slot < 0 or self.used_pages() + need > hw.kv_capacity_tokens // hw.page_size:
                return
            self.queue.popleft()
            self._count_queued(rid, -1)
            # a fresh disaggregated request arrives with its KV; everything else computes it here
            self.place(slot, rid, prefill=not (c.cfg.prefill == "disaggregated" and c.generated[rid] == 1
                                               and not c.recompute[rid]))
            c.recompute[rid] = False

    def _preempt_overflow(self) -> None:
        c, hw = self.cluster, self.hw
        cap = hw.kv_capacity_tokens // hw.page_size
        while self.active.any() and int(hw.pages(self.ctx[self.active] + 1).sum()) + self.reserved_pages > cap:
            slots = np.nonzero(self.active)[0]
            victim = int(slots[np.argmax(self.admitted_at[slots])])
            rid = int(self.rid[victim])
            self.active[victim] = False
            self.rid[victim] = -1
            c.preemptions[rid] += 1
            c.recompute[rid] = True
            self.queue.appendleft(rid)
            self._count_queued(rid, +1)

    def publish(self) -> None:
        """Refresh this instance's entries of the cluster-wide load arrays."""
        c = self.cluster
        act = self.active
        c.batch[self.index] = int(act.sum())
        c.kv_tokens[self.index] = int(self.ctx[act].sum())
        c.used_pages[self.index] = self.used_pages()
        c.queued_tokens[self.index] = self.queued_tokens
        c.queue_len[self.index] = len(self.queue)
        if c.track_future:
            c.future_profile[self.index] = c.kv_profile(self.rid[act], self.ctx[act]).sum(0) + self.queued_profile

    # ---------------------------------------------------------------- the decode loop
    def run(self):
        c, hw, env = self.cluster, self.hw, self.cluster.env
        while True:
            self._admit()
            self._preempt_overflow()
            self.publish()
            if not self.active.any():
                self.wake = env.event()
                if self.queue:  # blocked on a reservation: retry after a step's time
                    yield env.timeout(hw.step_a + hw.step_b)
                else:
                    yield self.wake
                continue
            dec = self.active & ~self.needs_prefill
            pre = self.active & self.needs_prefill
            dt = 0.0
            if dec.any():
                dt += float(hw.step_time(int(dec.sum()), int(self.ctx[dec].sum())))
            if pre.any():
                dt += float(hw.prefill_time(int(self.ctx[pre].sum())))
            slots0 = np.nonzero(self.active)[0]
            rids0 = self.rid[slots0].copy()
            yield env.timeout(dt)
            now = env.now
            # a request that migrated away during the step loses its token; one that arrived waits
            slots = slots0[self.active[slots0] & (self.rid[slots0] == rids0)]
            rids = self.rid[slots]
            c.generated[rids] += 1
            self.ctx[slots] += 1
            self.needs_prefill[slots] = False
            first = rids[np.isnan(c.first_token[rids])]
            c.first_token[first] = now
            done = slots[c.generated[rids] >= c.target[rids]]
            for s in done:
                rid = int(self.rid[s])
                c.finish[rid] = now
                self.active[s] = False
                self.rid[s] = -1
                c.remaining_requests -= 1
            if c.remaining_requests == 0 and not c.done.triggered:
                c.done.succeed()


class Cluster:
    """Instances, the router's view of them, and the per-request state of one simulation."""

    def __init__(self, env, hw: HardwareParams, cfg: SimConfig, workload: Workload, trace: Trace,
                 table: PredictionTable | None, track_future: bool):
        self.env, self.hw, self.cfg, self.workload, self.table = env, hw, cfg, workload, table
        R = len(trace)
        self.arrival = np.asarray(trace.arrival_s, np.float64)
        self.entry = np.asarray(trace.entry, np.int64)
        self.prompt_len = workload.prompt_len[self.entry].astype(np.int64)
        self.target = np.maximum(workload.output_len[self.entry], 1).astype(np.int64)
        self.generated = np.zeros(R, np.int64)
        self.first_token = np.full(R, np.nan)
        self.finish = np.full(R, np.nan)
        self.preemptions = np.zeros(R, np.int64)
        self.migrations = np.zeros(R, np.int64)
        self.recompute = np.zeros(R, bool)
        self.rejected = np.zeros(R, bool)
        self.instance_of = np.full(R, -1, np.int64)
        self.migrating = np.zeros(R, bool)
        N = cfg.num_instances
        self.batch = np.zeros(N, np.int64)
        self.kv_tokens = np.zeros(N, np.int64)
        self.used_pages = np.zeros(N, np.int64)
        self.queued_tokens = np.zeros(N, np.int64)
        self.queue_len = np.zeros(N, np.int64)
        self.horizon_points = np.linspace(0, cfg.horizon_steps, 9)
        self.future_profile = np.zeros((N, len(self.horizon_points)))
        self.track_future = track_future
        self.capacity_pages = hw.kv_capacity_tokens // hw.page_size
        self.instances = [Instance(self, i) for i in range(N)]
        self.remaining_requests = R
        self.done = env.event()
        self.migration_count = 0
        self.migrated_bytes = 0

    # ---------------------------------------------------------------- predictions
    def predicted_remaining(self, rids: np.ndarray) -> np.ndarray:
        """The predictor's current estimate of each request's remaining tokens (the truth when no
        table is bound, which only the oracle policy asks for)."""
        rids = np.asarray(rids, np.int64)
        if self.table is None:
            return (self.target[rids] - self.generated[rids]).astype(np.float64)
        return self.table.lookup(self.entry[rids], self.generated[rids])

    def kv_profile(self, rids: np.ndarray, ctx: np.ndarray) -> np.ndarray:
        """[n, J] predicted KV tokens of each request at `horizon_points` steps from now: it holds
        ctx + j tokens while its predicted remaining length exceeds j, none after."""
        j = self.horizon_points[None, :]
        if not len(rids):
            return np.zeros((0, j.shape[1]))
        rem = self.predicted_remaining(rids)[:, None]
        return np.where(rem > j, np.asarray(ctx, np.float64)[:, None] + j, 0.0)

    # ---------------------------------------------------------------- migration
    def can_migrate(self, rid: int, dst: int) -> bool:
        d = self.instances[dst]
        if self.migrating[rid] or d.migrating_in or d.free_slot() < 0:
            return False
        need = int(self.hw.pages(self.prompt_len[rid] + self.generated[rid] + 64))
        return int(d.used_pages()) + need <= self.capacity_pages

    def start_migration(self, rid: int, src: int, dst: int) -> None:
        self.env.process(self._migrate(rid, src, dst))

    def _migrate(self, rid: int, src: int, dst: int):
        s, d, hw = self.instances[src], self.instances[dst], self.hw
        slot = d.free_slot()
        need = int(hw.pages(self.prompt_len[rid] + self.generated[rid] + 64))
        d.reserved[slot] = True
        d.reserved_pages += need
        d.migrating_in = s.migrating_out = True
        self.migrating[rid] = True
        tokens = int(self.prompt_len[rid] + self.generated[rid])
        yield self.env.timeout(hw.migration_time(tokens))
        d.reserved_pages -= need
        d.reserved[slot] = False
        d.migrating_in = s.migrating_out = False
        self.migrating[rid] = False
        here = np.nonzero(s.active & (s.rid == rid))[0]
        if len(here) and not s.needs_prefill[here[0]]:
            src_slot = int(here[0])
            s.active[src_slot] = False
            s.rid[src_slot] = -1
            d.place(slot, rid, prefill=False)
            self.migrations[rid] += 1
            self.migration_count += 1
            self.migrated_bytes += tokens * hw.kv_bytes_per_token
            s.publish()
        d.publish()
        d.notify()
        s.notify()


@dataclasses.dataclass
class SimResult:
    policy: str
    hardware: str
    num_instances: int
    rate_per_s: float
    arrival_s: np.ndarray  # [R]
    ttft_s: np.ndarray  # [R] (nan for requests not served)
    tpot_s: np.ndarray  # [R] (nan for single-token or unserved requests)
    finished: np.ndarray  # [R] bool
    rejected: np.ndarray  # [R] bool
    preemptions: int
    migrations: int
    migrated_bytes: int
    makespan_s: float
    ttft_slo_s: float
    tpot_slo_s: float

    def slo_met(self) -> np.ndarray:
        tpot_ok = np.where(np.isnan(self.tpot_s), True, self.tpot_s <= self.tpot_slo_s)
        return self.finished & (self.ttft_s <= self.ttft_slo_s) & tpot_ok

    def summary(self, window: tuple[float, float] = (0.0, 1.0)) -> dict[str, Any]:
        """Metrics over the requests whose arrival index lies in `window` (fractions of the trace),
        e.g. (0.2, 0.9) leaves out the warm-up and the drain. Preemption, migration and makespan
        figures are of the whole run."""
        R = len(self.finished)
        sel = np.zeros(R, bool)
        sel[int(window[0] * R):max(int(window[1] * R), int(window[0] * R) + 1)] = True
        tpot = self.tpot_s[sel & ~np.isnan(self.tpot_s)]
        ttft = self.ttft_s[sel & ~np.isnan(self.ttft_s)]
        met = self.slo_met()[sel]
        R = int(sel.sum())
        pct = (lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan"))
        return {"policy": self.policy, "hardware": self.hardware, "instances": self.num_instances,
                "rate_per_s": self.rate_per_s, "requests": R, "finished": int(self.finished[sel].sum()),
                "rejected": int(self.rejected[sel].sum()),
                "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99), "tpot_mean_s": float(tpot.mean())
                if len(tpot) else float("nan"),
                "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
                "slo_attainment": float(met.mean()),
                "preemptions": self.preemptions, "migrations": self.migrations,
                "migrated_gb": self.migrated_bytes / 1e9, "makespan_s": self.makespan_s}


def simulate(workload: Workload, trace: Trace, hw: HardwareParams, policy, cfg: SimConfig) -> SimResult:
    """Run one simulation: `trace`'s requests replayed from `workload` on `cfg.num_instances`
    instances of `hw`, routed and rebalanced by `policy` (see `policies`)."""
    import simpy

    env = simpy.Environment()
    table = policy.bind(workload)
    cluster = Cluster(env, hw, cfg, workload, trace, table, track_future=policy.uses_future)
    policy.reset(cluster)
    for inst in cluster.instances:
        env.process(inst.run())
    limit_tokens = hw.kv_capacity_tokens

    def arrivals():
        for rid in range(len(trace)):
            wait = cluster.arrival[rid] - env.now
            if wait > 0:
                yield env.timeout(wait)
            if cluster.prompt_len[rid] + cluster.target[rid] + 1 > limit_tokens:
                cluster.rejected[rid] = True  # cannot fit any instance (a 4xx in a real server)
                cluster.remaining_requests -= 1
                continue
            if cfg.prefill == "disaggregated":
                env.process(prefill_then_dispatch(rid))
            else:
                cluster.instances[policy.dispatch(cluster, rid)].enqueue(rid)
        if cluster.remaining_requests == 0 and not cluster.done.triggered:
            cluster.done.succeed()

    def prefill_then_dispatch(rid):
        tokens = int(cluster.prompt_len[rid])
        yield env.timeout(float(hw.prefill_time(tokens)))
        cluster.generated[rid] = 1
        cluster.first_token[rid] = env.now
        if cluster.target[rid] <= 1:
            cluster.finish[rid] = env.now
            cluster.remaining_requests -= 1
            if cluster.remaining_requests == 0 and not cluster.done.triggered:
                cluster.done.succeed()
            return
        dst = policy.dispatch(cluster, rid)
        yield env.timeout(hw.migration_time(tokens))  # the prompt's KV to the decode instance
        cluster.instances[dst].enqueue(rid)

    interval = cfg.rebalance_interval_s or 20 * float(hw.step_time(1, 0))

    def rebalancer():
        while True:
            yield env.timeout(interval)
            for rid, src, dst in policy.rebalance(cluster):
                if cluster.can_migrate(rid, dst):
                    cluster.start_migration(rid, src, dst)

    env.process(arrivals())
    if policy.migrates:
        env.process(rebalancer())
    stop = cluster.done if cfg.max_time_s is None else simpy.AnyOf(env, [cluster.done, env.timeout(cfg.max_time_s)])
    env.run(until=stop)
    finished = ~np.isnan(cluster.finish)
    ttft = cluster.first_token - cluster.arrival
    n = cluster.target
    tpot = np.where(finished & (n > 1), (cluster.finish - cluster.first_token) / np.maximum(n - 1, 1), np.nan)
    rate = (len(trace) - 1) / max(float(trace.arrival_s[-1] - trace.arrival_s[0]), 1e-12) if len(trace) > 1 else 0.0
    return SimResult(policy=policy.name, hardware=hw.name, num_instances=cfg.num_instances, rate_per_s=rate,
                     arrival_s=cluster.arrival, ttft_s=ttft, tpot_s=tpot, finished=finished, rejected=cluster.rejected,
                     preemptions=int(cluster.preemptions.sum()), migrations=cluster.migration_count,
                     migrated_bytes=cluster.migrated_bytes, makespan_s=float(env.now),
                     ttft_slo_s=hw.ttft_slo_s, tpot_slo_s=hw.tpot_slo_s)


def goodput_rate(rates: np.ndarray, attainment: np.ndarray, level: float = 0.9) -> tuple[float, bool]:
    """DistServe's goodput from a sweep: the highest request rate whose SLO attainment is at least
    `level`, interpolated linearly where attainment crosses it. Returns (rate, bounded): bounded is
    False when even the highest swept rate meets the level (the true goodput is higher)."""
    r = np.asarray(rates, np.float64)
    a = np.asarray(attainment, np.float64)
    order = np.argsort(r)
    r, a = r[order], a[order]
    if a[0] < level:
        return 0.0, True  # not even the lowest swept rate: the sweep must start lower
    for i in range(1, len(r)):
        if a[i] < level:
            return float(r[i - 1] + (r[i] - r[i - 1]) * (a[i - 1] - level) / (a[i - 1] - a[i])), True
    return float(r[-1]), False
