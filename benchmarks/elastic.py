"""Elastic recovery: time to recover (detect, re-plan, transfer, compile, first step) and steps lost, ours vs Orbax restore vs process restart.

Four ways to continue after device 3 (then 5, then 1) of 8 is lost mid-run, all measured in this
run on the same model, medians over repeats:

1. ours, precompiled: in-memory snapshot (ring replicas), planned device-to-device transfers, the
   survivors' executable compiled ahead of time in the background (waited for before each
   failure, as after hours of training) and retargeted to the actual survivors;
2. ours, recompiling: the same, but the executables are compiled at recovery time;
3. Orbax: restore the last checkpoint (every `--ckpt-every` steps, failure half-way between two)
   from local disk onto the survivors' mesh, recompile, re-run the lost steps;
4. full restart: a new Python process imports, restores the checkpoint, compiles, runs a step.

Also: the per-step cost of the snapshot (replica copy + checksums + verification) as a
percentage of the step time, the cost of the layout-invariant step against the GSPMD step, and
the failure-detection latency of a real two-process `jax.distributed` job.

Writes benchmarks/results/elastic.json and elastic.png. On CPU the 8 devices are virtual and share
the machine's cores, so step times before and after a membership change are not a meaningful
throughput ratio here; that comparison needs a GPU pod (or a simulator).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

NUM_DEVICES = 8
if "jax" not in sys.modules:
    _flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
              if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(_flags + [f"--xla_force_host_platform_device_count={NUM_DEVICES}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

# The benchmark model: ~0.65M parameters, 2048 tokens per step (32 x 64) in 16 micro-batches.
MODEL = ["model.vocab_size=1024", "model.hidden_size=128", "model.intermediate_size=384",
         "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=32",
         "data.seq_len=64", "data.global_batch=32", "data.micro_batches=16", "progress=false"]
FAIL_DEVICES = (3, 5, 1, 6, 2)


def _median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def _cfg(extra):
    from jaxsys.train.config import load_config

    return load_config("tiny", MODEL + list(extra))


def _device_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"backend": jax.default_backend(), "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "cpu": cpu, "cpu_cores": os.cpu_count(),
            "jax": jax.__version__, "python": platform.python_version()}


def _schedule(period: int, repeats: int, offset: int) -> tuple[list[str], list[str], int]:
    """fail FAIL_DEVICES[i] at offset + 2*i*period, join it back `period` steps later."""
    fails, joins = [], []
    for i in range(repeats):
        d = FAIL_DEVICES[i % len(FAIL_DEVICES)]
        f = offset + 2 * i * period
        fails.append(f"{d}@{f}")
        joins.append(f"{d}@{f + period}")
    return fails, joins, offset + 2 * repeats * period


def _recoveries(tr, kind):
    return [r for r in tr.recoveries if r.kind == kind]


def _summary(method, recs, *, overhead, note, step_time=None, extra=None):
    fields = ["detection_s", "replanning_s", "transfer_s", "compile_s", "first_step_s"]
    out = {"method": method,
           "recovery_s": _median([r["recovery_s"] for r in recs]),
           # until the first step can start (every method then runs one step, on a fresh executable)
           "ready_s": _median([r["recovery_s"] - r["first_step_s"] for r in recs]),
           "lost_steps": int(_median([r["lost_steps"] for r in recs])) if recs else None,
           "snapshot_overhead_pct": overhead,
           **{f: _median([r[f] for r in recs]) for f in fields},
           "repeats": len(recs),
           "recovery_s_all": [round(r["recovery_s"], 4) for r in recs],
           "recoveries": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()
                           if k in fields + ["recovery_s", "lost_steps", "compile_how", "step",
                                             "devices_after", "elements_moved"]} for r in recs],
           "note": note}
    if step_time is not None and out["lost_steps"] is not None:
        out["recovery_plus_replay_s"] = out["recovery_s"] + out["lost_steps"] * step_time
    if extra:
        out.update(extra)
    return out


# ----------------------------------------------------------------------------- measurements
def snapshot_overhead(steps: int, log) -> dict:
    """Median step time with and without the per-step snapshot (trainers alternate step by step,
    so drifting machine load hits both arms alike), and the snapshot's programs timed alone."""
    from jaxsys.train.elastic.compile import ExecutableCache
    from jaxsys.train.elastic.runtime import ElasticTrainer
    from jaxsys.train.elastic.snapshot import take_snapshot, verify

    total = 4 + steps
    on = ElasticTrainer(_cfg([f"steps={total}", "elastic.precompile=none"]), cache=ExecutableCache(), log=log)
    off = ElasticTrainer(_cfg([f"steps={total}", "elastic.precompile=none", "elastic.snapshot=false"]),
                         cache=ExecutableCache(), log=log)
    on.run(2)
    off.run(2)
    t_on, t_off = [], []
    while on.step < 2 + steps:
        t_on += [r.step_time_s for r in on.run(on.step + 1).records]
        t_off += [r.step_time_s for r in off.run(off.step + 1).records]
    m_on, m_off = _median(t_on), _median(t_off)
    lay = on._layout(on.active)

    def timed(f, n=20):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            ts.append(time.perf_counter() - t0)
        return _median(ts)

    snap = take_snapshot(on.cache, on.step, on._count, lay, on.active_devices, on._flat, on.memory)
    t_snap = timed(lambda: take_snapshot(on.cache, on.step, on._count, lay, on.active_devices, on._flat,
                                         on.memory).replica)
    t_ver = timed(lambda: verify(on.cache, snap).ok)
    every = on.cfg.elastic.verify_every
    return {"step_time_with_snapshot_s": m_on, "step_time_without_snapshot_s": m_off,
            "snapshot_overhead_pct": 100.0 * (m_on - m_off) / m_off, "samples": len(t_on),
            "snapshot_program_s": t_snap, "verify_s": t_ver, "verify_every": every,
            # in steady state the step emits the snapshot itself (about the work of the snapshot
            # program) and every `verify_every` steps all copies are verified
            "components_pct_of_step": 100.0 * (t_snap + (t_ver / every if every else 0.0)) / m_off,
            "replica_memory": on.memory, "state_bytes": 3 * 4 * on.flat_spec.num_params}


def gspmd_vs_elastic(steps: int, log) -> dict:
    """Median step time of the GSPMD step and of the layout-invariant step (snapshot off),
    alternating step by step."""
    from jaxsys.train.elastic.compile import ExecutableCache
    from jaxsys.train.elastic.runtime import ElasticTrainer
    from jaxsys.train.trainer import Trainer

    g = Trainer(_cfg([f"steps={steps + 4}", "elastic.enabled=false", "mesh.fsdp=-1"]))
    e = ElasticTrainer(_cfg([f"steps={steps + 4}", "elastic.precompile=none", "elastic.snapshot=false"]),
                       cache=ExecutableCache(), log=log)
    g.run(2)
    e.run(2)
    tg, te = [], []
    while g.step < 2 + steps:
        tg += [r.step_time_s for r in g.run(g.step + 1).records]
        te += [r.step_time_s for r in e.run(e.step + 1).records]
    mg, me = _median(tg), _median(te)
    return {"gspmd_step_time_s": mg, "elastic_step_time_s": me,
            "layout_invariant_step_overhead_pct": 100.0 * (me - mg) / mg, "samples": len(tg)}


def ours(period: int, repeats: int, *, precompiled: bool, log) -> tuple[list[dict], float]:
    """precompiled: background compiles for every single-device loss, waited for before each
    failure. Otherwise: nothing compiled ahead; at recovery each program is compiled once (and
    retargeted within the recovery to other devices that run the same program)."""
    from jaxsys.train.elastic.compile import ExecutableCache
    from jaxsys.train.elastic.runtime import ElasticTrainer

    fails, joins, end = _schedule(period, repeats, offset=period)
    cfg = _cfg([f"steps={end}", "elastic.fail=" + ",".join(fails), "elastic.join=" + ",".join(joins),
                f"elastic.precompile={'single_loss' if precompiled else 'none'}"])
    cache = ExecutableCache()
    tr = ElasticTrainer(cfg, cache=cache, log=log)
    fail_steps = {int(f.split("@")[1]) for f in fails}

    def before_failure(s, t):
        if s + 1 in fail_steps:
            if precompiled:
                t.cache.wait()  # background compiles done, as long after the last change
            else:
                t.cache.clear()  # nothing compiled for any other device set (the current one
                #                  recompiles before the failing step, outside the recovery)

    res = tr.run(on_step=before_failure)
    step_time = _median([r.step_time_s for r in res.records if r.num_devices == NUM_DEVICES][2:])
    return [r.to_json() for r in _recoveries(tr, "fail")], step_time


def orbax(period: int, repeats: int, ckpt_every: int, ckpt_dir: Path, log) -> tuple[list[dict], dict]:
    """Snapshots off: a loss falls back to the last Orbax checkpoint (fresh compile)."""
    from jaxsys.train.elastic.compile import ExecutableCache
    from jaxsys.train.elastic.runtime import ElasticTrainer

    # failures half-way between two checkpoints: fail at 15, back at 20, fail at 25, ... (every 10)
    fails, joins, end = _schedule(ckpt_every // 2, repeats, offset=ckpt_every + ckpt_every // 2)
    cfg = _cfg([f"steps={end}", "elastic.fail=" + ",".join(fails), "elastic.join=" + ",".join(joins),
                "elastic.precompile=none", "elastic.snapshot=false", f"checkpoint.dir={ckpt_dir}",
                f"checkpoint.every={ckpt_every}", "checkpoint.keep=2"])
    tr = ElasticTrainer(cfg, cache=ExecutableCache(allow_retarget=False), log=log)
    res = tr.run()
    step_time = _median([r.step_time_s for r in res.records if r.num_devices == NUM_DEVICES][2:])
    # the checkpointing cost per step: the blocking part of an async save (state to host), over
    # the interval; the write itself continues in a background thread
    from jaxsys.train.checkpoint import CheckpointManager

    tr.ckpt.wait()
    tr.ckpt = CheckpointManager(ckpt_dir.parent / "timing", keep=2)  # keep the run's checkpoints as they are
    saves = []
    for i in range(5):
        t0 = time.perf_counter()
        tr.save(10_000 + i)
        saves.append(time.perf_counter() - t0)
        tr.ckpt.wait()
    tr.close()
    overhead = 100.0 * _median(saves[1:]) / ckpt_every / step_time
    return [r.to_json() for r in _recoveries(tr, "checkpoint")], {"step_time_s": step_time,
                                                                   "checkpoint_overhead_pct": overhead,
                                                                   "save_blocking_s": _median(saves[1:]),
                                                                   "lost_steps": ckpt_every // 2}


RESTART = textwrap.dedent("""
    import json, sys, time
    t0 = time.time()
    import jax
    from jaxsys.train.config import load_config
    from jaxsys.train.elastic.runtime import ElasticTrainer
    t_import = time.time()
    overrides = json.loads(sys.argv[1])
    cfg = load_config("tiny", overrides)
    tr = ElasticTrainer(cfg, log=lambda m: None)
    tr._setup_mesh()                # the survivors' mesh
    tr._from_tree_exe()
    tr._step_exe(tr.active)
    tr._layout_programs(tr.active)
    t_compiled = time.time()
    tr.setup()                      # restore of the latest checkpoint onto it
    jax.block_until_ready(tr._flat)
    t_restored = time.time()
    tr.ckpt = None                  # measure the first step, not a final save
    tr.run(tr.step + 1)
    t_step = time.time()
    print("RESTART", json.dumps({"t0": t0, "t_import": t_import, "t_restored": t_restored,
                                 "t_compiled": t_compiled, "t_step": t_step, "step": tr.step}), flush=True)
""")


def restart(ckpt_dir: Path, repeats: int, lost_steps: int) -> list[dict]:
    from jaxsys.train.elastic.membership import probe

    out = []
    env = dict(os.environ)
    overrides = MODEL + [f"devices={NUM_DEVICES - 1}", "elastic.precompile=none", f"checkpoint.dir={ckpt_dir}",
                         "checkpoint.resume=true", "steps=100000", "elastic.snapshot=true"]
    for _ in range(repeats):
        det = probe(jax.devices()[:NUM_DEVICES - 1])
        t_launch = time.time()
        p = subprocess.run([sys.executable, "-c", RESTART, json.dumps(overrides)], capture_output=True,
                           text=True, env=env, timeout=1800)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESTART ")), None)
        if p.returncode != 0 or line is None:
            raise RuntimeError(f"restart child failed:\n{p.stderr[-3000:]}")
        t = json.loads(line[len("RESTART "):])
        rec = {"detection_s": det, "replanning_s": t["t_import"] - t_launch,
               "compile_s": t["t_compiled"] - t["t_import"], "transfer_s": t["t_restored"] - t["t_compiled"],
               "first_step_s": t["t_step"] - t["t_restored"], "lost_steps": lost_steps}
        rec["recovery_s"] = sum(rec[k] for k in ("detection_s", "replanning_s", "transfer_s", "compile_s",
                                                  "first_step_s"))
        out.append(rec)
    return out


DETECT = textwrap.dedent("""
    import json, os, sys, time
    pid, port, stamp = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import jax
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid,
                               heartbeat_timeout_seconds=int(sys.argv[4]), initialization_timeout=120)
    from jaxsys.train.elastic.membership import DistributedMembership
    m = DistributedMembership(jax.devices())
    m.check(1)
    if pid == 1:
        time.sleep(1.0)
        with open(stamp, "w") as f:
            f.write(repr(time.time()))
        os._exit(1)
    b = 2
    while True:
        ev = m.check(b)
        if ev:
            t = time.time()
            break
        b += 1
        time.sleep(0.01)
    died = float(open(stamp).read())
    print("DETECT", json.dumps({"detection_s": t - died, "events": [str(e) for e in ev]}), flush=True)
    os._exit(0)
""")


def distributed_detection(heartbeat_s: int = 3) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    with tempfile.TemporaryDirectory() as d:
        stamp = str(Path(d) / "died")
        cmd = [sys.executable, "-c", DETECT]
        a = subprocess.Popen(cmd + ["0", port, stamp, str(heartbeat_s)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
        b = subprocess.run(cmd + ["1", port, stamp, str(heartbeat_s)], capture_output=True, env=env, timeout=300)
        del b
        out, _ = a.communicate(timeout=300)
    line = next(x for x in out.splitlines() if x.startswith("DETECT "))
    res = json.loads(line[len("DETECT "):])
    res["heartbeat_timeout_s"] = heartbeat_s
    return res


# ----------------------------------------------------------------------------- report
def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [("detection_s", "detect"), ("replanning_s", "re-plan / process start"),
             ("transfer_s", "state transfer / restore"), ("compile_s", "compile"), ("first_step_s", "first step")]
    names = [r["method"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [1.1, 1]})
    totals = [r["recovery_s"] for r in results]
    ax1.barh(names, totals, color=["tab:green", "tab:olive", "tab:orange", "tab:red"][:len(names)])
    for i, r in enumerate(results):
        ax1.text(totals[i] * 1.1, i, f"{totals[i]:.3g} s, {r['lost_steps']} lost", va="center", fontsize=8)
    ax1.set_xscale("log")
    ax1.set_xlim(min(totals) / 3, max(totals) * 12)
    ax1.set_xlabel("time to recover (s, log; median)")
    ax1.invert_yaxis()
    left = np.zeros(len(results))
    sums = np.array([sum(max(r[k], 0.0) for k, _ in parts) for r in results])  # medians need not add up
    for key, label in parts:
        share = np.array([max(r[key], 0.0) for r in results]) / sums * 100
        ax2.barh(names, share, left=left, label=label)
        left += share
    ax2.set_xlabel("share of the recovery time (%)")
    ax2.set_yticks([])
    ax2.invert_yaxis()
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    fig.suptitle(f"Recovery after losing 1 of {NUM_DEVICES} devices ({NUM_DEVICES} virtual CPU devices "
                 f"on {os.cpu_count()} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jaxsys bench elastic", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="failures per method (default 5)")
    p.add_argument("--period", type=int, default=6, help="steps between a failure and the rejoin")
    p.add_argument("--ckpt-every", type=int, default=10, help="Orbax checkpoint interval (steps)")
    p.add_argument("--overhead-steps", type=int, default=40, help="steps per arm for the snapshot overhead")
    p.add_argument("--skip-restart", action="store_true", help="skip the full-process-restart baseline")
    p.add_argument("--skip-extras", action="store_true", help="skip the GSPMD and two-process measurements")
    p.add_argument("--out", type=Path, default=RESULTS / "elastic.json")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON of --out")
    args = p.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.out.read_text())["records"], args.out.with_suffix(".png"))
        return 0
    if jax.device_count() < NUM_DEVICES:
        print(f"jaxsys bench elastic: needs {NUM_DEVICES} devices; jax was started with {jax.device_count()}",
              file=sys.stderr)
        return 2
    logs: list[str] = []
    log = logs.append
    t_start = time.time()

    def say(msg):
        print(f"[{time.time() - t_start:7.1f} s] {msg}", flush=True)

    say("snapshot overhead (alternating blocks, with / without the per-step snapshot)")
    snap = snapshot_overhead(args.overhead_steps, log)
    say(f"  step {snap['step_time_without_snapshot_s']:.4f} s, with snapshot "
        f"{snap['step_time_with_snapshot_s']:.4f} s: {snap['snapshot_overhead_pct']:+.2f} %")
    say("1. ours, precompiled")
    recs1, step_time = ours(args.period, args.repeats, precompiled=True, log=log)
    say(f"  {[round(r['recovery_s'], 3) for r in recs1]}")
    say("2. ours, recompiling")
    recs2, _ = ours(args.period, args.repeats, precompiled=False, log=log)
    say(f"  {[round(r['recovery_s'], 3) for r in recs2]}")
    with tempfile.TemporaryDirectory() as d:
        say("3. Orbax restore + recompile")
        recs3, info3 = orbax(args.period, args.repeats, args.ckpt_every, Path(d) / "ck", log)
        say(f"  {[round(r['recovery_s'], 3) for r in recs3]}")
        recs4 = []
        if not args.skip_restart:
            say("4. full process restart")
            recs4 = restart(Path(d) / "ck", args.repeats, info3["lost_steps"])
            say(f"  {[round(r['recovery_s'], 3) for r in recs4]}")
    extras = {}
    if not args.skip_extras:
        say("GSPMD step vs the layout-invariant step (alternating)")
        extras["determinism_cost"] = gspmd_vs_elastic(args.overhead_steps // 2, log)
        say(f"  {extras['determinism_cost']}")
        say("failure detection in a two-process jax.distributed job")
        try:
            extras["distributed_detection"] = distributed_detection()
        except Exception as e:  # report, do not hide
            extras["distributed_detection"] = {"error": f"{type(e).__name__}: {e}"}

    ov = snap["snapshot_overhead_pct"]
    results = [
        _summary("ours_precompiled", recs1, overhead=ov, step_time=step_time,
                 note="in-memory snapshot + planned transfers; executables compiled ahead in the background "
                      "and retargeted to the survivors"),
        _summary("ours_recompiling", recs2, overhead=ov, step_time=step_time,
                 note="in-memory snapshot + planned transfers; executables compiled at recovery"),
        _summary("orbax_restore_recompile", recs3, overhead=info3["checkpoint_overhead_pct"], step_time=step_time,
                 note=f"restore of the last checkpoint (every {args.ckpt_every} steps; failure half-way) from "
                      "local disk onto the survivors' mesh + compile; snapshot_overhead_pct is the "
                      "checkpointing cost per step"),
    ]
    if recs4:
        results.append(_summary("full_process_restart", recs4, overhead=info3["checkpoint_overhead_pct"],
                                step_time=step_time,
                                note="new Python process: import, restore the checkpoint, compile, first "
                                     "step (re-plan = process start + import)"))
    r1, r3 = results[0]["recovery_s"], results[2]["recovery_s"]
    targets = {
        "precompiled_at_least_10x_faster_than_orbax": {"ratio": r3 / r1, "met": r3 / r1 >= 10,
                                                        "ready_ratio": results[2]["ready_s"] / results[0]["ready_s"]},
        "precompiled_zero_lost_steps": {"lost_steps": results[0]["lost_steps"], "met": results[0]["lost_steps"] == 0},
        "snapshot_overhead_at_most_10pct": {"pct": ov, "components_pct": snap["components_pct_of_step"],
                                            "met": ov <= 10.0 and snap["components_pct_of_step"] <= 10.0},
    }
    cfg = _cfg([])
    report = {
        "benchmark": "elastic",
        "device": _device_info(),
        "model": {"parameters": cfg.model.num_params(), "layers": cfg.model.num_layers,
                  "hidden": cfg.model.hidden_size, "vocab": cfg.model.vocab_size,
                  "tokens_per_step": cfg.data.global_batch * cfg.data.seq_len,
                  "micro_batches": cfg.data.micro_batches, "dropout": cfg.dropout},
        "step_time_s": step_time,
        "snapshot": snap,
        "records": results,
        "targets": targets,
        **extras,
        "notes": [
            f"{NUM_DEVICES} virtual CPU devices share {os.cpu_count()} cores: throughput before and after a "
            "membership change is not a meaningful ratio here; it is to be measured on a GPU pod or simulated.",
            "detection_s is the survivors' liveness round trip in this single-process run; in a multi-process "
            "job it is bounded by the coordination service (see distributed_detection).",
            "lost_steps counts completed steps whose work is redone; the step during which the device "
            "failed is re-run by every method.",
            "ready_s = recovery_s - first_step_s: until the first step can start. The first step runs a "
            "fresh executable in every method; on XLA:CPU a first execution costs ~0.05-0.1 s more than a "
            "steady step (more for a deserialized, i.e. retargeted, one), which bounds ours_precompiled here.",
            "medians over repeats; every method ran in this same invocation.",
        ],
        "wall_s": time.time() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print()
    print(f"{'method':<26} {'recovery_s':>10} {'ready_s':>8} {'lost':>5} {'snap%':>7}  detect  replan transfer  "
          f"compile  first")
    for r in results:
        print(f"{r['method']:<26} {r['recovery_s']:>10.4f} {r['ready_s']:>8.4f} {r['lost_steps']:>5} "
              f"{r['snapshot_overhead_pct']:>7.2f}  "
              f"{r['detection_s']:.4f} {r['replanning_s']:.4f} {r['transfer_s']:.4f} {r['compile_s']:8.4f} "
              f"{r['first_step_s']:.4f}")
    for k, v in targets.items():
        print(f"target {k}: {'met' if v['met'] else 'MISSED'} ({', '.join(f'{a}={b:.3g}' if isinstance(b, float) else f'{a}={b}' for a, b in v.items() if a != 'met')})")
    print(f"note: {report['notes'][0]}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
