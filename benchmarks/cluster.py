"""ARES/STAR: remaining-length predictors on our own model's hidden states, and simulated decode rescheduling across instances.

Three parts, one record (`benchmarks/results/cluster.json`):

1. Predictors (issue 18 C), on the length data generated with our model (`python -m
   jaxsys.serve.length.cli data`): ours (a small head on the decode hidden state), the prompt-only
   head (S3/mu-Serve stand-in) and the per-source statistics; test MAE in tokens overall, by tokens
   generated so far, by decode progress and by source; parameter counts. Which of our heads (the
   chosen layer's or the final-norm hidden state) and which prompt-only variant enter the targets
   and the simulation is decided on the dev split.
2. Calibration: decode-step and prefill times of our engine (`ServingLLM`) at several batch sizes
   and contexts on this machine, and the step-time model fitted to them with its error (or a
   calibration file from an earlier run, `--calibration`).
3. Simulation (SimPy; every figure here is SIMULATED; the sweep is `jaxsys.serve.cluster.sweep`): test-split generations replayed with the
   predictions each predictor made for them, Poisson arrivals, the same trace for every policy,
   over instance counts and loads, on two parameter sets: "cpu-calibrated" (part 2) and
   "h100-like" (a stated roofline of an 8B-class model on one H100). Policies: round-robin,
   least-KV, Llumnix-style (migrate on current load), ours (current + predicted load), and ours on
   the true remaining lengths (oracle, a reference only). The migrating policies get the same
   threshold grid, chosen on a separate tuning trace. Load is a fraction of a nominal per-instance
   capacity rate (`nominal_rate`). Metrics over the middle of each trace (warm-up and drain left
   out): p50/p99 TPOT and TTFT, SLO attainment, migrations, preemptions; goodput = the highest
   rate with >= 90% SLO attainment (DistServe), per instance count.

Targets: predictor MAE <= 0.6x the prompt-only predictor's with <= 0.1x its parameters; simulated,
vs the better of round-robin and least-KV on the same trace: p99 TPOT <= 0.5x and goodput >= 1.5x
(geometric means over the configurations); ours beats Llumnix-style on both. The real
4-instance run and the simulator's validation against it (simulated vs measured TPOT within 15% at
p50) need the real instances of issue 18 part D (`jaxsys.serve.cluster.validation`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import LOADAVG_AT_IMPORT, target, write_results  # noqa: E402

from jaxsys.serve.cluster.sweep import WINDOW, SweepConfig, summarize, sweep  # noqa: E402  (numpy only, no jax)

DEFAULTS = SweepConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxsys bench cluster", description=__doc__.split("\n")[0],
                                epilog="Partial runs (any size option below its default, --skip-*, or a "
                                "calibration file) must write elsewhere: pass --out.")
    p.add_argument("--length-data", type=Path, default=None,
                   help="length-data run folder (default: the latest under ~/.cache/jaxsys/length_data)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="a calibration JSON from an earlier run (default: measure the engine now)")
    p.add_argument("--calibration-out", type=Path, default=None, help="also save the calibration here")
    p.add_argument("--instances", type=int, nargs="+", default=list(DEFAULTS.instances))
    p.add_argument("--loads", type=float, nargs="+", default=list(DEFAULTS.loads),
                   help="arrival rates as fractions of the nominal per-instance capacity rate")
    p.add_argument("--requests-per-instance", type=int, default=DEFAULTS.requests_per_instance)
    p.add_argument("--max-requests", type=int, default=DEFAULTS.max_requests, help="cap on requests per simulation")
    p.add_argument("--hardware", nargs="+", default=["cpu-calibrated", "h100-like"],
                   choices=["cpu-calibrated", "h100-like"])
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULTS.thresholds),
                   help="migration-threshold grid of the migrating policies (same for both)")
    p.add_argument("--prefill", default="disaggregated", choices=["disaggregated", "colocated"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes running the simulations (the results do not depend on it; default: one per core)")
    p.add_argument("--skip-sim", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="output JSON (default benchmarks/results/cluster.json)")
    return p


def _partial(args) -> bool:
    d = build_parser().parse_args([])
    return (args.skip_sim or args.calibration is not None or args.requests_per_instance < d.requests_per_instance
            or args.max_requests < d.max_requests or set(args.instances) != set(d.instances)
            or set(args.loads) != set(d.loads) or set(args.hardware) != set(d.hardware))


# ---------------------------------------------------------------------------------------------
# 1. predictors


def predictors_section(run: Path):
    from jaxsys.serve.length.data import load_length_data
    from jaxsys.serve.length.predictor import fit_predictors

    data = load_length_data(run)
    print(f"[predictors] {data.summary()}", flush=True)
    t0 = time.perf_counter()
    report = fit_predictors(data)
    dev = {name: min(row["dev_grid_mae"].values()) for name, row in report.rows.items() if row["kind"] == "learned"}
    ours = min(("ours_layer", "ours_final"), key=dev.get)
    prompt = min(("prompt_progress", "prompt_total"), key=dev.get)
    rows = report.rows
    for name, row in rows.items():
        t = row["test"]
        print(f"  {name:<22} test MAE {t['mae']:7.1f} tokens  params {row['params']:>9,}  by g "
              + " ".join(f"{k}:{v:.0f}" for k, v in t["by_g"].items()), flush=True)
    stats = ("source_mean", "source_median", "source_median_given_g")
    best_any = min([prompt] + list(stats), key=lambda n: rows[n]["test"]["mae"])
    section = {"run": str(run), "data": report.data_summary, "rows": rows, "chosen_on_dev": {"ours": ours,
               "prompt_only": prompt}, "seconds": time.perf_counter() - t0,
               "mae_note": "every logged step (every k=8 decode steps) of every test generation, in tokens; "
                           "predictions clipped to [0, max_new_tokens - g]"}
    mae_ratio = rows[ours]["test"]["mae"] / rows[prompt]["test"]["mae"]
    targets = [
        target("predictor_mae_ours_over_prompt_only", mae_ratio, 0.6, higher_is_better=False),
        target("predictor_params_ours_over_prompt_only", rows[ours]["params"] / rows[prompt]["params"], 0.1,
               higher_is_better=False),
    ]
    section["mae_ours_over_best_baseline"] = {"baseline": best_any,
                                              "ratio": rows[ours]["test"]["mae"] / rows[best_any]["test"]["mae"]}
    return data, report, ours, prompt, section, targets


# ---------------------------------------------------------------------------------------------
# 2. calibration


def calibration_section(path: Path | None, save: Path | None):
    from jaxsys.serve.cluster.calibrate import Calibration, cpu_calibrated, measure_engine

    if path is not None:
        cal = Calibration.load(path)
        print(f"[calibration] loaded {path} (measured on {cal.device})", flush=True)
        source = str(path)
    else:
        print("[calibration] measuring decode-step and prefill times of our engine", flush=True)
        cal = measure_engine()
        source = "measured in this run"
    if save is not None:
        cal.save(save)
    hw = cpu_calibrated(cal)
    print(f"  step model a={cal.step_fit.coef[0] * 1e3:.2f} ms  b={cal.step_fit.coef[1] * 1e3:.3f} ms/request  "
          f"c={cal.step_fit.coef[2] * 1e6:.3f} us/token; MAPE {cal.step_fit.mape:.1%}, max {cal.step_fit.max_rel_error:.1%}",
          flush=True)
    return hw, {"source": source, **cal.to_dict()}


# ---------------------------------------------------------------------------------------------
# 3. simulation (the library: jaxsys.serve.cluster.sweep)


def simulation_targets(summary: dict) -> list[dict]:
    targets = [
        target("sim_p99_tpot_ours_over_best_static (simulated, geomean)",
               summary["p99_tpot_ours_over_best_static_geomean"], 0.5, higher_is_better=False),
        target("sim_goodput_ours_over_best_static (simulated, geomean)",
               summary["goodput_ours_over_best_static_geomean"], 1.5),
        target("sim_p99_tpot_ours_over_llumnix (simulated, geomean; < 1 = ours better)",
               summary["p99_tpot_ours_over_llumnix_geomean"], 1.0, higher_is_better=False),
        target("sim_goodput_ours_over_llumnix (simulated, geomean; > 1 = ours better)",
               summary["goodput_ours_over_llumnix_geomean"], 1.0),
    ]
    # "beats" is strict: equal is not better
    targets[2]["met"] = bool(targets[2]["value"] < 1.0)
    targets[3]["met"] = bool(targets[3]["value"] > 1.0)
    return targets


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is None and _partial(args):
        print("jaxsys bench cluster: a partial run (smaller sweep, --skip-sim or --calibration) must not write into "
              "benchmarks/results; pass --out", file=sys.stderr)
        return 2
    from jaxsys.serve.cluster.hardware import h100_like
    from jaxsys.serve.cluster.workload import Workload
    from jaxsys.serve.length.data import latest_run

    try:
        cfg = SweepConfig(instances=tuple(args.instances), loads=tuple(args.loads),
                          requests_per_instance=args.requests_per_instance, max_requests=args.max_requests,
                          thresholds=tuple(args.thresholds), prefill=args.prefill, seed=args.seed)
    except ValueError as e:
        print(f"jaxsys bench cluster: {e}", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    try:
        run = args.length_data or latest_run()
    except FileNotFoundError as e:
        print(f"jaxsys bench cluster: {e}", file=sys.stderr)
        return 2
    data, report, ours, prompt, pred_section, targets = predictors_section(run)
    header = {"predictors": pred_section, "window": WINDOW, "prefill": args.prefill,
              "simulated_note": "every figure under `simulation` is SIMULATED (SimPy), not measured",
              "real_cluster": "not run: needs issue 18 part D (instances on sub-meshes with KV migration); "
                              "the validation hook is jaxsys.serve.cluster.validation"}
    records = []
    if not args.skip_sim:
        hardware = {}
        if "cpu-calibrated" in args.hardware:
            hw, cal = calibration_section(args.calibration, args.calibration_out)
            hardware["cpu-calibrated"] = hw
            header["calibration"] = cal
        if "h100-like" in args.hardware:
            hardware["h100-like"] = h100_like()
        workload = Workload.from_length_data(data, {"ours": report.predictors[ours],
                                                    "prompt_only": report.predictors[prompt]}, split="test")
        header["workload"] = {"description": workload.description, "size": workload.size,
                              "ours_predictor": ours, "prompt_only_predictor": prompt}
        records, per_hw = sweep(workload, hardware, cfg, log=lambda line: print(line, flush=True),
                                workers=max(args.workers, 1))
        sim_summary = summarize(records, per_hw)
        targets += simulation_targets(sim_summary)
        header["simulation"] = {"per_hardware": per_hw, "summary": sim_summary}
    header["seconds"] = time.perf_counter() - t_start
    for t in targets:
        print(f"  target {t['name']}: {t['value']:.3f} ({t['direction']} {t['target']}) "
              f"{'met' if t['met'] else 'NOT met'}", flush=True)
    write_results("cluster", records, args.out, targets=targets, loadavg_start=LOADAVG_AT_IMPORT, **header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
