"""Where the simulator meets the real cluster: simulated vs measured per-request TPOT.

The issue's check: on the real 4-instance setup (`router.Cluster` over `instances.make_instances`:
engine instances on sub-meshes with KV-page migration), replay an arrival trace, replay the same
trace through the simulator, and compare per-request TPOT at p50 (within 15%).

- `replay(cluster, requests, trace)`: the requests arrive at the trace's times (the cluster's
  instances step on their own threads), each generates exactly its recorded number of tokens
  (EOS ignored), and per-request TTFT and TPOT (the mean time between its tokens, the
  simulator's definition) are measured, with migrations and any compilation during the run.
  Every replay starts with empty prefix caches (the simulator has none, and a policy replayed
  after another must not find the other's prompts cached).
- `fit_cluster_hardware(records, ...)`: the simulator's step-time model fitted to the instances'
  own steps (`router.StepRecord`) under a *calibration* trace run on the same cluster. What is
  fitted is a step's *cycle*: from the end of the instance's previous step to the end of this
  one, so the host work between steps (the loop, waits for the instance's lock, admission) is
  priced, as it is in every measured time between two tokens; steps that compiled are left out.
  The instances share this host's cores, so a step costs what it costs with the others running,
  which a single-engine calibration would not see. The validation trace is another trace.
- `compare_with_real_run`: the p50 error, and the per-request error, of the simulated TPOTs.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Sequence

import numpy as np

__all__ = ["RealRun", "ReplayRequest", "TPOT_P50_TOLERANCE", "compare_with_real_run", "fit_cluster_hardware",
           "replay"]

TPOT_P50_TOLERANCE = 0.15


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
    compiles: int  # executables compiled during the run (0 when the warm-up covered every shape)
    requests: list = dataclasses.field(default_factory=list, repr=False)  # the finished `Request`s

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
               "recomputed": self.recomputed, "compiles_during_run": self.compiles, "wall_s": self.wall_s}
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
    compiles0 = sum(i.engine.compile_count for i in cluster.instances)
    mig0, bytes0, rec0 = len(cluster.migrations), sum(m.bytes for m in cluster.migrations), cluster.recomputed

    def on_output(out) -> None:
        if out.finished:
            done.release()

    for inst in cluster.instances:  # a cold start: no prompt of an earlier run cached
        with inst.locked():
            radix = inst.scheduler.radix
            radix.evict(radix.evictable_pages())
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
                   recomputed=cluster.recomputed - rec0,
                   compiles=sum(i.engine.compile_count for i in cluster.instances) - compiles0, requests=reqs)


def fit_cluster_hardware(records, instance, *, kv_bytes_per_token: int, migrations=(), name: str = "cluster-calibrated",
                         ttft_slo_s: float | None = None, tpot_slo_s: float | None = None):
    """`HardwareParams` for the simulator from the instances' own steps (`router.StepRecord`s of a
    calibration run): the decode-step model t = a + b B + c K on the cycles of the pure decode
    steps, the prefill model on the cycles of the steps that prefilled (less their decode part,
    priced by the step model); steps that compiled are left out. Capacity and batch limit come
    from `instance`, the link bandwidth from the measured migrations (if any). SLOs default to the
    `cpu_calibrated` rules (TPOT 2x the step at a half-full batch over 600-token requests, TTFT 5x
    a 512-token prefill)."""
    from jaxsys.serve.cluster.hardware import HardwareParams, fit_linear, step_features

    def cycle(r) -> float:  # a step after an idle spell has no host work before it to price
        return r.cycle_s if r.cycle_s is not None else r.step_s

    steps = [r for r in records if r.compiles == 0]
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
    return HardwareParams(
        name=name, calibrated_on=(f"the real cluster's own step cycles ({len(dec)} decode, {int(keep.sum())} prefill) "
                                  f"under a calibration trace, {len(instance.devices)} devices per instance"),
        step_a=a, step_b=b, step_c=c, prefill_p0=p0, prefill_p1=p1,
        kv_capacity_tokens=(cfg.num_pages - 1) * cfg.page_size, page_size=cfg.page_size,
        max_batch=cfg.max_decode_batch, kv_bytes_per_token=kv_bytes_per_token, link_bytes_per_s=link,
        migration_latency_s=float(np.median([m.seconds for m in moved])) if moved else 5e-3,
        ttft_slo_s=ttft_slo_s or 5.0 * (p0 + p1 * 512), tpot_slo_s=tpot_slo_s or 2.0 * (a + b * half + c * half * 600),
        step_fit=step_fit.to_dict(), prefill_fit=prefill_fit.to_dict())


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
