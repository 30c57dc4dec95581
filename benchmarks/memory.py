"""Activation memory planner (Chameleon): ours vs full remat, dots_saveable and offload-everything at 1/2, 1/3, 1/4 of the keep-all peak; re-planning cost on changing programs.

Sections (all run by default; each is one part of benchmarks/results/memory.json + memory.png):

policies   The decoder's training step (Adam) on this machine's first device. Budgets are 1/2, 1/3
           and 1/4 of the keep-all peak (the step without any checkpoint). Variants: ours (the
           planner: keep / recompute / offload per named residual), ours without offload, full
           remat (`nothing_saveable` per layer), `dots_saveable` and
           `dots_with_no_batch_dims_saveable` per layer, offload-everything (every named residual
           to pinned_host), keep-all (reference). All compiled ahead of time in this process, warmed
           up, timed round-robin; medians over --repeats.
           Step time is MEASURED. On CPU, XLA does not lower host offloading (the transfers are
           dropped, see tests/test_memory_liveness.py), so a plan that offloads runs here as if it
           kept the residuals: its step time is the measured one plus the MODELLED transfer time
           that compute cannot hide (the planner's model at the link rate measured by
           `Hardware.calibrate()`); records give both parts. Peak memory is MODELLED: our liveness
           analysis of each traced program (`peak_bytes`), with XLA's memory_analysis() beside it
           (on CPU it reflects remat but not offload). Each record has the step's minor page faults
           (`page_faults_per_step`): on CPU XLA allocates a step's temporaries afresh and glibc maps
           blocks over 32 MiB anew, so every step faults in its whole peak; with the zero-fill of
           each stacked residual buffer before the forward scan, keeping a byte costs about as much
           as recomputing it there, which the planner's measured keep cost reflects.
           Targets: at each budget ours >= 1.25x faster than full remat, and never slower than the
           fastest fixed policy whose modelled peak fits the budget.

dynamic    A training run whose program changes every --segment steps: sequence-length buckets
           128/256/512/1024 drawn at random, and an elastic device loss mid-run (--devices, default
           8, lose one before step --fail-at, default half the run). One fixed budget per device
           (bytes), sized for the survivors. The online planner (`MemoryPlanner`) profiles each new
           program incrementally and re-plans; a program seen before costs a lookup; after the
           device loss every program is re-planned for the new device count from the profiles
           already made (`set_shards`, no profiling). Baseline: a full profile of the same program
           from scratch (trace, analysis, the layer body compiled and timed), measured here for
           every bucket. Records: per change the re-planning cost vs the full profile, per step the
           modelled peak per device vs the budget, and the profiling cost of the whole run against
           profiling every step.
           The device count is MODELLED: the per-device peak is the global program's liveness split
           over the devices (a fully sharded step: FSDP + data parallel, the same global batch on
           any count); the steps themselves run on this machine's first device.
           Targets: re-planning a changed program <= 20% of a full profile (total over the run's
           bucket changes after the first program); re-planning after the device loss <= 20% of a
           full profile (total over the programs re-planned); no step's modelled peak above the
           budget.

gpu        (--gpu; needs a GPU) One subprocess per plan, so each reads its own device peak: XLA's
           memory_analysis() and the device's peak_bytes_in_use counter per plan, and a training run
           of a model whose keep-all peak is >= 4x the budget, trained within it. Writes
           memory_gpu.json. On CPU it runs as a smoke test (--gpu --small) with no device counter.

Smaller runs (--small, --budgets, --repeats, --steps) are partial records: they must be written
elsewhere (--out DIR), so benchmarks/results/ only ever holds complete runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# each GPU plan runs in its own process and reads its own peak: no process may grab the memory up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from _common import RESULTS, target, write_results  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxsys.models import decoder  # noqa: E402
from jaxsys.models.config import ModelConfig  # noqa: E402
from jaxsys.train.memory import (Hardware, InfeasibleBudgetError, MemoryPlanner, Profiler, Remat,  # noqa: E402
                                 plan, traced_peak_bytes)
from jaxsys.train.memory.steps import init_opt_state, lm_train_step  # noqa: E402

P = jax.checkpoint_policies
BUDGET_FRACTIONS = (2, 3, 4)  # 1/2, 1/3, 1/4 of the keep-all peak
BUCKETS = (128, 256, 512, 1024)

# policies: 12 layers, activations dominate the step's memory (the keep-all peak is ~8x the
# parameters, gradients and Adam state together), a few seconds per step on 2 CPU cores.
POLICY_MODEL = dict(vocab_size=512, hidden_size=128, intermediate_size=512, num_layers=12,
                    num_heads=4, num_kv_heads=2, head_dim=32)
POLICY_BATCH, POLICY_SEQ = 8, 256
DYNAMIC_MODEL = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
                     num_heads=4, num_kv_heads=2, head_dim=32)
DYNAMIC_BATCH = 2
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_layers=4, num_heads=4,
             num_kv_heads=2, head_dim=16)
# gpu: ~0.4B parameters in bfloat16; keep-all ~4x the default budget (see section_gpu)
GPU_MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_layers=16,
                 num_heads=16, num_kv_heads=8, head_dim=64, dtype="bfloat16")
GPU_BATCH, GPU_SEQ = 8, 1024


def _tokens(cfg: ModelConfig, batch: int, seq: int, seed: int = 0):
    return jax.random.randint(jax.random.key(seed), (batch, seq + 1), 0, cfg.vocab_size)


def _names_policy(keep=(), offload=()):
    if not offload:
        return P.save_only_these_names(*keep)
    return P.save_and_offload_only_these_names(names_which_can_be_saved=list(keep),
                                               names_which_can_be_offloaded=list(offload),
                                               offload_src="device", offload_dst="pinned_host")


def _xla_bytes(compiled) -> int | None:
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes)


def _round_robin(fns: dict, args, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Each compiled step run once to warm up, then `repeats` rounds over all of them in turn:
    (seconds, minor page faults of this process) per step."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times = {k: [] for k in fns}
    faults = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t0)
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return times, faults


# --------------------------------------------------------------------------- policies
def section_policies(args, hw: Hardware) -> tuple[list, list, dict]:
    model = SMALL if args.small else POLICY_MODEL
    batch, seq = (4, 64) if args.small else (POLICY_BATCH, POLICY_SEQ)
    cfg = ModelConfig(**model)
    params = decoder.init_params(cfg, jax.random.key(0))
    opt = init_opt_state(params)
    tokens = _tokens(cfg, batch, seq)
    step = lm_train_step(cfg)
    step_args = (params, opt, tokens)

    t0 = time.perf_counter()
    prof = Profiler(hw, measure_repeats=5).profile(step, *step_args)
    profile_s = time.perf_counter() - t0
    keep_all = prof.keep_all_peak_bytes
    names = prof.names
    print(f"policies: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {batch}x{seq} tokens; "
          f"keep-all peak {keep_all / 2**20:.1f} MiB; profile {profile_s:.1f} s", flush=True)

    variants: dict[str, dict] = {
        "keep-all": {"remat": Remat(None, "keep-all"), "decisions": None},
        "full remat (nothing_saveable)": {"remat": Remat(P.nothing_saveable, "nothing"),
                                          "decisions": {n: "recompute" for n in names}},
        "dots_saveable": {"remat": Remat(P.dots_saveable, "dots"), "decisions": None},
        "dots_with_no_batch_dims_saveable": {"remat": Remat(P.dots_with_no_batch_dims_saveable, "dots-nb"),
                                             "decisions": None},
        "offload everything": {"remat": Remat(_names_policy(offload=names), "offload-all"),
                               "decisions": {n: "offload" for n in names}},
    }
    fixed = [k for k in variants if k != "keep-all"]
    budgets = {}
    for k in args.budgets:
        budget = keep_all // k
        for label, allow in (("ours", True), ("ours (no offload)", False)):
            try:
                p = plan(prof, budget, allow_offload=allow)
            except InfeasibleBudgetError as e:
                print(f"  1/{k}: {label}: {e}", flush=True)
                continue
            key = f"{label} 1/{k}"
            variants[key] = {"remat": p.remat, "decisions": None if p.keep_all else p.decision, "plan": p}
            budgets.setdefault(k, {})[label] = key
            print(p.table(), flush=True)

    compiled, rows, same = {}, {}, {}
    programs: dict[tuple, str] = {}
    for name, v in variants.items():
        if "plan" in v:  # a plan equal to one already compiled is the same program: timed once
            key = ("keep-all",) if v["plan"].keep_all else v["plan"].decisions
            if key in programs:
                same[name] = programs[key]
                continue
            programs[key] = name
        fn = jax.jit(functools.partial(step, v["remat"]))
        t0 = time.perf_counter()
        c = fn.lower(*step_args).compile()
        compile_s = time.perf_counter() - t0
        compiled[name] = c
        dec = v["decisions"]
        transfer = 0.0
        predicted = None
        if dec is not None:
            predicted = prof.step_time_s(dec)
            transfer = predicted - prof.step_s - prof.recompute_s(dec)
        elif name == "keep-all" or (v.get("plan") is not None and v["plan"].keep_all):
            predicted = prof.keep_all_step_s
        rows[name] = {"variant": name, "peak_bytes": traced_peak_bytes(step, v["remat"], *step_args),
                      "xla_memory_analysis_bytes": _xla_bytes(c), "compile_s": compile_s,
                      "transfer_s_modelled": max(transfer, 0.0), "predicted_step_s": predicted,
                      "offloaded_bytes": sum(prof.residual(n).stacked_bytes for n, d in (dec or {}).items()
                                             if d == "offload")}
        if "plan" in v:
            rows[name]["plan"] = v["plan"].to_json()
            rows[name]["plan_table"] = v["plan"].table()
        print(f"  compiled {name} in {compile_s:.1f} s", flush=True)

    times, faults = _round_robin(compiled, step_args, args.repeats)
    for name, first in same.items():
        rows[name] = {**rows[first], "variant": name, "same_program_as": first,
                      "plan": variants[name]["plan"].to_json(), "plan_table": variants[name]["plan"].table()}
        times[name], faults[name] = times[first], faults[first]
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name].update(step_s_measured=med, step_s_measured_repeats=ts,
                          step_s=med + rows[name]["transfer_s_modelled"],
                          page_faults_per_step=int(statistics.median(faults[name])))
        print(f"  {name:<36} measured {med * 1e3:8.1f} ms  + modelled transfer "
              f"{rows[name]['transfer_s_modelled'] * 1e3:6.1f} ms  peak {rows[name]['peak_bytes'] / 2**20:7.1f} MiB",
              flush=True)

    targets, per_budget = [], []
    remat_s = rows["full remat (nothing_saveable)"]["step_s"]
    for k in args.budgets:
        budget = keep_all // k
        fits = {f: rows[f]["step_s"] for f in fixed if rows[f]["peak_bytes"] <= budget}
        best_fixed = min(fits, key=fits.get) if fits else None
        ours = budgets.get(k, {}).get("ours")
        rec = {"budget_fraction": f"1/{k}", "budget_bytes": budget, "fixed_policies_that_fit": sorted(fits),
               "best_fixed_policy": best_fixed, "ours": ours,
               "ours_no_offload": budgets.get(k, {}).get("ours (no offload)")}
        if ours is not None:
            rec["ours_fits"] = rows[ours]["peak_bytes"] <= budget
            rec["speedup_vs_full_remat"] = remat_s / rows[ours]["step_s"]
            targets.append(target(f"ours vs full remat at 1/{k} of the keep-all peak (step time ratio)",
                                  rec["speedup_vs_full_remat"], 1.25))
            if best_fixed is not None:
                rec["speedup_vs_best_fixed"] = fits[best_fixed] / rows[ours]["step_s"]
                targets.append(target(f"ours vs the fastest fixed policy that fits at 1/{k} ({best_fixed})",
                                      rec["speedup_vs_best_fixed"], 1.0))
        per_budget.append(rec)
    # Part D(1): our liveness peak against XLA's memory_analysis() where XLA accounts for the plan
    # (no offload: on CPU XLA drops the host transfers and keeps offloaded residuals on device).
    agreement = {name: r["peak_bytes"] / r["xla_memory_analysis_bytes"] - 1 for name, r in rows.items()
                 if r.get("xla_memory_analysis_bytes") and not r["offloaded_bytes"] and "same_program_as" not in r}
    for name, err in agreement.items():
        rows[name]["liveness_vs_xla"] = err
    header = {"model": {**model, "batch": batch, "seq_len": seq}, "keep_all_peak_bytes": keep_all,
              "liveness_vs_xla_memory_analysis": {
                  "relative_error": agreement,
                  "max_abs_relative_error": max((abs(v) for v in agreement.values()), default=None),
                  "what": "our liveness peak / XLA's (arguments + outputs + temp - aliased) - 1, per plan "
                          "without offload"},
              "profile": {"seconds": profile_s, "layer_forward_s": prof.layer_forward_s,
                          "layer_backward_s": prof.layer_backward_s, "predicted_probe_step_s": prof.step_s,
                          "residuals": [r.__dict__ | {"stacked_bytes": r.stacked_bytes} for r in prof.residuals]},
              "budgets": per_budget}
    return list(rows.values()), targets, header


# --------------------------------------------------------------------------- dynamic
def section_dynamic(args, hw: Hardware) -> tuple[list, list, dict]:
    model = SMALL if args.small else DYNAMIC_MODEL
    buckets = tuple(b // 4 for b in BUCKETS) if args.small else BUCKETS
    cfg = ModelConfig(**model)
    params = decoder.init_params(cfg, jax.random.key(0))
    opt = init_opt_state(params)
    step = lm_train_step(cfg)

    # Baseline first, each bucket from scratch (a fresh profiler, nothing reused): the cost of a
    # full profile, and the profiles that size the budget.
    full = {}
    for T in buckets:
        toks = _tokens(cfg, DYNAMIC_BATCH, T)
        t0 = time.perf_counter()
        prof = Profiler(hw, measure_repeats=3).profile(step, params, opt, toks, reuse=False)
        full[T] = {"seconds": time.perf_counter() - t0, "cost": prof.cost, "profile": prof}
        print(f"dynamic: full profile of T={T}: {full[T]['seconds']:.2f} s "
              f"(trace {prof.cost.trace_s:.2f}, analyse {prof.cost.analyse_s:.2f}, measure {prof.cost.measure_s:.2f})",
              flush=True)
    longest = full[buckets[-1]]["profile"]
    smallest = min(longest.peak_bytes({n: d for n in longest.names}) for d in ("recompute", "offload"))
    survivors = args.devices - 1
    budget = max(longest.keep_all_peak_bytes // 3, int(1.05 * smallest)) // survivors  # per device
    fail_at = args.steps // 2 if args.fail_at is None else args.fail_at

    rng = np.random.default_rng(args.seed)
    schedule = [int(rng.choice(buckets)) for _ in range(args.steps // args.segment)]
    planner = MemoryPlanner(step, budget, shards=args.devices, profiler=Profiler(hw, measure_repeats=3))
    steps, changes = [], []
    s = 0
    for seg, T in enumerate(schedule):
        for _ in range(args.segment):
            if s == fail_at:  # the elastic runtime reports a lost device before this step
                planner.set_shards(survivors)
                print(f"  step {s}: device lost, {args.devices} -> {survivors} devices", flush=True)
            toks = _tokens(cfg, DYNAMIC_BATCH, T, seed=s)
            n_events = len(planner.events)
            t0 = time.perf_counter()
            p = planner.plan_for(params, opt, toks)
            lookup_s = time.perf_counter() - t0
            if len(planner.events) > n_events:
                ev = dict(planner.events[-1])
                ev.update(step=s, seq_len=T, full_profile_s=full[T]["seconds"],
                          replan_s=ev["profile_s"] + ev["plan_s"],
                          cause="device count" if s >= fail_at and ev["reused"] == "program" else "bucket")
                ev["ratio_to_full_profile"] = ev["replan_s"] / full[T]["seconds"]
                changes.append(ev)
                print(f"  step {s}: new program T={T} on {ev['shards']} devices ({ev['reused']}, {ev['cause']}): "
                      f"re-plan {ev['replan_s']:.3f} s vs full profile {full[T]['seconds']:.2f} s", flush=True)
            fn = planner.jitted(params, opt, toks)
            t0 = time.perf_counter()
            params, opt, loss = fn(params, opt, toks)
            loss = float(loss)
            steps.append({"step": s, "seq_len": T, "devices": p.shards, "loss": loss,
                          "peak_bytes_modelled": p.peak_bytes, "budget_bytes": budget, "plan_lookup_s": lookup_s,
                          "step_s": time.perf_counter() - t0, "predicted_step_s": p.step_s,
                          "first_step_of_program": len(planner.events) > n_events,
                          "plan": "keep-all" if p.keep_all else p.decision})
            s += 1
    replanned = [c for c in changes[1:] if c["cause"] == "bucket"]
    replan_total = sum(c["replan_s"] for c in replanned)
    full_total = sum(c["full_profile_s"] for c in replanned)
    after_loss = [c for c in changes if c["cause"] == "device count"]
    every_step = sum(full[r["seq_len"]]["seconds"] for r in steps)
    ours_total = sum(c["replan_s"] for c in changes) + sum(r["plan_lookup_s"] for r in steps)
    worst = max(r["peak_bytes_modelled"] / budget for r in steps)
    targets = []
    if replanned:
        targets.append(target("re-planning a changed program / a full profile (total over the run's "
                              "changes after the first program)", replan_total / full_total, 0.20,
                              higher_is_better=False))
    if after_loss:
        targets.append(target("re-planning after the device loss / a full profile (total over the programs "
                              "re-planned)", sum(c["replan_s"] for c in after_loss)
                              / sum(c["full_profile_s"] for c in after_loss), 0.20, higher_is_better=False))
    targets.append(target("dynamic run: largest modelled step peak per device / budget", worst, 1.0,
                          higher_is_better=False))
    accuracy = {}  # predicted vs measured step time per bucket (steps after the compiling one)
    for T in sorted({r["seq_len"] for r in steps}):
        run = [r["step_s"] for r in steps if r["seq_len"] == T and not r["first_step_of_program"]]
        if run:
            pred = next(r["predicted_step_s"] for r in steps if r["seq_len"] == T)
            reused = next(c["reused"] for c in changes if c["seq_len"] == T)
            accuracy[str(T)] = {"measured_step_s": statistics.median(run), "predicted_step_s": pred,
                                "error": pred / statistics.median(run) - 1, "profile": reused}
    header = {"model": {**model, "batch": DYNAMIC_BATCH}, "buckets": list(buckets), "schedule": schedule,
              "devices": {"before": args.devices, "after": survivors, "lost_before_step": fail_at,
                          "modelled": "per-device peak = the global program's liveness split over the "
                                      "devices (fully sharded step); steps run on one device"},
              "step_time_prediction": accuracy,
              "segment": args.segment, "budget_bytes": budget,
              "full_profile": {str(T): {"seconds": v["seconds"], "trace_s": v["cost"].trace_s,
                                        "analyse_s": v["cost"].analyse_s, "measure_s": v["cost"].measure_s,
                                        "keep_all_peak_bytes": v["profile"].keep_all_peak_bytes}
                               for T, v in full.items()},
              "profiling_cost": {"ours_s": ours_total, "profile_every_step_s": every_step,
                                 "full_profile_per_change_s": sum(c["full_profile_s"] for c in changes)},
              "changes": changes}
    return steps, targets, header


# --------------------------------------------------------------------------- gpu
def _gpu_child(spec: dict) -> dict:
    """One plan in this process: compile, memory_analysis, run `steps` steps, the device counter."""
    cfg = ModelConfig(**spec["model"])
    params = decoder.init_params(cfg, jax.random.key(0))
    opt = init_opt_state(params)
    tokens = _tokens(cfg, spec["batch"], spec["seq"])
    step = lm_train_step(cfg)
    policy = {"keep-all": None, "nothing": P.nothing_saveable, "dots": P.dots_saveable,
              "names": _names_policy(spec.get("keep", ()), spec.get("offload", ()))}[spec["kind"]]
    fn = jax.jit(functools.partial(step, Remat(policy, spec["kind"])), donate_argnums=(0, 1))
    c = fn.lower(params, opt, tokens).compile()
    out = {"xla_memory_analysis_bytes": _xla_bytes(c), "ran": False}
    ma = c.memory_analysis()
    if ma is not None:
        out["xla_host_temp_bytes"] = int(getattr(ma, "host_temp_size_in_bytes", 0) or 0)
    if spec["steps"]:
        losses, times = [], []
        for i in range(spec["steps"]):
            t0 = time.perf_counter()
            params, opt, loss = c(params, opt, _tokens(cfg, spec["batch"], spec["seq"], seed=i))
            losses.append(float(loss))
            times.append(time.perf_counter() - t0)
        out.update(ran=True, losses=losses, step_s=statistics.median(times[1:] or times))
    stats = jax.devices()[0].memory_stats() or {}
    out["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    out["device_bytes_limit"] = stats.get("bytes_limit")
    return out


def _run_child(spec: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("CHILD "):
            return json.loads(line[6:])
    return {"error": (proc.stderr or proc.stdout)[-2000:], "returncode": proc.returncode}


def section_gpu(args, hw: Hardware) -> tuple[list, list, dict]:
    model = SMALL if args.small else GPU_MODEL
    batch, seq = (4, 64) if args.small else (GPU_BATCH, GPU_SEQ)
    cfg = ModelConfig(**model)
    params = decoder.init_params(cfg, jax.random.key(0))
    opt = init_opt_state(params)
    step = lm_train_step(cfg)
    prof = Profiler(hw, measure_repeats=3).profile(step, params, opt, _tokens(cfg, batch, seq))
    keep_all = prof.keep_all_peak_bytes
    budget = args.gpu_budget or keep_all // 4
    print(f"gpu: keep-all peak {keep_all / 2**30:.2f} GiB (modelled), budget {budget / 2**30:.2f} GiB "
          f"({keep_all / budget:.2f}x)", flush=True)
    ours = plan(prof, budget)
    print(ours.table(), flush=True)
    del params, opt
    base = {"model": model, "batch": batch, "seq": seq}
    specs = {
        "keep-all": {**base, "kind": "keep-all", "steps": 0},  # compiled only: it does not fit
        "full remat (nothing_saveable)": {**base, "kind": "nothing", "steps": args.steps},
        "dots_saveable": {**base, "kind": "dots", "steps": 0},
        "offload everything": {**base, "kind": "names", "offload": list(prof.names), "steps": args.steps},
        "ours": {**base, "kind": "keep-all" if ours.keep_all else "names", "steps": args.steps,
                 "keep": [n for n, d in ours.decision.items() if d == "keep"],
                 "offload": [n for n, d in ours.decision.items() if d == "offload"]},
    }
    rows = []
    for name, spec in specs.items():
        t0 = time.perf_counter()
        res = _run_child(spec, timeout=args.child_timeout)
        dec = None if spec["kind"] in ("nothing", "dots", "keep-all") else {
            n: ("keep" if n in spec.get("keep", ()) else "offload" if n in spec.get("offload", ()) else "recompute")
            for n in prof.names}
        modelled = (keep_all if name == "keep-all" else prof.peak_bytes(dec) if dec else None)
        if name == "full remat (nothing_saveable)":
            modelled = prof.peak_bytes({n: "recompute" for n in prof.names})
        row = {"variant": name, "peak_bytes_modelled": modelled, "budget_bytes": budget,
               "seconds": time.perf_counter() - t0, **res}
        rows.append(row)
        print(f"  {name}: {json.dumps({k: v for k, v in row.items() if k != 'losses'})}", flush=True)
    by = {r["variant"]: r for r in rows}
    targets = []
    o = by["ours"]
    if o.get("device_peak_bytes"):
        targets.append(target("ours: measured device peak / budget (keep-all >= 4x the budget)",
                              o["device_peak_bytes"] / budget, 1.0, higher_is_better=False))
        targets.append(target("keep-all modelled peak / budget", keep_all / budget, 4.0))
    if o.get("step_s") and by["full remat (nothing_saveable)"].get("step_s"):
        targets.append(target("ours vs full remat on the GPU (step time ratio)",
                              by["full remat (nothing_saveable)"]["step_s"] / o["step_s"], 1.25))
    header = {"keep_all_peak_bytes": keep_all, "budget_bytes": budget, "plan": ours.to_json(),
              "plan_table": ours.table()}
    return rows, targets, header


# --------------------------------------------------------------------------- plot and main
def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol = doc.get("policies")
    if not pol:
        return
    rows = {r["variant"]: r for r in pol["records"]}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = list(rows)
    ax1.barh(names, [rows[n]["step_s_measured"] for n in names], label="measured")
    ax1.barh(names, [rows[n]["transfer_s_modelled"] for n in names],
             left=[rows[n]["step_s_measured"] for n in names], label="modelled host transfer")
    ax1.set_xlabel("step time (s)")
    ax1.legend()
    ax2.barh(names, [rows[n]["peak_bytes"] / 2**20 for n in names], color="gray")
    for b in pol["budgets"]:
        ax2.axvline(b["budget_bytes"] / 2**20, ls="--", lw=1)
        ax2.text(b["budget_bytes"] / 2**20, -0.6, b["budget_fraction"], ha="center", fontsize=8)
    ax2.set_xlabel("modelled peak (MiB; dashed: budgets)")
    ax2.set_yticks([])
    fig.suptitle(f"memory planner, {doc['device']['device_kind']} (step time measured; memory modelled)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxsys bench memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", action="store_true", help="fixed policies vs ours at the budgets")
    ap.add_argument("--dynamic", action="store_true", help="changing programs: re-planning cost")
    ap.add_argument("--gpu", action="store_true", help="device peaks per plan and the 4x run (GPU)")
    ap.add_argument("--small", action="store_true", help="small models (a smoke test; needs --out)")
    ap.add_argument("--budgets", type=int, nargs="+", default=list(BUDGET_FRACTIONS),
                    help="budget denominators k: budgets of 1/k of the keep-all peak (default 2 3 4)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (median)")
    ap.add_argument("--steps", type=int, default=24, help="training steps of the dynamic/gpu runs")
    ap.add_argument("--segment", type=int, default=3, help="steps per bucket in the dynamic run")
    ap.add_argument("--seed", type=int, default=0, help="the dynamic run's bucket draws")
    ap.add_argument("--devices", type=int, default=8,
                    help="modelled device count of the dynamic run (one is lost mid-run; >= 2)")
    ap.add_argument("--fail-at", type=int, default=None,
                    help="the dynamic run loses a device before this step (default: half the run)")
    ap.add_argument("--gpu-budget", type=int, default=None,
                    help="bytes; default: a quarter of the modelled keep-all peak")
    ap.add_argument("--child-timeout", type=float, default=900.0, help="seconds per GPU plan")
    ap.add_argument("--out", default=None, help="output folder (required for partial runs)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.child:
        print("CHILD " + json.dumps(_gpu_child(json.loads(args.child))), flush=True)
        return
    if args.devices < 2:
        raise SystemExit("jaxsys bench memory: --devices must be >= 2 (the dynamic run loses one)")
    partial = (args.small or args.budgets != list(BUDGET_FRACTIONS) or args.repeats != 5
               or args.steps != 24 or args.segment != 3 or args.devices != 8 or args.fail_at is not None)
    if partial and args.out is None:
        raise SystemExit("jaxsys bench memory: a partial run (--small, --budgets, --repeats, --steps, "
                         "--segment, --devices, --fail-at) must be written elsewhere: pass --out DIR")
    out_dir = Path(args.out) if args.out else RESULTS
    hw = Hardware.calibrate()
    print(f"hardware (measured): {hw}", flush=True)
    if args.gpu:
        rows, targets, header = section_gpu(args, hw)
        write_results("memory_gpu", rows, out_dir / "memory_gpu.json", targets=targets,
                      hardware=hw.to_json(), partial=partial, **header)
        return
    run_all = not (args.policies or args.dynamic)
    doc_sections, targets, records = {}, [], []
    if args.policies or run_all:
        rows, t, header = section_policies(args, hw)
        doc_sections["policies"] = {**header, "records": rows}
        targets += t
        records += [{"section": "policies", **r} for r in rows]
    if args.dynamic or run_all:
        rows, t, header = section_dynamic(args, hw)
        doc_sections["dynamic"] = {**header, "records": rows}
        targets += t
        records += [{"section": "dynamic", **r} for r in rows]
    path = write_results("memory", records, out_dir / "memory.json", targets=targets, hardware=hw.to_json(),
                         partial=partial, modelled="peak bytes (our liveness of the traced program); "
                         "host-transfer time of offloaded residuals on CPU",
                         measured="step times, layer-body times, profiling and re-planning costs",
                         **{k: {kk: vv for kk, vv in v.items() if kk != "records"} for k, v in doc_sections.items()})
    doc = json.loads(path.read_text())
    doc["policies"] = doc_sections.get("policies")
    plot(doc, path.with_suffix(".png"))
    for t in targets:
        print(f"  target {t['name']}: {t['value']:.3f} (target {t['direction']} {t['target']}) "
              f"{'met' if t['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
