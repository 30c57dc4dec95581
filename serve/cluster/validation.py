"""Where the simulator meets a real run: simulated vs measured per-request TPOT.

The issue's check: on the real 4-instance setup (issue 18 part D: engine instances on sub-meshes
with KV-page migration behind a router), replay the same arrival trace through the simulator with
the CPU-calibrated parameters and compare per-request TPOT at p50 (within 15%). Part D does not
exist yet, so the real side of the comparison is an input here: `compare_with_real_run` takes the
measured per-request TPOTs of the requests of a trace, the simulated `SimResult` of the same trace,
and reports the error. `validate_against_real_cluster` is the hook the real run calls.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["TPOT_P50_TOLERANCE", "compare_with_real_run", "validate_against_real_cluster"]

TPOT_P50_TOLERANCE = 0.15


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


def validate_against_real_cluster(run_real: Callable[..., np.ndarray], workload, trace, hardware, policy_name: str,
                                  num_instances: int = 4) -> dict[str, Any]:
    """Run `trace` on the real cluster (`run_real(workload, trace, policy_name, num_instances)`
    returns measured per-request TPOTs, part D) and in the simulator, colocated prefill as the real
    instances do, and compare."""
    from jaxsys.serve.cluster.policies import make_policy
    from jaxsys.serve.cluster.sim import SimConfig, simulate

    measured = run_real(workload, trace, policy_name, num_instances)
    sim = simulate(workload, trace, hardware, make_policy(policy_name), SimConfig(num_instances, prefill="colocated"))
    return {"policy": policy_name, "instances": num_instances, "hardware": hardware.name,
            **compare_with_real_run(sim, measured)}
