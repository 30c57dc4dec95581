"""Where the simulator meets the real cluster: simulated vs measured per-request TPOT.

The issue's check: on the real 4-instance setup (`router.Cluster` over `instances.make_instances`:
engine instances on sub-meshes with KV-page migration), replay an arrival trace, replay the same
trace through the simulator, and compare per-request TPOT at p50 (within 15%).

What the real setup is, and what the simulator must therefore know about it: the instances are
engines on the virtual CPU devices of one host, so they share its cores (and the Python
interpreter that runs their schedulers). A step of one instance takes longer while the others
step too, which independent simulated instances would not see; and any XLA compilation while a
trace runs stalls every instance for its duration. Hence, in order:

- `warm_up(instances, ...)`: compile, before anything is timed, every shape bucket the replay can
  reach (`shape_buckets`: the engine's decode, hidden-state decode and prefill buckets for the
  pool's prompt and context lengths, the length head's row buckets, the migration programs
  between every pair of instances). `CompileWatch` counts every XLA compilation in the process
  (JAX's monitoring events, any thread, not only the engines'), so each timed window reports
  what compiled inside it.
- `measure_host_sharing(instances, ...)`: the median decode-step cycle of an instance while k
  instances step the same batch at once, k = 1..N; `slowdown[k - 1] = t_k / t_1`. This is the
  simulator's `HardwareParams.host_slowdown` for the real section.
- `replay(cluster, requests, trace)`: the requests arrive at the trace's times (the cluster's
  instances step on their own threads), each generates exactly its recorded number of tokens
  (EOS ignored), and per-request TTFT and TPOT (the mean time between its tokens, the
  simulator's definition) are measured, with migrations and the compilations during the run.
  Every replay starts with empty prefix caches (the simulator has none, and a policy replayed
  after another must not find the other's prompts cached).
- `fit_cluster_hardware(records, ...)`: the simulator's step-time model fitted to the instances'
  own steps (`router.StepRecord`) under a *calibration* trace run on the same cluster. What is
  fitted is a step's *cycle*: from the end of the instance's previous step to the end of this
  one, so the host work between steps (the loop, waits for the instance's lock, admission) is
  priced, as it is in every measured time between two tokens; each cycle is divided by the
  measured sharing slowdown of the number of instances busy when it started (the model is an
  instance's cost alone; the simulator multiplies it back by the instances busy in its own
  run); steps during which anything compiled are left out. The validation trace is another
  trace: nothing is fitted to the run being validated.
- `compare_with_real_run`: the p50 error, and the per-request error, of the simulated TPOTs.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import threading
import time
from typing import Any, Sequence

import numpy as np

__all__ = ["CompileWatch", "RealRun", "ReplayRequest", "TPOT_P50_TOLERANCE", "compare_with_real_run",
           "fit_cluster_hardware", "measure_host_sharing", "replay", "shape_buckets", "warm_up"]

TPOT_P50_TOLERANCE = 0.15
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # JAX's monitoring event of every XLA compile


class CompileWatch:
    """Every XLA compilation in this process while the watch is open (on any thread), from JAX's
    monitoring events: their spans in `time.perf_counter()` time and the names of the compiled
    functions.

        with CompileWatch() as watch:
            ...
        watch.count, watch.seconds, watch.overlaps(t0, t1)
    """

    def __init__(self):
        self.spans: list[tuple[float, float, str]] = []  # (start, end, function name)

    def _listener(self, event: str, duration: float, **kw) -> None:
        if event == COMPILE_EVENT:
            end = time.perf_counter()
            self.spans.append((end - duration, end, str(kw.get("fun_name", ""))))

    def __enter__(self) -> "CompileWatch":
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listener)

    @property
    def count(self) -> int:
        return len(self.spans)

    @property
    def seconds(self) -> float:
        return float(sum(e - s for s, e, _ in self.spans))

    def overlaps(self, start: float, end: float) -> bool:
        """Whether any compilation ran during [start, end]."""
        return any(s < end and e > start for s, e, _ in list(self.spans))

    def summary(self) -> dict[str, Any]:
        names: dict[str, int] = {}
        for _, _, n in self.spans:
            names[n] = names.get(n, 0) + 1
        return {"compiles": self.count, "compile_s": self.seconds, "by_function": names}


# ---------------------------------------------------------------------------------------------
# warm-up: every shape the replay can reach, compiled before anything is timed


def shape_buckets(config, *, max_prompt_tokens: int, max_context_tokens: int) -> dict[str, list[tuple[int, ...]]]:
    """Every padded shape the scheduler can hand the engine (`Scheduler._decode_step`,
    `_prefill_step`) for prompts of at most `max_prompt_tokens` tokens growing to at most
    `max_context_tokens`: "decode" (B, P) and "prefill" (B, T, P), as power-of-two buckets of
    the batch rows B, the chunk tokens T and the page-table width P. A prefill batch pads to its
    longest chunk and its furthest end, which may come from different requests, so every T goes
    with every P that can hold a chunk of that bucket."""
    from jaxsys.shapes import pow2_bucket

    if not 1 <= max_prompt_tokens < max_context_tokens:
        raise ValueError(f"need 1 <= max_prompt_tokens < max_context_tokens, got {max_prompt_tokens}, "
                         f"{max_context_tokens}")
    ps = config.page_size

    def buckets(hi: int, minimum: int = 1) -> list[int]:
        return sorted({pow2_bucket(n, minimum) for n in range(1, hi + 1)})

    decode_B = buckets(config.max_decode_batch)
    decode_P = buckets(math.ceil(max_context_tokens / ps), 4)
    prefill_B = buckets(min(config.max_prefill_batch, config.max_decode_batch))
    prefill_P = buckets(math.ceil(max_prompt_tokens / ps), 4)
    smallest_chunk = {}  # T bucket -> the smallest chunk in it
    for c in range(1, min(config.prefill_chunk, max_prompt_tokens) + 1):
        smallest_chunk.setdefault(pow2_bucket(c, 16), c)
    prefill_TP = [(T, P) for T, c in sorted(smallest_chunk.items()) for P in prefill_P if P * ps >= c]
    return {"decode": [(B, P) for B in decode_B for P in decode_P],
            "prefill": [(B, T, P) for B in prefill_B for T, P in prefill_TP]}


def _on_threads(fn, items) -> None:
    """fn(item) for every item, each on its own thread; the first exception is raised here."""
    errors: list[BaseException] = []

    def run(item) -> None:
        try:
            fn(item)
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _warm_engine(instance, buckets: dict[str, list[tuple[int, ...]]]) -> None:
    """Run every bucket once on `instance`'s engine with padding rows only (positions -1: their KV
    goes to the scratch page, their tokens are discarded), so each executable is compiled."""
    from jaxsys.sampling import batch_arrays

    engine = instance.engine
    tracker = instance.tracker if instance.tracker is not None and instance.tracker.active else None
    for B, P in buckets["decode"]:
        args = (np.zeros(B, np.int32), np.full(B, -1, np.int32), np.zeros((B, P), np.int32), np.zeros(B, np.int32),
                batch_arrays([], B))
        engine.decode(*args)
        if tracker is not None:
            engine.decode_with_hidden(tracker.layer, *args)
    for B, T, P in buckets["prefill"]:
        engine.prefill(np.zeros((B, T), np.int32), np.full((B, T), -1, np.int32), np.zeros((B, P), np.int32),
                       np.zeros(B, np.int32), np.zeros(B, np.int32), batch_arrays([], B))


def warm_up(instances, *, max_prompt_tokens: int, max_context_tokens: int) -> dict[str, Any]:
    """Compile everything a replay of requests within these lengths can run, on every instance:
    the engine buckets (`shape_buckets`; one thread per instance, so compilations overlap on the
    host's cores), the length head's row buckets, and the KV-migration programs between every
    ordered pair of instances for every page-count bucket. Call before the cluster starts.
    Returns what was compiled and how long it took."""
    from jaxsys.serve.cluster.migration import precompile

    buckets = shape_buckets(instances[0].engine.config, max_prompt_tokens=max_prompt_tokens,
                            max_context_tokens=max_context_tokens)
    t0 = time.perf_counter()
    with CompileWatch() as watch:
        _on_threads(lambda inst: _warm_engine(inst, buckets), instances)
        heads = {id(i.tracker.predictor): i for i in instances if i.tracker is not None and i.tracker.active}
        for inst in heads.values():
            D = inst.engine.cfg.hidden_size
            for B in sorted({b for b, _ in buckets["decode"]}):
                inst.tracker.predictor.predict_hidden(np.zeros((B, D), np.float32), np.zeros(B, np.int64))
        max_pages = math.ceil(max_context_tokens / instances[0].engine.config.page_size)
        for src in instances:
            for dst in instances:
                if src is not dst:
                    precompile(src, dst, max_pages)
    return {"decode_buckets": len(buckets["decode"]), "prefill_buckets": len(buckets["prefill"]),
            "instances": len(instances), "seconds": time.perf_counter() - t0, **watch.summary()}


# ---------------------------------------------------------------------------------------------
# the host's cores, shared


def measure_host_sharing(instances, prompt_ids: Sequence[int], *, batch: int, steps: int = 16) -> dict[str, Any]:
    """How much longer a decode step takes while other instances step at the same time (they share
    the host's cores and interpreter): for k = 1..N, the first k instances each decode `batch`
    greedy requests of `prompt_ids` on their own threads, and the median cycle of their pure
    decode steps (end of one step to the end of the next) is t_k. Returns
    {"slowdown": [t_k / t_1], "step_s": [t_k], ...}. Call on warmed, idle instances (before the
    cluster starts)."""
    from jaxsys.sampling import SamplingParams
    from jaxsys.serve.scheduler.scheduler import new_request

    sp = SamplingParams(max_tokens=steps + 3, temperature=0.0, ignore_eos=True)
    step_s: list[float] = []
    for k in range(1, len(instances) + 1):
        cycles: list[list[float]] = [[] for _ in range(k)]

        def run(j: int) -> None:
            s = instances[j].scheduler
            last = None
            while s.has_work():
                with instances[j].lock:
                    prefilling = bool(s.prefilling or s.queue_length)
                    s.step()
                now = time.perf_counter()
                if last is not None and not prefilling and s.running:
                    cycles[j].append(now - last)
                last = now if s.running else None

        for j in range(k):
            for _ in range(batch):
                instances[j].scheduler.submit(new_request(list(prompt_ids), sp))
        _on_threads(run, range(k))
        step_s.append(float(statistics.median(c for cs in cycles for c in cs)))
        for inst in instances[:k]:
            radix = inst.scheduler.radix
            radix.evict(radix.evictable_pages())
    return {"batch": batch, "prompt_tokens": len(prompt_ids), "steps": steps, "step_s": step_s,
            "slowdown": [t / step_s[0] for t in step_s]}


# ---------------------------------------------------------------------------------------------
# replaying a trace on the real cluster


@dataclasses.dataclass(frozen=True)
class ReplayRequest:
    """One pool entry to replay: prompt token ids and the number of tokens to generate."""

    prompt_ids: tuple[int, ...]
    output_len: int
    seed: int = 0


@dataclasses.dataclass
class RealRun:
    policy: str
    ttft_s: np.ndarray  # [R]
    tpot_s: np.ndarray  # [R] (nan for single-token requests)
    finished: np.ndarray  # [R] bool
    wall_s: float
    migrations: int
    migrated_bytes: int
    recomputed: int
    compiles: int  # XLA compilations during the run, in any thread (0 when the warm-up covered every shape)
    compile_s: float  # their seconds
    requests: list = dataclasses.field(default_factory=list, repr=False)  # the finished `Request`s
    compile_spans: list = dataclasses.field(default_factory=list, repr=False)  # `CompileWatch.spans`

    def summary(self, window: tuple[float, float] = (0.0, 1.0), *, ttft_slo_s: float | None = None,
                tpot_slo_s: float | None = None) -> dict[str, Any]:
        R = len(self.finished)
        sel = np.zeros(R, bool)
        sel[int(window[0] * R):max(int(window[1] * R), int(window[0] * R) + 1)] = True
        tpot = self.tpot_s[sel & ~np.isnan(self.tpot_s)]
        ttft = self.ttft_s[sel & ~np.isnan(self.ttft_s)]
        pct = (lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan"))
        out = {"policy": self.policy, "requests": int(sel.sum()), "finished": int(self.finished[sel].sum()),
               "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99), "ttft_p50_s": pct(ttft, 50),
               "ttft_p99_s": pct(ttft, 99), "migrations": self.migrations, "migrated_bytes": self.migrated_bytes,
               "recomputed": self.recomputed, "compiles_during_run": self.compiles,
               "compile_s_during_run": self.compile_s, "wall_s": self.wall_s}
        if ttft_slo_s is not None and tpot_slo_s is not None:
            ok = self.finished & (self.ttft_s <= ttft_slo_s) & np.where(np.isnan(self.tpot_s), True,
                                                                        self.tpot_s <= tpot_slo_s)
            out["slo_attainment"] = float(ok[sel].mean())
        return out


def replay(cluster, pool: Sequence[ReplayRequest], trace, *, policy_name: str = "", temperature: float = 0.7,
           top_k: int = 0, timeout_s: float = 3600.0) -> RealRun:
    """Run `trace` (arrival times and pool entries) on `cluster` with its instances on their own
    threads; returns the measured per-request metrics. The cluster is started and shut down here."""
    from jaxsys.sampling import SamplingParams

    R = len(trace)
    done = threading.Semaphore(0)
    reqs = [None] * R
    mig0, bytes0, rec0 = len(cluster.migrations), sum(m.bytes for m in cluster.migrations), cluster.recomputed

    def on_output(out) -> None:
        if out.finished:
            done.release()

    for inst in cluster.instances:  # a cold start: no prompt of an earlier run cached
        with inst.locked():
            radix = inst.scheduler.radix
            radix.evict(radix.evictable_pages())
    with CompileWatch() as watch:
        cluster.start()
        try:
            t0 = time.perf_counter()
            for i in range(R):
                wait = t0 + float(trace.arrival_s[i]) - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                e = pool[int(trace.entry[i])]
                sp = SamplingParams(max_tokens=max(int(e.output_len), 1), temperature=temperature, top_k=top_k,
                                    seed=e.seed or i + 1, ignore_eos=True)
                reqs[i] = cluster.submit(list(e.prompt_ids), sp, on_output)
            deadline = time.perf_counter() + timeout_s
            for _ in range(R):
                if not done.acquire(timeout=max(deadline - time.perf_counter(), 0.0)):
                    raise TimeoutError(f"the real run did not finish within {timeout_s} s")
            wall = time.perf_counter() - t0
        finally:
            cluster.shutdown()
    ttft = np.array([(r.first_token_time - r.arrival) if r.first_token_time else np.nan for r in reqs])
    tpot = np.array([float(np.mean(r.token_intervals)) if r.token_intervals else np.nan for r in reqs])
    finished = np.array([r.finish_reason in ("length", "stop") for r in reqs])
    return RealRun(policy=policy_name or cluster.policy_name, ttft_s=ttft, tpot_s=tpot, finished=finished,
                   wall_s=wall, migrations=len(cluster.migrations) - mig0,
                   migrated_bytes=sum(m.bytes for m in cluster.migrations) - bytes0,
                   recomputed=cluster.recomputed - rec0, compiles=watch.count, compile_s=watch.seconds,
                   requests=reqs, compile_spans=list(watch.spans))


# ---------------------------------------------------------------------------------------------
# the simulator's parameters from the instances' own steps


def fit_cluster_hardware(records, instance, *, kv_bytes_per_token: int, migrations=(),
                         host_slowdown: Sequence[float] | None = None, compile_spans=(),
                         name: str = "cluster-calibrated", ttft_slo_s: float | None = None,
                         tpot_slo_s: float | None = None):
    """`HardwareParams` for the simulator from the instances' own steps (`router.StepRecord`s of a
    calibration run): the decode-step model t = a + b B + c K on the cycles of the pure decode
    steps, the prefill model on the cycles of the steps that prefilled (less their decode part,
    priced by the step model). With `host_slowdown` (`measure_host_sharing`: the instances share
    one host), each cycle is first divided by the slowdown of the instances busy when it started,
    so the fitted costs are an instance's alone, and the parameters carry the slowdown for the
    simulator. Steps that compiled, or overlap a compilation anywhere in the process
    (`compile_spans`, e.g. `RealRun.compile_spans`), are left out. Capacity and batch limit come
    from `instance`, the link bandwidth from the measured migrations (if any). SLOs default to the
    `cpu_calibrated` rules (TPOT 2x the step at a half-full batch over 600-token requests, TTFT 5x
    a 512-token prefill), priced with every instance busy."""
    from jaxsys.serve.cluster.hardware import HardwareParams, fit_linear, step_features

    slowdown = list(host_slowdown) if host_slowdown is not None else None

    def factor(busy: int) -> float:
        return 1.0 if slowdown is None or busy <= 1 else slowdown[min(busy, len(slowdown)) - 1]

    def cycle(r) -> float:  # a step after an idle spell has no host work before it to price
        return (r.cycle_s if r.cycle_s is not None else r.step_s) / factor(r.busy)

    def compiled(r) -> bool:
        start = r.end_s - (r.cycle_s if r.cycle_s is not None else r.step_s)
        return r.compiles > 0 or any(s < r.end_s and e > start for s, e, _ in compile_spans)

    steps = [r for r in records if not compiled(r)]
    dec = [r for r in steps if r.batch > 0 and r.prefill_tokens == 0]
    if len(dec) < 3:
        raise ValueError(f"the calibration run has {len(dec)} pure decode steps; it needs at least 3")
    step_fit = fit_linear(step_features([r.batch for r in dec], [r.kv_tokens for r in dec]), [cycle(r) for r in dec])
    a, b, c = step_fit.coef
    pre = [r for r in steps if r.prefill_tokens > 0]
    pre_s = np.array([cycle(r) - ((a + b * r.batch + c * r.kv_tokens) if r.batch else 0.0) for r in pre])
    keep = pre_s > 0
    if keep.sum() < 2:
        raise ValueError(f"the calibration run has {int(keep.sum())} usable prefill steps; it needs at least 2")
    pre_X = np.stack([np.ones(int(keep.sum())), [r.prefill_tokens for r, k in zip(pre, keep) if k]], axis=1)
    prefill_fit = fit_linear(pre_X, pre_s[keep])
    p0, p1 = prefill_fit.coef
    cfg = instance.engine.config
    moved = [m for m in migrations if m.seconds > 0]
    link = sum(m.bytes for m in moved) / sum(m.seconds for m in moved) if moved else 5e9
    half = cfg.max_decode_batch // 2
    everyone = factor(len(slowdown)) if slowdown is not None else 1.0
    sharing = (f"; cycles divided by the measured slowdown of the instances busy at each step "
               f"({', '.join(f'{s:.2f}' for s in slowdown)} for 1..{len(slowdown)} busy), which the simulator "
               "applies back" if slowdown is not None else "")
    return HardwareParams(
        name=name, calibrated_on=(f"the real cluster's own step cycles ({len(dec)} decode, {int(keep.sum())} prefill) "
                                  f"under a calibration trace, {len(instance.devices)} devices per instance{sharing}"),
        step_a=a, step_b=b, step_c=c, prefill_p0=p0, prefill_p1=p1,
        kv_capacity_tokens=(cfg.num_pages - 1) * cfg.page_size, page_size=cfg.page_size,
        max_batch=cfg.max_decode_batch, kv_bytes_per_token=kv_bytes_per_token, link_bytes_per_s=link,
        migration_latency_s=float(np.median([m.seconds for m in moved])) if moved else 5e-3,
        ttft_slo_s=ttft_slo_s or 5.0 * everyone * (p0 + p1 * 512),
        tpot_slo_s=tpot_slo_s or 2.0 * everyone * (a + b * half + c * half * 600),
        step_fit=step_fit.to_dict(), prefill_fit=prefill_fit.to_dict(), host_slowdown=slowdown)


def compare_with_real_run(simulated, measured_tpot_s: np.ndarray) -> dict[str, Any]:
    """Per-request TPOT of a simulated run vs the real run of the same trace (requests aligned by
    index; requests with one token, or unfinished in either run, are left out)."""
    sim = np.asarray(simulated.tpot_s, np.float64)
    real = np.asarray(measured_tpot_s, np.float64)
    if sim.shape != real.shape:
        raise ValueError(f"the simulated run has {sim.shape[0]} requests, the measured run {real.shape[0]}")
    ok = ~np.isnan(sim) & ~np.isnan(real)
    if not ok.any():
        raise ValueError("no request has a TPOT in both runs")
    sim_p50, real_p50 = float(np.median(sim[ok])), float(np.median(real[ok]))
    err = abs(sim_p50 - real_p50) / real_p50
    return {"requests": int(ok.sum()), "sim_tpot_p50_s": sim_p50, "real_tpot_p50_s": real_p50,
            "p50_rel_error": err, "within_tolerance": bool(err <= TPOT_P50_TOLERANCE),
            "per_request_median_rel_error": float(np.median(np.abs(sim[ok] - real[ok]) / real[ok]))}
