"""The simulated sweep of `jaxsys bench cluster` (issue 18 F), as a library.

One sweep compares the dispatch and rescheduling policies on the same arrival traces, over
instance counts and loads, on one or more hardware parameter sets (every figure is SIMULATED):

- load is a fraction of `nominal_rate`, the requests per second one instance sustains when full,
  so a load of 1.0 means the same thing on every parameter set;
- the migrating policies get the same threshold grid, chosen per policy on a tuning trace of its
  own seed (`tune_thresholds`): the same budget for ours and for Llumnix-style;
- every (hardware, instances, load) cell runs every policy on one trace; metrics are over the
  middle of the trace (`WINDOW`: warm-up and drain left out);
- goodput per instance count is the highest rate with >= 90% SLO attainment (DistServe,
  `sim.goodput_rate`), interpolated over the swept loads;
- the simulations are independent, so a sweep may run them on several processes (`workers`);
  its results do not depend on how many;
- `summarize` reduces the cells to the issue's comparisons as geometric means over the
  configurations: p99 TPOT and goodput of ours vs the better static policy (round-robin or
  least-KV) and vs Llumnix-style.

    cfg = SweepConfig(instances=(4, 16), loads=(0.8, 1.2))
    records, per_hw = sweep(workload, {"h100-like": h100_like()}, cfg, log=print)
    summary = summarize(records, per_hw)

`benchmarks/cluster.py` adds the predictor table, the calibration and the JSON record around it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from jaxsys.serve.cluster.hardware import HardwareParams
from jaxsys.serve.cluster.policies import make_policy
from jaxsys.serve.cluster.sim import PREFILL_MODES, SimConfig, SimResult, goodput_rate, simulate
from jaxsys.serve.cluster.workload import Trace, Workload, poisson_trace

__all__ = ["MIGRATING", "POLICIES", "STATIC", "SweepConfig", "WINDOW", "geomean", "goodput_table", "nominal_rate",
           "run_policy", "summarize", "sweep", "tune_thresholds"]

POLICIES = ("round_robin", "least_kv", "llumnix", "ours", "ours_oracle")
STATIC = ("round_robin", "least_kv")
MIGRATING = ("llumnix", "ours", "ours_oracle")
WINDOW = (0.2, 0.9)  # arrival-index window of the measured requests

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What one sweep covers. Requests per cell: requests_per_instance x instances, capped."""

    instances: tuple[int, ...] = (4, 16, 64, 256)
    loads: tuple[float, ...] = (0.6, 0.8, 1.0, 1.2, 1.4, 1.7, 2.0)
    requests_per_instance: int = 300
    max_requests: int = 40_000
    thresholds: tuple[float, ...] = (0.05, 0.1, 0.2)
    prefill: str = "disaggregated"
    seed: int = 0

    def __post_init__(self):
        if not self.instances or min(self.instances) < 1:
            raise ValueError(f"instance counts must be >= 1, got {self.instances}")
        if not self.loads or min(self.loads) <= 0:
            raise ValueError(f"loads must be > 0, got {self.loads}")
        if self.requests_per_instance < 1 or self.max_requests < 1:
            raise ValueError("requests_per_instance and max_requests must be >= 1")
        if not self.thresholds:
            raise ValueError("the threshold grid is empty")
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {PREFILL_MODES}, got {self.prefill!r}")

    def requests(self, num_instances: int) -> int:
        return min(self.requests_per_instance * num_instances, self.max_requests)


def geomean(values: Iterable[float]) -> float:
    vals = [float(v) for v in values]
    if not vals or any(not v > 0 for v in vals):
        raise ValueError(f"geometric mean needs positive values, got {vals}")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def nominal_rate(workload: Workload, hw: HardwareParams) -> float:
    """Requests per second one instance sustains when full: the smaller of the KV-bound rate
    (capacity over the mean KV-token-seconds of a request) and the batch-bound rate (max batch
    over the mean decode time of a request), with steps priced at a full instance (on a shared host,
    `HardwareParams.host_slowdown`, with every instance of the host stepping)."""
    n = np.maximum(workload.output_len, 1).astype(np.float64)
    P = workload.prompt_len.astype(np.float64)
    ctx_mean = float(np.mean(n * (P + n / 2)) / np.mean(n))
    batch_full = min(hw.max_batch, hw.kv_capacity_tokens / ctx_mean)
    t_full = float(hw.step_time(batch_full, batch_full * ctx_mean))
    t_full *= hw.sharing_factor(len(hw.host_slowdown or [1.0]))
    kv_rate = hw.kv_capacity_tokens / (float(np.mean((n - 1) * (P + n / 2))) * t_full)
    batch_rate = hw.max_batch / (float(np.mean(n - 1)) * t_full)
    return min(kv_rate, batch_rate)


def run_policy(workload: Workload, trace: Trace, hw: HardwareParams, name: str, num_instances: int, *,
               prefill: str = "disaggregated", threshold: float | None = None) -> SimResult:
    """One simulation of policy `name` (its migration threshold, if it migrates and one is given)."""
    kw = {"threshold": threshold} if threshold is not None and name in MIGRATING else {}
    return simulate(workload, trace, hw, make_policy(name, **kw), SimConfig(num_instances, prefill=prefill))


@dataclasses.dataclass(frozen=True)
class _Job:
    """One simulation of a sweep: a policy on a Poisson trace (rebuilt from its seed where it runs)."""

    workload: Workload
    hw: HardwareParams
    name: str
    num_instances: int
    rate_per_s: float
    requests: int
    seed: int
    prefill: str
    threshold: float | None

    @property
    def size(self) -> int:
        return self.requests


def _run_job(job: _Job) -> dict:
    t0 = time.perf_counter()
    trace = poisson_trace(job.workload.size, job.rate_per_s, job.requests, seed=job.seed)
    s = run_policy(job.workload, trace, job.hw, job.name, job.num_instances, prefill=job.prefill,
                   threshold=job.threshold).summary(WINDOW)
    s["wall_s"] = time.perf_counter() - t0
    s["threshold"] = job.threshold
    return s


def _run_jobs(jobs: list[_Job], workers: int) -> Iterator[dict]:
    """Every job's summary, in order; on `workers` processes when more than one (started largest
    first, so the last to finish is a small one). The results do not depend on `workers`."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_run_job, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {i: pool.submit(_run_job, jobs[i]) for i in sorted(range(len(jobs)), key=lambda i: -jobs[i].size)}
        for i in range(len(jobs)):
            yield futures[i].result()


def tune_thresholds(workload: Workload, hw: HardwareParams, cfg: SweepConfig, rate1: float, *,
                    log: Log | None = None, workers: int = 1) -> dict[str, dict]:
    """Each migrating policy's threshold: the grid value with the lowest p99 TPOT on a tuning trace
    (its own seed) at 16 instances (or the most swept, if fewer) and load 1.0. Same grid, same
    trace, for every policy. Returns {policy: {"threshold", "p99_tpot_s_by_threshold"}}."""
    N = min(16, max(cfg.instances))
    jobs = [_Job(workload, hw, name, N, rate1 * N, cfg.requests(N), cfg.seed + 1000, cfg.prefill, th)
            for name in MIGRATING for th in cfg.thresholds]
    results = iter(_run_jobs(jobs, workers))
    chosen = {}
    for name in MIGRATING:
        scores = {th: next(results)["tpot_p99_s"] for th in cfg.thresholds}
        best = min(scores, key=scores.get)
        chosen[name] = {"threshold": best, "p99_tpot_s_by_threshold": {str(k): v for k, v in scores.items()}}
        if log:
            log(f"  tuned {name}: threshold {best} (p99 TPOT by threshold: "
                + ", ".join(f"{k}: {v * 1e3:.1f} ms" for k, v in scores.items()) + ")")
    return chosen


def _cell_row(hw_name: str, num_instances: int, load: float, rate: float, requests: int,
              summaries: Mapping[str, dict]) -> dict:
    p = dict(summaries)
    best = min(STATIC, key=lambda n: p[n]["tpot_p99_s"])
    return {"hardware": hw_name, "instances": num_instances, "load": load, "rate_per_s": rate, "requests": requests,
            "policies": p, "best_static": best,
            "p99_tpot_ours_over_best_static": p["ours"]["tpot_p99_s"] / p[best]["tpot_p99_s"],
            "p99_tpot_ours_over_llumnix": p["ours"]["tpot_p99_s"] / p["llumnix"]["tpot_p99_s"]}


def goodput_table(cells: list[dict], policies: Iterable[str] = POLICIES) -> dict[int, dict[str, dict]]:
    """{instances: {policy: {"rate_per_s", "bounded_by_sweep"}}} from the cells of one hardware set."""
    out = {}
    for N in sorted({r["instances"] for r in cells}):
        rows = [r for r in cells if r["instances"] == N]
        rates = [r["rate_per_s"] for r in rows]
        out[N] = {}
        for name in policies:
            rate, bounded = goodput_rate(rates, [r["policies"][name]["slo_attainment"] for r in rows])
            out[N][name] = {"rate_per_s": rate, "bounded_by_sweep": bounded}
    return out


def sweep(workload: Workload, hardware: Mapping[str, HardwareParams], cfg: SweepConfig, *,
          log: Log | None = None, workers: int = 1) -> tuple[list[dict], dict[str, dict]]:
    """The whole sweep, on `workers` processes (the results do not depend on how many). Returns
    (records: one row per hardware x instances x load, every policy on the same trace; per_hw:
    the nominal rate, tuned thresholds and goodput table of each hardware set)."""
    records, per_hw = [], {}
    for hw_name, hw in hardware.items():
        rate1 = nominal_rate(workload, hw)
        if log:
            log(f"[simulation] {hw_name} (SIMULATED; {hw.calibrated_on}): nominal rate {rate1:.3g} req/s per instance")
        tuned = tune_thresholds(workload, hw, cfg, rate1, log=log, workers=workers)
        th = {name: t["threshold"] for name, t in tuned.items()}
        grid = [(N, load) for N in cfg.instances for load in cfg.loads]
        jobs = [_Job(workload, hw, name, N, load * rate1 * N, cfg.requests(N), cfg.seed, cfg.prefill, th.get(name))
                for N, load in grid for name in POLICIES]
        results = iter(_run_jobs(jobs, workers))
        cells = []
        for N, load in grid:
            row = _cell_row(hw_name, N, load, load * rate1 * N, cfg.requests(N), {n: next(results) for n in POLICIES})
            cells.append(row)
            if log:
                p = row["policies"]
                log(f"  N={N:4d} load {load:.2f}: p99 TPOT (ms) "
                    + "  ".join(f"{n} {p[n]['tpot_p99_s'] * 1e3:.1f}" for n in POLICIES)
                    + "  | SLO " + " ".join(f"{p[n]['slo_attainment']:.2f}" for n in POLICIES)
                    + f"  | {sum(p[n]['wall_s'] for n in POLICIES):.1f} s")
        records += cells
        per_hw[hw_name] = {"hardware": hw.model_dump(), "nominal_rate_per_instance": rate1, "thresholds": th,
                           "threshold_tuning": tuned, "goodput": goodput_table(cells)}
    return records, per_hw


def summarize(records: list[dict], per_hw: Mapping[str, dict]) -> dict:
    """The issue's simulated comparisons, geometric means over the configurations: p99 TPOT ratios
    over every (hardware, instances, load) cell; goodput ratios over every (hardware, instances)
    whose goodputs are all positive (the others are listed as skipped: even the lowest swept load
    misses the SLO there, so the sweep says nothing about their ratio)."""
    def ratios(key):
        return [r[key] for r in records if math.isfinite(r[key]) and r[key] > 0]

    g_static, g_llumnix, skipped = [], [], []
    for hw_name, h in per_hw.items():
        for N, g in h["goodput"].items():
            best = max(g[n]["rate_per_s"] for n in STATIC)
            ours = g["ours"]["rate_per_s"]
            if best > 0 and g["llumnix"]["rate_per_s"] > 0 and ours > 0:
                g_static.append(ours / best)
                g_llumnix.append(ours / g["llumnix"]["rate_per_s"])
            else:
                skipped.append(f"{hw_name} N={N}")
    nan = float("nan")
    p_static, p_llumnix = ratios("p99_tpot_ours_over_best_static"), ratios("p99_tpot_ours_over_llumnix")
    return {"p99_tpot_ours_over_best_static_geomean": geomean(p_static) if p_static else nan,
            "p99_tpot_ours_over_llumnix_geomean": geomean(p_llumnix) if p_llumnix else nan,
            "goodput_ours_over_best_static_geomean": geomean(g_static) if g_static else nan,
            "goodput_ours_over_llumnix_geomean": geomean(g_llumnix) if g_llumnix else nan,
            "goodput_configs_skipped": skipped}
