"""A discrete-event simulator (SimPy) of decode instances behind a router, with live KV migration.

Why a simulator: the rescheduling policies matter at tens to hundreds of instances, far beyond the
machines we have. The simulator replays our own generations (`workload.Workload`) on instances
whose costs come from `hardware.HardwareParams` (a step-time model fitted to our engine, or a
stated H100-like roofline), so every figure it produces is labelled simulated.

The model, per instance (one SimPy process):

- A decode step runs every running request one token; it takes `step_time(B, K)` for B running
  requests holding K KV tokens, plus `prefill_time` of any request that needs its prompt (and
  tokens so far) computed in that step. On a parameter set of instances sharing one host
  (`HardwareParams.host_slowdown`), the step is slowed by the sharing factor of the number of
  instances busy when it starts.
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
batch, queue, predicted KV profile over the next steps) live in cluster-wide arrays that each
step publishes (computed when a policy reads them), so a decision over 256 instances is a few
vectorised operations.

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
    """One decode instance: fixed batch slots (numpy arrays) and a FCFS queue.

    Why it is written this way: a sweep runs millions of decode steps, so a step must cost a few
    Python operations, not a few dozen numpy calls. Between two changes of its running set
    (an admission, a preemption, a finish, a migration), every running request gains exactly one
    token per step, so the instance caches, when the set changes, what a step needs: the running
    slots, their KV tokens, the steps until the first of them finishes, and the pages they hold
    as a function of the steps since (`_pages_at`: n * (k // page) + T[k % page]). The loads the
    router reads are published lazily (`publish` snapshots what may change before the next read,
    `Cluster` computes the arrays when a policy reads them), with the values an eager publish
    would have had.
    """

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
        self.reserved_slots = 0
        self.queue: deque[int] = deque()
        self.queued_tokens = 0  # context tokens of the queued requests (constant while queued)
        # their predicted KV profile; replaced, never mutated in place (`publish` keeps a reference)
        self.queued_profile = np.zeros(len(cluster.horizon_points))
        self.wake = cluster.env.event()
        self.migrating_out = False
        self.migrating_in = False
        self._order = 0
        self._any_prefill = False  # some running slot still needs its prefill
        self._touched = False  # a migration changed the running set during the current step
        self._set_changed()
        self._published = (0, 0, 0, self.queued_profile)

    # ---------------------------------------------------------------- the running set's cache
    def _set_changed(self) -> None:
        self._slots = None
        self._touched = True

    def _running(self) -> np.ndarray:
        """The running slots (ascending), refreshing the cache after a change of the set."""
        if self._slots is None:
            c, ps = self.cluster, self.hw.page_size
            slots = np.nonzero(self.active)[0]
            ctx = self.ctx[slots]
            self._slots, self._rids = slots, self.rid[slots]
            self._n = len(slots)
            self._kv = int(ctx.sum())
            self._left = int((c.target[self._rids] - c.generated[self._rids]).min()) if self._n else 0
            # pages held after k more steps: n * (k // ps) + T[k % ps], T[r] = sum ceil((ctx + r) / ps)
            r = np.arange(ps + 1)
            self._page_table = (-(-(ctx[:, None] + r[None, :]) // ps)).sum(0).tolist()
            self._k = 0
        return self._slots

    def _pages_at(self, k: int) -> int:
        ps = self.hw.page_size
        return self._n * (k // ps) + self._page_table[k % ps]

    # ---------------------------------------------------------------- bookkeeping
    def used_pages(self) -> int:
        self._running()
        return self._pages_at(self._k) + self.reserved_pages

    def free_slot(self) -> int:
        free = np.nonzero(~self.active & ~self.reserved)[0]
        return int(free[0]) if len(free) else -1

    def has_free_slot(self) -> bool:
        self._running()
        return self._n + self.reserved_slots < self.hw.max_batch

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
        ctx = int(c.prompt_len[rid] + c.generated[rid])
        self.queued_tokens += sign * ctx
        if c.track_future:
            self.queued_profile = self.queued_profile + sign * c.kv_profile_one(rid, ctx)

    def place(self, slot: int, rid: int, *, prefill: bool) -> None:
        c = self.cluster
        self.rid[slot] = rid
        self.ctx[slot] = c.prompt_len[rid] + c.generated[rid]
        self.active[slot] = True
        self.reserved[slot] = False
        self.needs_prefill[slot] = prefill
        self._any_prefill |= prefill
        self._order += 1
        self.admitted_at[slot] = self._order
        c.instance_of[rid] = self.index
        self._set_changed()

    def remove(self, slot: int) -> None:
        """Free `slot` (finished, preempted or migrated away)."""
        self.active[slot] = False
        self.rid[slot] = -1
        self._set_changed()

    def _admit(self) -> None:
        c, hw = self.cluster, self.hw
        ps, cap = hw.page_size, hw.kv_capacity_tokens // hw.page_size
        self._running()
        free = hw.max_batch - self._n - self.reserved_slots
        used = self._pages_at(self._k) + self.reserved_pages
        while self.queue and free > 0:
            rid = self.queue[0]
            ctx = int(c.prompt_len[rid] + c.generated[rid])
            if used + -(-(ctx + 1) // ps) > cap:
                return
            self.queue.popleft()
            self._count_queued(rid, -1)
            # a fresh disaggregated request arrives with its KV; everything else computes it here
            self.place(self.free_slot(), rid, prefill=not (c.cfg.prefill == "disaggregated" and c.generated[rid] == 1
                                                           and not c.recompute[rid]))
            c.recompute[rid] = False
            free -= 1
            used += -(-ctx // ps)

    def _preempt_overflow(self) -> None:
        c, hw = self.cluster, self.hw
        cap = hw.kv_capacity_tokens // hw.page_size
        while True:
            self._running()
            if not self._n or self._pages_at(self._k + 1) + self.reserved_pages <= cap:
                return
            slots = self._slots
            victim = int(slots[np.argmax(self.admitted_at[slots])])
            rid = int(self.rid[victim])
            self.remove(victim)
            c.preemptions[rid] += 1
            c.recompute[rid] = True
            self.queue.appendleft(rid)
            self._count_queued(rid, +1)

    def publish(self) -> None:
        """Mark this instance's entries of the cluster-wide load arrays stale, with a snapshot of
        what may change before they are read (the queue, the reservations); the running set
        cannot change without another publish."""
        self._published = (self.reserved_pages, self.queued_tokens, len(self.queue), self.queued_profile)
        self.cluster._stale.add(self.index)

    def write_loads(self) -> None:
        """This instance's entries of the cluster-wide load arrays, as of its last `publish`."""
        c = self.cluster
        reserved, queued_tokens, queue_len, queued_profile = self._published
        slots = self._running()
        c._batch[self.index] = self._n
        c._kv_tokens[self.index] = self._kv
        c._used_pages[self.index] = self._pages_at(self._k) + reserved
        c._queued_tokens[self.index] = queued_tokens
        c._queue_len[self.index] = queue_len
        if c.track_future:
            c._future_profile[self.index] = c.kv_profile(self._rids, self.ctx[slots]).sum(0) + queued_profile

    # ---------------------------------------------------------------- the decode loop
    def run(self):
        c, hw, env = self.cluster, self.hw, self.cluster.env
        a, b, cc, p0, p1 = hw.step_a, hw.step_b, hw.step_c, hw.prefill_p0, hw.prefill_p1
        shared = hw.host_slowdown is not None
        while True:
            if self.queue:
                self._admit()
            self._preempt_overflow()
            self.publish()
            slots = self._running()
            if not self._n:
                self.wake = env.event()
                if self.queue:  # blocked on a reservation: retry after a step's time
                    yield env.timeout(a + b)
                else:
                    yield self.wake
                continue
            B, K, pre = self._n, self._kv, None
            if self._any_prefill:
                pre = slots[self.needs_prefill[slots]]
                if len(pre):
                    P = int(self.ctx[pre].sum())
                    B, K = B - len(pre), K - P
                else:
                    pre = None
            dt = 0.0
            if B:
                dt += a + b * B + cc * K
            if pre is not None:
                dt += p0 + p1 * P
            if shared:  # other instances stepping on the same host slow this step down
                dt *= hw.sharing_factor(c.busy_instances())
            rids = self._rids
            self._touched = False
            yield env.timeout(dt)
            now = env.now
            if self._touched:  # a request that migrated away during the step loses its token
                keep = self.active[slots] & (self.rid[slots] == rids)
                slots, rids = slots[keep], rids[keep]
            c.generated[rids] += 1
            self.ctx[slots] += 1
            if self._slots is slots:  # the set is unchanged: advance the cache by one step
                self._kv += self._n
                self._k += 1
                self._left -= 1
                check = self._left <= 0
            else:  # (a cache rebuilt during the step predates its tokens)
                self._set_changed()
                check = True
            if pre is not None:
                self.needs_prefill[slots] = False
                first = rids[np.isnan(c.first_token[rids])]
                c.first_token[first] = now
            self._any_prefill = False
            if check:
                for s in slots[c.generated[rids] >= c.target[rids]]:
                    rid = int(self.rid[s])
                    c.finish[rid] = now
                    self.remove(s)
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
        self._batch = np.zeros(N, np.int64)
        self._kv_tokens = np.zeros(N, np.int64)
        self._used_pages = np.zeros(N, np.int64)
        self._queued_tokens = np.zeros(N, np.int64)
        self._queue_len = np.zeros(N, np.int64)
        self.horizon_points = np.linspace(0, cfg.horizon_steps, 9)
        self._horizon = self.horizon_points.tolist()
        self._future_profile = np.zeros((N, len(self.horizon_points)))
        self._stale: set[int] = set()  # instances whose entries of the load arrays are out of date
        self.track_future = track_future
        self.capacity_pages = hw.kv_capacity_tokens // hw.page_size
        self.instances = [Instance(self, i) for i in range(N)]
        self.remaining_requests = R
        self.done = env.event()
        self.migration_count = 0
        self.migrated_bytes = 0

    def busy_instances(self) -> int:
        """Instances with requests running or queued (those that step now)."""
        return sum(1 for inst in self.instances if inst.queue or inst.active.any())

    # ---------------------------------------------------------------- the router's view
    def _loads(self) -> None:
        if self._stale:
            for i in self._stale:
                self.instances[i].write_loads()
            self._stale.clear()

    @property
    def batch(self) -> np.ndarray:
        """[N] running requests per instance (the load arrays are as of each instance's last publish)."""
        self._loads()
        return self._batch

    @property
    def kv_tokens(self) -> np.ndarray:
        """[N] KV tokens of the running requests."""
        self._loads()
        return self._kv_tokens

    @property
    def used_pages(self) -> np.ndarray:
        """[N] KV pages held (running requests and reservations for incoming migrations)."""
        self._loads()
        return self._used_pages

    @property
    def queued_tokens(self) -> np.ndarray:
        """[N] context tokens of the queued requests."""
        self._loads()
        return self._queued_tokens

    @property
    def queue_len(self) -> np.ndarray:
        self._loads()
        return self._queue_len

    @property
    def future_profile(self) -> np.ndarray:
        """[N, J] predicted KV tokens at `horizon_points` steps from now (predictive policies only)."""
        self._loads()
        return self._future_profile

    # ---------------------------------------------------------------- predictions
    def predicted_remaining(self, rids: np.ndarray) -> np.ndarray:
        """The predictor's current estimate of each request's remaining tokens (the truth when no
        table is bound, which only the oracle policy asks for)."""
        rids = np.asarray(rids, np.int64)
        if self.table is None:
            return (self.target[rids] - self.generated[rids]).astype(np.float64)
        return self.table.lookup(self.entry[rids], self.generated[rids])

    def kv_profile_one(self, rid: int, ctx: int) -> np.ndarray:
        """[J] `kv_profile` of one request, without the array overhead (the same numbers)."""
        g = int(self.generated[rid])
        if self.table is None:
            rem = float(self.target[rid] - g)
        else:
            t, e = self.table, int(self.entry[rid])
            j = min(g // t.k, int(t.counts[e]) - 1)
            rem = max(float(t.values[t.offsets[e] + j]) - (g - j * t.k), 0.0)
        return np.array([ctx + h if rem > h else 0.0 for h in self._horizon])

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
        if self.migrating[rid] or d.migrating_in or not d.has_free_slot():
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
        d.reserved_slots += 1
        d.reserved_pages += need
        d.migrating_in = s.migrating_out = True
        self.migrating[rid] = True
        tokens = int(self.prompt_len[rid] + self.generated[rid])
        yield self.env.timeout(hw.migration_time(tokens))
        d.reserved_pages -= need
        d.reserved_slots -= 1
        d.reserved[slot] = False
        d.migrating_in = s.migrating_out = False
        self.migrating[rid] = False
        here = np.nonzero(s.active & (s.rid == rid))[0]
        if len(here) and not s.needs_prefill[here[0]]:
            s.remove(int(here[0]))
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
