"""N live engine instances behind one router: dispatch, KV migration, recompute on failure.

`Cluster` is the real counterpart of the simulator (`sim`): the same policies
(`policies.make_policy`: round-robin, least current KV, Llumnix-style, ours) decide where a new
request goes and which running requests move, but here they read the live instances (`_LiveView`
presents the instances' running requests, queues, pages and, for ours, each running request's
predicted remaining length from its instance's `LengthTracker`, as the arrays the policies read
in the simulator), and a migration moves real KV pages between sub-meshes (`migration.migrate`).

    instances = make_instances(model, 4, devices_per_instance=2, config=EngineConfig(...),
                               predictor=LengthPredictor.load(".../predictor.npz"))
    cluster = Cluster(instances, "ours")
    outs = cluster.generate(prompts, SamplingParams(max_tokens=64))     # on this thread
    cluster.start(); cluster.submit(ids, sampling, on_output)          # or one thread per instance

Threads: `start()` runs each instance's scheduler steps on its own thread (under the instance's
lock) and a rebalancer every `rebalance_interval_s`; `generate` / `run_until_idle` step every
instance in turn on the calling thread and rebalance every `rebalance_every` rounds (what the
tests use: deterministic). Router state is guarded by one lock, always taken before instance
locks, which are taken in index order (`Instance.locked`, which the stepping threads let through
between steps); callbacks running on instance threads take neither. Decisions read the instances
without their locks (`_LiveView` copies each scheduler's lists, which the GIL keeps whole: a
snapshot that may be a step old); only a migration locks, and only its two ends, so dispatch and
rebalancing never stall the instances that are not involved.

Faults (issue 18 G): a request that no instance can hold is refused at `submit` with
`RequestError` (the server answers 4xx); `stop_instance(i)` (or a step that raises) takes an
instance out and re-dispatches each of its unfinished requests as a continuation (its prompt and
the tokens generated so far, recomputed elsewhere; `migration.continuation`), so nothing is lost;
"ours" without a usable length predictor balances on current load, with a warning.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import types
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from jaxsys.generation import GenerationResult
from jaxsys.sampling import SamplingParams
from jaxsys.serve.cluster.instances import Instance
from jaxsys.serve.cluster.migration import MigrationRecord, continuation, enqueue, migrate as move
from jaxsys.serve.cluster.policies import POLICIES, make_policy
from jaxsys.serve.length.predictor import warn_untrained
from jaxsys.serve.scheduler.request import Request, RequestOutput, State
from jaxsys.serve.scheduler.scheduler import RequestError, new_request

__all__ = ["Cluster", "StepRecord"]

logger = logging.getLogger("jaxsys.serve.cluster")


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One scheduler step of one instance: what ran and how long it took (host wall time)."""

    instance: int
    batch: int  # decode rows
    kv_tokens: int  # KV tokens the decode rows attended
    prefill_tokens: int
    decode_s: float
    prefill_s: float
    step_s: float  # the whole scheduler step (admission and host bookkeeping included)
    cycle_s: float | None  # from the end of the instance's previous step, when that left it busy
    compiles: int  # executables the step compiled (its time is then no step cost)
    busy: int = 1  # instances stepping when it started, itself included (they share the host's cores)
    end_s: float = 0.0  # time.perf_counter() at its end


class _Slots:
    """One instance as the policies see it: its requests as slot arrays."""

    def __init__(self, rid: list[int], ctx: list[int], prefill: list[bool]):
        self.rid = np.asarray(rid, np.int64)
        self.ctx = np.asarray(ctx, np.int64)
        self.active = np.ones(len(rid), bool)
        self.needs_prefill = np.asarray(prefill, bool)
        self.migrating_out = False


class _LiveView:
    """The load arrays `policies` read (the simulator's `sim.Cluster` names), over the alive
    instances, from copies of their schedulers' lists (no instance lock; see the module
    docstring). Request ids of the view index `requests`."""

    def __init__(self, cluster: "Cluster", alive: list[Instance]):
        self.alive = alive
        N = len(alive)
        sched0 = alive[0].scheduler
        ps = sched0.page_size
        self.capacity_pages = sched0.pages.capacity
        self.hw = types.SimpleNamespace(page_size=ps, kv_capacity_tokens=self.capacity_pages * ps,
                                        pages=lambda t: -(-np.asarray(t) // ps))
        self.cfg = types.SimpleNamespace(num_instances=N)
        self.horizon_points = np.linspace(0, cluster.horizon_steps, 9)
        self.requests: list[Request] = []
        self.tracker_of: list[Any] = []
        self.prior = cluster.prior_output_len()
        self.kv_tokens = np.zeros(N, np.int64)
        self.used_pages = np.zeros(N, np.int64)
        self.queued_tokens = np.zeros(N, np.int64)
        self.batch = np.zeros(N, np.int64)
        self.future_profile = np.zeros((N, len(self.horizon_points)))
        self.instances = []
        queued: dict[int, list[Request]] = collections.defaultdict(list)
        for rid, r in list(cluster._current.items()):
            home = cluster._home.get(rid)
            if r.state is State.WAITING and home is not None:
                queued[home].append(r)
        for i, inst in enumerate(alive):
            s = inst.scheduler
            rid, ctx, pre = [], [], []
            for r in list(s.running) + list(s.prefilling):
                rid.append(self._add(r, inst.tracker))
                ctx.append(r.total_len if r.state is State.RUNNING else r.prompt_len)
                pre.append(r.state is not State.RUNNING)
            self.instances.append(_Slots(rid, ctx, pre))
            self.kv_tokens[i] = sum(ctx)
            self.batch[i] = len(rid)
            self.used_pages[i] = sum(len(r.pages) for r in list(s.running) + list(s.prefilling))
            q = queued.get(inst.index, [])
            q_rid = [self._add(r, None) for r in q]
            q_ctx = [r.prompt_len + len(r.out_tokens) for r in q]
            self.queued_tokens[i] = sum(q_ctx)
            self.future_profile[i] = (self.kv_profile(np.asarray(rid), np.asarray(ctx)).sum(0)
                                      + self.kv_profile(np.asarray(q_rid), np.asarray(q_ctx)).sum(0))
        self.migrating = np.zeros(len(self.requests), bool)

    def _add(self, r: Request, tracker) -> int:
        self.requests.append(r)
        self.tracker_of.append(tracker)
        return len(self.requests) - 1

    def predicted_remaining(self, rids) -> np.ndarray:
        """Each request's latest prediction (counted down since); before its first prediction, the
        median output length of the requests finished so far, less what it has generated."""
        out = np.empty(len(rids))
        for j, rid in enumerate(np.asarray(rids, np.int64)):
            r, tracker = self.requests[rid], self.tracker_of[rid]
            g = len(r.out_tokens)
            pred = tracker.remaining(r) if tracker is not None and tracker.active else None
            out[j] = pred if pred is not None else min(max(self.prior - g, 0.0), r.sampling.max_tokens - g)
        return out

    def kv_profile(self, rids: np.ndarray, ctx: np.ndarray) -> np.ndarray:
        """[n, J] predicted KV tokens at `horizon_points` steps from now (as `sim.Cluster.kv_profile`)."""
        j = self.horizon_points[None, :]
        if not len(rids):
            return np.zeros((0, j.shape[1]))
        rem = self.predicted_remaining(rids)[:, None]
        return np.where(rem > j, np.asarray(ctx, np.float64)[:, None] + j, 0.0)


class Cluster:
    """Engine instances behind a router (see the module docstring)."""

    def __init__(self, instances: Sequence[Instance], policy: str = "least_kv", *, rebalance_every: int = 8,
                 rebalance_interval_s: float = 0.05, horizon_steps: int = 128, **policy_kw):
        if not instances:
            raise ValueError("a cluster needs at least one instance")
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        self.instances = list(instances)
        self.policy_name = policy
        self.policy = make_policy(policy, **policy_kw)
        self.predicting = all(i.tracker is not None and i.tracker.active for i in self.instances)
        with warnings.catch_warnings():  # the live reason is clearer than the simulator's
            warnings.simplefilter("ignore", RuntimeWarning)
            self.policy.bind(types.SimpleNamespace(tables={"ours": None} if self.predicting else {}))
        if policy == "ours" and not self.predicting:
            warn_untrained("no trained length predictor runs in the instances")
        self.rebalance_every = rebalance_every
        self.rebalance_interval_s = rebalance_interval_s
        self.horizon_steps = horizon_steps
        self._lock = threading.RLock()
        self._home: dict[str, int] = {}  # request id -> instance index
        self._current: dict[str, Request] = {}  # request id -> the request object live on an instance
        self._finished_lens: collections.deque[int] = collections.deque(maxlen=4096)
        self.migrations: list[MigrationRecord] = []
        self.recomputed = 0
        self.rounds = 0
        self.step_records: list[StepRecord] = []
        self.record_steps = False
        self._busy_until: dict[int, float | None] = {}  # instance -> end of its last step, if it left work
        self._threads: list[threading.Thread] = []
        self._stop = False
        self.policy.reset(None)

    # ------------------------------------------------------------------ router state
    @property
    def alive(self) -> list[Instance]:
        return [i for i in self.instances if i.alive]

    def prior_output_len(self) -> float:
        return float(np.median(self._finished_lens)) if self._finished_lens else 64.0

    def _locked(self, instances: Sequence[Instance]):
        """Enter the locks of `instances` in index order (a context manager)."""
        import contextlib

        stack = contextlib.ExitStack()
        for inst in sorted(instances, key=lambda i: i.index):
            stack.enter_context(inst.locked())
        return stack

    # ------------------------------------------------------------------ requests
    def validate(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        """Raise `RequestError` unless some alive instance can hold the request."""
        alive = self.alive
        if not alive:
            raise RequestError("no serving instance is alive")
        errors = []
        for inst in alive:
            try:
                inst.scheduler.validate(prompt_ids, sampling)
                return
            except RequestError as e:
                errors.append(f"instance {inst.index}: {e}")
        raise RequestError("the request fits no instance (" + "; ".join(errors) + ")")

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams,
               on_output: Callable[[RequestOutput], None] | None = None, request_id: str | None = None) -> Request:
        """Dispatch a new request by the policy; its events go to `on_output` (on an instance's
        thread). Raises `RequestError` when it fits no instance."""
        self.validate(prompt_ids, sampling)
        r = new_request(prompt_ids, sampling, None, request_id)
        r.on_output = self._watch(r, on_output)
        with self._lock:
            self._place(r)
        return r

    def _watch(self, r: Request, on_output):
        def watch(out: RequestOutput) -> None:  # no lock: runs on instance threads
            if out.finished:
                self._finished_lens.append(out.completion_tokens)
                self._current.pop(r.request_id, None)
                self._home.pop(r.request_id, None)
            if on_output is not None:
                on_output(out)

        return watch

    def _place(self, r: Request, *, direct: bool = False) -> None:
        """Dispatch `r` (router lock held): the policy picks among the alive instances."""
        alive = self.alive
        view = _LiveView(self, alive)
        order = [view.alive[self.policy.dispatch(view, -1)]]
        order += [i for i in alive if i is not order[0]]
        for inst in order:  # the policy's choice, else the first that can hold it
            try:
                inst.scheduler.validate(r.prompt_ids, r.sampling)
            except RequestError:
                continue
            self._home[r.request_id] = inst.index
            self._current[r.request_id] = r
            if direct:
                with inst.locked():
                    enqueue(inst, r)
            else:
                inst.scheduler.submit(r)
            inst.wake.set()
            return
        raise RequestError("the request fits no alive instance")

    def cancel(self, request_id: str) -> None:
        home = self._home.get(request_id)
        if home is not None:
            self.instances[home].scheduler.cancel(request_id)
            self.instances[home].wake.set()

    def has_work(self) -> bool:
        return any(i.scheduler.has_work() for i in self.alive)

    # ------------------------------------------------------------------ stepping
    def _step_instance(self, inst: Instance) -> bool:
        """One scheduler step of `inst` (its lock held by the caller). Returns whether it ran."""
        s = inst.scheduler
        if not (inst.alive and s.has_work()):
            return False
        st = s.stats
        before = (st.decode_s, st.prefill_s, st.decode_tokens, st.prefill_tokens)
        kv = sum(r.total_len for r in s.running)
        compiled = inst.engine.compile_count
        busy = self._busy_with(inst) if self.record_steps else 1
        t0 = time.perf_counter()
        s.step()
        t1 = time.perf_counter()
        inst.steps += 1
        if self.record_steps:
            last = self._busy_until.get(inst.index)
            self.step_records.append(StepRecord(inst.index, st.decode_tokens - before[2], kv,
                                                st.prefill_tokens - before[3], st.decode_s - before[0],
                                                st.prefill_s - before[1], t1 - t0,
                                                None if last is None else t1 - last,
                                                inst.engine.compile_count - compiled, busy, t1))
        self._busy_until[inst.index] = t1 if s.running or s.prefilling else None
        return True

    def _busy_with(self, inst: Instance) -> int:
        """`inst` and the other alive instances that have requests to step (read without locks)."""
        return 1 + sum(1 for o in self.instances if o is not inst and o.alive and o.scheduler.has_work())

    def step(self) -> None:
        """One round on the calling thread: a step of every alive instance with work, and a
        rebalance every `rebalance_every` rounds."""
        for inst in self.alive:
            with inst.lock:
                self._step_instance(inst)
        self.rounds += 1
        if self.policy.migrates and self.rounds % self.rebalance_every == 0:
            self.rebalance()

    def run_until_idle(self, max_rounds: int = 1_000_000) -> None:
        for _ in range(max_rounds):
            if not self.has_work():
                return
            self.step()
        raise RuntimeError(f"the cluster did not go idle in {max_rounds} rounds")

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams]
                 = SamplingParams(), *, on_round: Callable[[int], None] | None = None) -> list[GenerationResult]:
        """Token-id prompts to completion on this thread. on_round(k): called after every round."""
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        reqs = [self.submit(p, sp) for p, sp in zip(prompts, sampling)]
        k = 0
        while self.has_work():
            self.step()
            if on_round is not None:
                on_round(k)
            k += 1
        return [_result(r) for r in reqs]

    # ------------------------------------------------------------------ threads
    def start(self) -> None:
        """Step every instance on its own thread, and rebalance on another."""
        if self._threads:
            return
        self._stop = False
        for inst in self.instances:
            t = threading.Thread(target=self._run_instance, args=(inst,), name=f"jaxsys-instance-{inst.index}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        if self.policy.migrates:
            t = threading.Thread(target=self._run_rebalancer, name="jaxsys-rebalancer", daemon=True)
            t.start()
            self._threads.append(t)

    def shutdown(self) -> None:
        self._stop = True
        for inst in self.instances:
            inst.wake.set()
        for t in self._threads:
            t.join()
        self._threads = []

    def _run_instance(self, inst: Instance) -> None:
        while not self._stop and inst.alive:
            failed = None
            with inst.lock:
                try:
                    ran = self._step_instance(inst)
                except Exception as e:  # noqa: BLE001 - the instance is lost; its requests are not
                    logger.exception("instance %d failed; re-dispatching its requests", inst.index)
                    failed, ran = e, True
            if failed is not None:
                self.stop_instance(inst.index)
                return
            if not ran:
                inst.wake.wait(0.01)
                inst.wake.clear()
            inst.yield_lock()

    def _run_rebalancer(self) -> None:
        while not self._stop:
            time.sleep(self.rebalance_interval_s)
            if self.has_work():
                self.rebalance()

    # ------------------------------------------------------------------ migration and faults
    def rebalance(self) -> list[MigrationRecord]:
        """Ask the policy which running requests to move, and move them (KV pages and all)."""
        done = []
        with self._lock:
            alive = self.alive
            if len(alive) < 2:
                return done
            view = _LiveView(self, alive)
            for rid, hi, lo in self.policy.rebalance(view):
                r, src, dst = view.requests[rid], view.alive[hi], view.alive[lo]
                with self._locked([src, dst]):  # `move` checks the request is still running on src
                    rec = move(r, src, dst) if src.alive and dst.alive else None
                if rec is not None:
                    self._home[r.request_id] = dst.index
                    self.migrations.append(rec)
                    done.append(rec)
                    dst.wake.set()
        return done

    def migrate(self, request_id: str, dst: int) -> MigrationRecord | None:
        """Move one running request to instance `dst` now (None if it is not running or cannot move)."""
        with self._lock:
            home = self._home.get(request_id)
            r = self._current.get(request_id)
            if home is None or r is None or home == dst or not self.instances[dst].alive:
                return None
            src, target = self.instances[home], self.instances[dst]
            with self._locked([src, target]):
                rec = move(r, src, target)
                if rec is not None:
                    self._home[request_id] = dst
                    self.migrations.append(rec)
                    target.wake.set()
            return rec

    def stop_instance(self, index: int) -> int:
        """Take instance `index` out of service now; every unfinished request it held is
        re-dispatched (recomputed from its prompt and tokens so far). Returns how many."""
        with self._lock:
            inst = self.instances[index]
            with inst.locked():
                inst.alive = False
            inst.wake.set()
            moved = 0
            for rid in [rid for rid, home in list(self._home.items()) if home == index]:
                r = self._current.get(rid)
                if r is None or r.state is State.FINISHED:
                    continue
                fresh = r.state is State.WAITING and r.decoder is None and r.stops is None and not r.out_tokens
                nxt = r if fresh else continuation(r)
                if fresh:
                    nxt.pages, nxt.own_pages, nxt.node, nxt.pending_node, nxt.num_computed = [], [], None, None, 0
                try:
                    self._place(nxt, direct=not fresh)
                except RequestError as e:
                    r.state = State.FINISHED
                    self._home.pop(rid, None)
                    self._current.pop(rid, None)
                    if r.on_output is not None:
                        r.on_output(RequestOutput(rid, "", [], True, "error", r.prompt_len, len(r.out_tokens),
                                                  f"its instance stopped and no other can hold it: {e}"))
                    continue
                self._current[rid] = nxt
                self.recomputed += 1
                moved += 1
            return moved

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, Any]:
        loads = []
        for inst in self.instances:
            with inst.locked():
                load = inst.load()
                if inst.tracker is not None:
                    load["length_predictor"] = inst.tracker.stats()
            loads.append(load)
        return {"policy": self.policy_name, "predicting": self.predicting, "instances": loads,
                "migrations": len(self.migrations), "migrated_bytes": sum(m.bytes for m in self.migrations),
                "migrated_pages": sum(m.pages for m in self.migrations), "recomputed_requests": self.recomputed}


def _result(r: Request) -> GenerationResult:
    return GenerationResult(request_id=r.request_id, prompt=None, prompt_ids=r.prompt_ids, token_ids=r.out_tokens,
                            text=r.text, finish_reason=r.finish_reason or "",
                            ttft_s=(r.first_token_time or r.arrival) - r.arrival, tpot_s=list(r.token_intervals))
