"""ARES/STAR: remaining-length predictors on our own model's hidden states, and simulated decode rescheduling across instances.

Four parts, one record (`benchmarks/results/cluster.json`):

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

4. Real cluster (MEASURED): N engine instances of our model on sub-meshes of the CPU devices
   (default 4 x 2 of 8 virtual devices; `jaxsys.serve.cluster`), each running the dev-chosen
   length head every 8 decode steps, behind the router with live KV migration. Requests replay
   test-split generations (their real prompts, each generating its recorded number of tokens,
   capped by --real-max-tokens). The instances share this host's cores, and any compilation while
   a trace runs stalls all of them, so (`jaxsys.serve.cluster.validation`): every shape bucket the
   replays can reach is compiled first (and every compilation in a timed run is counted; a run
   that compiled is replayed); the slowdown of a decode step while k = 1..N instances step at once
   is measured; a calibration trace (its own Poisson arrivals over ~10 s) fits the simulator's
   step model to the instances' own step cycles, each divided by the slowdown of the instances
   busy at that step, and the simulator applies the slowdown back. Then one Poisson trace at
   --real-load of the fitted nominal capacity runs under every policy, and the same trace is
   simulated with the fitted parameters (colocated prefill; also without the sharing term):
   measured p50/p99 TPOT and TTFT, SLO attainment at that one rate, migrations; simulated vs
   measured TPOT at p50 per policy (the simulator's validation). `--real-only` runs this part
   alone (with `--length-head`, a head saved by `python -m jaxsys.serve.length.cli train`, it
   trains no predictor and the record has no predictor table).

Targets: predictor MAE <= 0.6x the prompt-only predictor's with <= 0.1x its parameters; simulated,
vs the better of round-robin and least-KV on the same trace: p99 TPOT <= 0.5x and goodput >= 1.5x
(geometric means over the configurations); ours beats Llumnix-style on both; the simulator within
15% of the real cluster's p50 TPOT under every policy it replays (round-robin, least-KV,
Llumnix-style; ours needs the prediction tables of the length data, which the real pool's
requests have only for their recorded samples, so it is measured but not simulated here).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import LOADAVG_AT_IMPORT, target, write_results  # noqa: E402

from jaxsys.serve.cluster.sweep import WINDOW, SweepConfig, nominal_rate, summarize, sweep  # noqa: E402  (no jax)

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
    p.add_argument("--skip-sim", action="store_true", help="skip the calibration and the simulated sweep")
    p.add_argument("--skip-real", action="store_true", help="skip the real-cluster run and the validation")
    p.add_argument("--real-only", action="store_true",
                   help="only the real-cluster run and the validation (and the predictor table, unless --length-head)")
    p.add_argument("--length-head", type=Path, default=None,
                   help="with --real-only: the length head the instances run (a predictor.npz saved by "
                        "`python -m jaxsys.serve.length.cli train`) instead of training the predictors here")
    p.add_argument("--real-instances", type=int, default=4)
    p.add_argument("--devices-per-instance", type=int, default=2)
    p.add_argument("--real-requests", type=int, default=48, help="requests of the measured trace")
    p.add_argument("--real-calibration-requests", type=int, default=32)
    p.add_argument("--real-max-tokens", type=int, default=256, help="cap on a replayed generation's length")
    p.add_argument("--real-load", type=float, default=0.8, help="fraction of the fitted nominal capacity")
    p.add_argument("--out", type=Path, default=None, help="output JSON (default benchmarks/results/cluster.json)")
    return p


def _partial(args) -> bool:
    d = build_parser().parse_args([])
    return (args.skip_sim or args.skip_real or args.real_only or args.real_requests < d.real_requests
            or args.real_calibration_requests < d.real_calibration_requests
            or args.real_max_tokens < d.real_max_tokens or args.real_instances != d.real_instances
            or args.devices_per_instance != d.devices_per_instance or args.real_load != d.real_load
            or args.calibration is not None or args.requests_per_instance < d.requests_per_instance
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


# ---------------------------------------------------------------------------------------------
# 4. the real cluster


def replay_pool(data, max_tokens: int):
    """The test-split generations as requests to replay (real prompt ids, recorded lengths capped
    at `max_tokens`), and the simulator's workload of the very same requests."""
    import numpy as np

    from jaxsys.models.loading import load_model
    from jaxsys.serve.cluster.validation import ReplayRequest
    from jaxsys.serve.cluster.workload import Workload
    from jaxsys.serve.length.data import SPLITS, load_prompts

    cfg = data.manifest["config"]
    model = load_model(cfg["model"])
    prompts = {p.key: p for p in load_prompts(cfg["prompts"], seed=cfg["prompt_seed"])}
    gens = np.nonzero(data.prompt_split[data.gen_prompt] == SPLITS.index("test"))[0]
    pool = []
    for gi in gens:
        p = prompts[data.prompt_keys[data.gen_prompt[gi]]]
        ids = model.tokenizer.encode_chat([{"role": "user", "content": p.text}])
        pool.append(ReplayRequest(tuple(ids), int(min(data.gen_len[gi], max_tokens)), seed=int(gi) + 1))
    workload = Workload(prompt_len=np.array([len(r.prompt_ids) for r in pool], np.int64),
                        output_len=np.array([r.output_len for r in pool], np.int64),
                        source=data.prompt_source[data.gen_prompt[gens]].astype(np.int64), tables={},
                        max_new_tokens=max_tokens,
                        description=f"{len(pool)} test-split generations, lengths capped at {max_tokens}")
    return model, pool, workload


def real_cluster_section(data, predictor, args):
    """Part 4 (see the module docstring). Returns (section, targets)."""
    from jaxsys.models.kv_cache import cache_bytes
    from jaxsys.serve.cluster.instances import make_instances
    from jaxsys.serve.cluster.policies import POLICIES as LIVE_POLICIES, make_policy
    from jaxsys.serve.cluster.router import Cluster
    from jaxsys.serve.cluster.sim import SimConfig, simulate
    from jaxsys.serve.cluster.validation import (TPOT_P50_TOLERANCE, compare_with_real_run, fit_cluster_hardware,
                                                 measure_host_sharing, replay, warm_up)
    from jaxsys.serve.cluster.workload import poisson_trace
    from jaxsys.serve.engine.engine import EngineConfig

    t0 = time.perf_counter()
    model, pool, workload = replay_pool(data, args.real_max_tokens)
    N = args.real_instances
    engine = EngineConfig(num_pages=1024, max_decode_batch=16, shared_attention=False)
    instances = make_instances(model, N, devices_per_instance=args.devices_per_instance, config=engine,
                               predictor=predictor, predict_every=8)
    print(f"[real cluster] {N} instances x {args.devices_per_instance} devices, {len(pool)} pool requests "
          f"(lengths capped at {args.real_max_tokens}); length head {predictor.name!r}", flush=True)
    warm = warm_up(instances, max_prompt_tokens=max(len(r.prompt_ids) for r in pool),
                   max_context_tokens=max(len(r.prompt_ids) + r.output_len for r in pool))
    print(f"  warm-up: {warm['compiles']} compilations ({warm['decode_buckets']} decode and "
          f"{warm['prefill_buckets']} prefill buckets per instance, the length head, migrations) in "
          f"{warm['seconds']:.0f} s", flush=True)
    median_prompt = sorted(pool, key=lambda r: len(r.prompt_ids))[len(pool) // 2].prompt_ids
    sharing = measure_host_sharing(instances, median_prompt, batch=engine.max_decode_batch // 2)
    print(f"  host sharing: decode-step cycle at batch {sharing['batch']} with 1..{N} instances stepping "
          + ", ".join(f"{t * 1e3:.1f}" for t in sharing["step_s"]) + " ms; slowdown "
          + ", ".join(f"{s:.2f}" for s in sharing["slowdown"]), flush=True)
    n_cal = args.real_calibration_requests
    cal_trace = poisson_trace(len(pool), n_cal / 10.0, n_cal, seed=args.seed + 7)  # over ~10 s: varied batches
    cal_cluster = Cluster(instances, "least_kv")
    cal_cluster.record_steps = True
    cal_run = replay(cal_cluster, pool, cal_trace)
    kv_bytes = cache_bytes(model.config, 1, 1)
    hw = fit_cluster_hardware(cal_cluster.step_records, instances[0], kv_bytes_per_token=kv_bytes,
                              host_slowdown=sharing["slowdown"], compile_spans=cal_run.compile_spans)
    # the same fit without the sharing term (cycles as measured, independent simulated instances):
    # what the simulator predicted before it knew that the instances share the host
    hw_independent = fit_cluster_hardware(cal_cluster.step_records, instances[0], kv_bytes_per_token=kv_bytes,
                                          compile_spans=cal_run.compile_spans, name="cluster-calibrated-independent",
                                          ttft_slo_s=hw.ttft_slo_s, tpot_slo_s=hw.tpot_slo_s)
    print(f"  calibration run {cal_run.wall_s:.1f} s ({cal_run.compiles} compilations): an instance alone "
          f"a={hw.step_a * 1e3:.2f} ms b={hw.step_b * 1e3:.3f} ms c={hw.step_c * 1e6:.3f} us/token "
          f"(MAPE {hw.step_fit['mape']:.1%}; without the sharing term {hw_independent.step_fit['mape']:.1%}); "
          f"prefill {hw.prefill_p0 * 1e3:.1f} ms + {hw.prefill_p1 * 1e6:.1f} us/token "
          f"(MAPE {hw.prefill_fit['mape']:.1%})", flush=True)
    rate = args.real_load * nominal_rate(workload, hw) * N
    trace = poisson_trace(len(pool), rate, args.real_requests, seed=args.seed + 11)
    runs, validation, passes = {}, {}, {}
    for name in LIVE_POLICIES:
        run = replay(Cluster(instances, name), pool, trace, policy_name=name)
        passes[name] = [run.compiles]
        if run.compiles:  # a shape the warm-up missed stalled the run: that pass only warmed it up
            print(f"  {name:<12} {run.compiles} compilations during the run; replaying it", flush=True)
            run = replay(Cluster(instances, name), pool, trace, policy_name=name)
            passes[name].append(run.compiles)
        runs[name] = run.summary(ttft_slo_s=hw.ttft_slo_s, tpot_slo_s=hw.tpot_slo_s)
        runs[name]["compiles_per_pass"] = passes[name]
        line = (f"  {name:<12} measured p50/p99 TPOT {runs[name]['tpot_p50_s'] * 1e3:7.1f}/"
                f"{runs[name]['tpot_p99_s'] * 1e3:7.1f} ms  TTFT p50 {runs[name]['ttft_p50_s'] * 1e3:7.1f} ms  "
                f"SLO {runs[name]['slo_attainment']:.2f}  migrations {run.migrations}  compiles {run.compiles}")
        if name != "ours":  # the simulator's "ours" replays prediction tables of the length data
            sim = simulate(workload, trace, hw, make_policy(name), SimConfig(N, prefill="colocated"))
            independent = simulate(workload, trace, hw_independent, make_policy(name),
                                   SimConfig(N, prefill="colocated"))
            validation[name] = {"simulated": sim.summary(), **compare_with_real_run(sim, run.tpot_s),
                                "without_host_sharing": compare_with_real_run(independent, run.tpot_s)}
            line += (f"  | simulated p50 TPOT {validation[name]['sim_tpot_p50_s'] * 1e3:7.1f} ms "
                     f"({validation[name]['p50_rel_error']:.1%} off; without the sharing term "
                     f"{validation[name]['without_host_sharing']['p50_rel_error']:.1%})")
        print(line, flush=True)
    section = {"instances": N, "devices_per_instance": args.devices_per_instance, "engine": dataclasses.asdict(engine),
               "pool": workload.description, "rate_per_s": rate, "load": args.real_load, "requests": len(trace),
               "warm_up": warm, "host_sharing": sharing, "calibration_run": cal_run.summary(),
               "calibration_steps_by_busy_instances": {str(k): sum(r.busy == k for r in cal_cluster.step_records)
                                                       for k in range(1, N + 1)},
               "fitted_hardware": hw.model_dump(), "fitted_hardware_without_host_sharing": hw_independent.model_dump(),
               "policies": runs, "validation": validation, "length_head": predictor.name, "predict_every": 8,
               "simulator_calibration":
                   f"the simulator of this section is calibrated on this machine's measured per-step costs with "
                   f"{N} instances sharing its {os.cpu_count()} cores: the step cycles of a separate calibration "
                   f"trace (seed {args.seed + 7}; the validated trace is seed {args.seed + 11}), each divided by "
                   f"the measured slowdown of a step with as many instances busy (`host_sharing`), fit an "
                   f"instance's cost alone, and the simulator multiplies each simulated step by the slowdown of the "
                   f"instances busy in its own run. Nothing is fitted to the validated runs. "
                   f"`without_host_sharing`: the same cycles fitted as measured, simulated as independent instances",
               "measured_note": "MEASURED on this machine; the instances share its cores; every shape bucket the "
                                "replay can reach was compiled before anything was timed (`warm_up`), and every "
                                "XLA compilation during a timed run is counted (`compiles_per_pass`: a pass that "
                                "compiled is replayed); SLO attainment is at this one rate (goodput needs the "
                                "simulated rate sweep). Every request "
                                "generates its recorded length (EOS ignored) with a fresh sample, so every "
                                "policy does the same work; the length head predicts the remaining length of "
                                "the continuation it sees, which is forced to another sample's length, so "
                                "ours has weaker predictions here than in serving or in the simulator",
               "seconds": time.perf_counter() - t0}
    worst = max(validation, key=lambda n: validation[n]["p50_rel_error"])
    targets = [target(f"sim_vs_real_tpot_p50_rel_error (worst of {', '.join(validation)}: {worst}; "
                      f"{N}-instance real run)", validation[worst]["p50_rel_error"], TPOT_P50_TOLERANCE,
                      higher_is_better=False)]
    return section, targets


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.real_only and args.skip_real:
        print("jaxsys bench cluster: --real-only and --skip-real exclude each other", file=sys.stderr)
        return 2
    if args.length_head is not None and not args.real_only:
        print("jaxsys bench cluster: --length-head goes with --real-only (a full run trains the heads it reports)",
              file=sys.stderr)
        return 2
    args.skip_sim = args.skip_sim or args.real_only
    if args.out is None and _partial(args):
        print("jaxsys bench cluster: a partial run (smaller sweep or real run, --skip-sim, --skip-real or "
              "--calibration) must not write into "
              "benchmarks/results; pass --out", file=sys.stderr)
        return 2
    if not args.skip_real:
        from jaxsys.runtime import DEVICE_COUNT_FLAG, request_cpu_devices

        if DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
            request_cpu_devices(args.real_instances * args.devices_per_instance)
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
    header = {"window": WINDOW, "prefill": args.prefill,
              "simulated_note": "every figure under `simulation` is SIMULATED (SimPy), not measured"}
    if args.length_head is not None:
        from jaxsys.serve.length.data import load_length_data
        from jaxsys.serve.length.predictor import LengthPredictor

        try:
            head = LengthPredictor.load(args.length_head)
        except (OSError, KeyError, ValueError) as e:
            print(f"jaxsys bench cluster: cannot read the length head {args.length_head}: {e}", file=sys.stderr)
            return 2
        data, targets = load_length_data(run), []
        header["predictors"] = f"not trained in this run; the real cluster runs the head {args.length_head}"
    else:
        data, report, ours, prompt, header["predictors"], targets = predictors_section(run)
        head = report.predictors[ours]
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
    if not args.skip_real:
        real, real_targets = real_cluster_section(data, head, args)
        header["real_cluster"] = real
        targets += real_targets
    header["seconds"] = time.perf_counter() - t_start
    for t in targets:
        print(f"  target {t['name']}: {t['value']:.3f} ({t['direction']} {t['target']}) "
              f"{'met' if t['met'] else 'NOT met'}", flush=True)
    write_results("cluster", records, args.out, targets=targets, loadavg_start=LOADAVG_AT_IMPORT, **header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
