"""Elastic recovery, like for like: in-memory snapshots vs Orbax restore with the same executable handling.

After device 3 (then 5, 1, 6, 2) of 8 is lost mid-run, four ways to continue, all on the same model
and the same failure schedule (each failure half-way between two Orbax checkpoints, every
`--ckpt-every` steps), in this one process, medians over repeats:

                      state comes from                     executables for the survivors
  ours_precompiled    in-memory snapshot (ring replicas)   compiled ahead in the background,
  orbax_precompiled   Orbax restore from local disk          retargeted to the actual survivors
  ours_recompiling    in-memory snapshot                   compiled at recovery (one compile per
  orbax_recompiling   Orbax restore from local disk          program, retargeted within it)

plus `full_process_restart` (a new Python process imports, compiles, restores, runs a step).
Both "precompiled" arms wait for the background compiles before each failure (as after hours of
training); both "recompiling" arms clear the executable cache before it. The two Orbax arms are the
same elastic trainer with snapshots off (a loss falls back to the last checkpoint; the restore's
conversion program is precompiled with the step in `orbax_precompiled`).

Each recovery is timed until the run has caught up: the failed step has run on the survivors
(`caught_up_s` = recovery + the lost steps replayed, measured from the replayed steps' own times).
Three comparisons are published:

1. like for like (same executable handling): orbax_precompiled / ours_precompiled and
   orbax_recompiling / ours_recompiling: the snapshot-vs-disk effect plus the replay;
2. precompiled vs recompiling, for both: what background compilation buys each;
3. the typical user path (Orbax + recompile + replay, and a full restart) vs ours_precompiled.

Also measured: the snapshot's cost per step with background precompilation on (charged to the
training steps the background compile overlaps), the layout-invariant step against the GSPMD step,
and, in a real multi-process `jax.distributed` job (CPU processes on this machine), the time from
a process's death (SIGKILL) to the survivors' live-device check reporting it and to the survivors'
next completed training step. The survivors resume on their own devices: moving the dead
process's shard to another process is not implemented, so that row measures detection and resume,
not a cross-process reshard.

Writes benchmarks/results/elastic.json (via `_common.write_results`) and elastic.png. On CPU the 8
devices are virtual and share the machine's cores, so step times before and after a membership
change are not a meaningful throughput ratio here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import LOADAVG_AT_IMPORT, RESULTS, target, write_results  # noqa: E402

NUM_DEVICES = 8
if "jax" not in sys.modules:
    from jaxsys.runtime import DEVICE_COUNT_FLAG, request_cpu_devices

    if DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
        request_cpu_devices(NUM_DEVICES)

import jax  # noqa: E402
import numpy as np  # noqa: E402

# The benchmark model: ~0.65M parameters, 2048 tokens per step (32 x 64) in 16 micro-batches.
MODEL = ["model.vocab_size=1024", "model.hidden_size=128", "model.intermediate_size=384",
         "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=32",
         "data.seq_len=64", "data.global_batch=32", "data.micro_batches=16", "progress=false"]
FAIL_DEVICES = (3, 5, 1, 6, 2)
PHASES = ("detection_s", "replanning_s", "transfer_s", "compile_s", "first_step_s")


def _median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def _cfg(extra):
    from jaxsys.train.config import load_config

    return load_config("tiny", MODEL + list(extra))


def _trainer(cfg, **program_options):
    """A Trainer driving an elastic step program with its own executable cache."""
    from jaxsys.train.elastic.compile import ExecutableCache
    from jaxsys.train.elastic.runtime import ElasticStep
    from jaxsys.train.trainer import Trainer

    program_options.setdefault("cache", ExecutableCache())
    return Trainer(cfg, program=ElasticStep(cfg, **program_options))


class _Enough(Exception):
    """Raised from an on_step callback to end a measurement run early."""


# ----------------------------------------------------------------------------- recovery
def _schedule(repeats: int, ckpt_every: int) -> tuple[list[str], list[str], int]:
    """Failure i half-way between two checkpoints (ckpt_every=10: fail at 15, 25, ...), the device
    back at the next checkpoint step (20, 30, ...)."""
    fails, joins = [], []
    for i in range(repeats):
        d = FAIL_DEVICES[i % len(FAIL_DEVICES)]
        fails.append(f"{d}@{ckpt_every * (i + 1) + ckpt_every // 2}")
        joins.append(f"{d}@{ckpt_every * (i + 2)}")
    return fails, joins, ckpt_every * (repeats + 2)


def _caught_up(records, recoveries) -> list[float]:
    """Per recovery: its time plus the time of the steps it had to run again before the failed
    step was done (the lost steps, then the failed step itself; none for an in-memory recovery,
    whose first step is the failed step)."""
    out, pending = [], list(recoveries)
    for i, r in enumerate(records):
        if any(e.get("event") == "fail" for e in r.events):
            rec = pending.pop(0)
            replay = records[i + 1:i + 1 + rec.lost_steps]
            out.append(rec.recovery_s + sum(x.step_time_s for x in replay))
    return out


def recovery_run(method: str, repeats: int, ckpt_every: int, ckpt_dir: Path, log) -> dict:
    """One arm: ours/orbax x precompiled/recompiling over `repeats` failures (see the docstring)."""
    source, handling = method.split("_")
    fails, joins, end = _schedule(repeats, ckpt_every)
    extra = [f"steps={end}", "elastic.fail=" + ",".join(fails), "elastic.join=" + ",".join(joins),
             f"elastic.precompile={'single_loss' if handling == 'precompiled' else 'none'}"]
    if source == "orbax":
        extra += ["elastic.snapshot=false", f"checkpoint.dir={ckpt_dir}", f"checkpoint.every={ckpt_every}",
                  "checkpoint.keep=2"]
    tr = _trainer(_cfg(extra), log=log)
    fail_steps = {int(f.split("@")[1]) for f in fails}

    def before_failure(s, t):
        if s + 1 in fail_steps:
            if handling == "precompiled":
                t.program.cache.wait()  # background compiles done, as long after the last change
            else:
                t.program.cache.clear()  # nothing compiled for any other device set

    res = tr.run(on_step=before_failure)
    tr.close()
    recs = [r for r in tr.program.recoveries if r.kind in ("fail", "checkpoint")]
    steady = [r.step_time_s for r in res.records if r.num_devices == NUM_DEVICES and not r.events][2:]
    return {"method": method, "recoveries": recs, "caught_up_s": _caught_up(res.records, recs),
            "step_time_s": _median(steady)}


def _summary(arm: dict, note: str) -> dict:
    recs = arm["recoveries"]
    out = {"method": arm["method"],
           "caught_up_s": _median(arm["caught_up_s"]),
           "recovery_s": _median([r.recovery_s for r in recs]),
           "ready_s": _median([r.recovery_s - r.first_step_s for r in recs]),
           "lost_steps": int(_median([r.lost_steps for r in recs])) if recs else None,
           **{p: _median([getattr(r, p) for r in recs]) for p in PHASES},
           "step_time_s": arm["step_time_s"],
           "repeats": len(recs),
           "caught_up_s_all": [round(x, 4) for x in arm["caught_up_s"]],
           "recoveries": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.to_json().items()
                           if k in PHASES + ("recovery_s", "lost_steps", "compile_how", "step", "devices_after",
                                             "elements_moved")} for r in recs],
           "note": note}
    return out


RESTART = textwrap.dedent("""
    import json, sys, time
    t0 = time.time()
    import jax
    from jaxsys.train.config import load_config
    from jaxsys.train.elastic.runtime import ElasticStep
    from jaxsys.train.trainer import Trainer
    t_import = time.time()
    cfg = load_config("tiny", json.loads(sys.argv[1]))
    tr = Trainer(cfg, program=ElasticStep(cfg, log=lambda m: None))
    tr.program.build()
    tr.program.compile()            # the survivors' step
    t_compiled = time.time()
    tr.setup()                      # restore of the latest checkpoint onto the survivors' mesh
    jax.block_until_ready(tr.program.flat)
    t_restored = time.time()
    tr.ckpt = None                  # time the first step, not a final save
    tr.run(tr.step + 1)
    t_step = time.time()
    print("RESTART", json.dumps({"t0": t0, "t_import": t_import, "t_restored": t_restored,
                                 "t_compiled": t_compiled, "t_step": t_step}), flush=True)
""")


def restart(ckpt_dir: Path, repeats: int, lost_steps: int, step_time: float) -> dict:
    """A new process on the 7 survivors: import, compile, restore the last checkpoint, one step;
    then the lost steps, charged at the steady step time."""
    from jaxsys.train.elastic.membership import probe

    overrides = MODEL + [f"devices={NUM_DEVICES - 1}", "elastic.precompile=none", f"checkpoint.dir={ckpt_dir}",
                         "checkpoint.resume=true", "steps=100000"]
    recs, caught = [], []
    for _ in range(repeats):
        det = probe(jax.devices()[:NUM_DEVICES - 1])
        t_launch = time.time()
        p = subprocess.run([sys.executable, "-c", RESTART, json.dumps(overrides)], capture_output=True,
                           text=True, env=dict(os.environ), timeout=1800)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESTART ")), None)
        if p.returncode != 0 or line is None:
            raise RuntimeError(f"restart child failed:\n{p.stderr[-3000:]}")
        t = json.loads(line[len("RESTART "):])
        r = _Timed(detection_s=det, replanning_s=t["t_import"] - t_launch,
                   compile_s=t["t_compiled"] - t["t_import"], transfer_s=t["t_restored"] - t["t_compiled"],
                   first_step_s=t["t_step"] - t["t_restored"], lost_steps=lost_steps)
        recs.append(r)
        caught.append(r.recovery_s + lost_steps * step_time)
    return {"method": "full_process_restart", "recoveries": recs, "caught_up_s": caught, "step_time_s": step_time}


class _Timed:
    """A restart's phases, shaped like `jaxsys.train.elastic.runtime.Recovery` for `_summary`."""

    def __init__(self, **phases):
        self.__dict__.update(phases, compile_how="compiled", step=None, devices_after=None, elements_moved=None)

    @property
    def recovery_s(self) -> float:
        return sum(getattr(self, p) for p in PHASES)

    def to_json(self) -> dict:
        return {**self.__dict__, "recovery_s": self.recovery_s}


# ----------------------------------------------------------------------------- steady-state costs
def snapshot_overhead(min_steps: int, after_steps: int, log) -> dict:
    """Step times with the per-step snapshot and background precompilation on (the program
    compiles the executables of every single-device loss while training), against the same
    trainer with both off. The window runs from the first step until `after_steps` steps after
    the background compile finished (at least `min_steps`); the extra time of every step in it
    is charged to the snapshot. Baseline blocks run before and after (drift hits both)."""
    from jaxsys.train.elastic.snapshot import take_snapshot, verify

    def timed_run(extra, window=None):
        """(trainer, step times, whether the background compile ran during each step)."""
        tr = _trainer(_cfg(["steps=100000"] + extra), log=log)
        tr.compile()
        busy: list[bool] = []
        idle_from: list[int] = []

        def watch(s, t):
            busy.append(t.program.cache.busy())
            if not idle_from and not busy[-1]:
                idle_from.append(len(busy))
            if len(busy) >= (window if window is not None else
                             max(min_steps, idle_from[0] + after_steps) if idle_from else float("inf")):
                raise _Enough

        with tempfile.TemporaryDirectory() as d:
            metrics = Path(d) / "m.jsonl"
            try:
                tr.run(on_step=watch, metrics_out=metrics)
            except _Enough:
                pass
            times = [json.loads(x)["step_time_s"] for x in metrics.read_text().splitlines()]
        return tr, times[:len(busy)], busy

    _, t_base1, _ = timed_run(["elastic.snapshot=false", "elastic.precompile=none"], window=min_steps)
    on, t_on, busy = timed_run(["elastic.precompile=single_loss"])
    window = len(busy)
    _, t_base2, _ = timed_run(["elastic.snapshot=false", "elastic.precompile=none"], window=window)
    t_base = t_base1 + t_base2
    per_step_base = _median(t_base)
    overlapped = sum(busy)
    extra_s = sum(t_on) - window * per_step_base
    after = [t for t, b in zip(t_on, busy) if not b]

    prog = on.program
    lay = prog.layout()

    def timed(f, n=20):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            ts.append(time.perf_counter() - t0)
        return _median(ts)

    snap = take_snapshot(prog.cache, on.step, prog.count, lay, prog.active_devices, prog.flat, prog.memory)
    t_snap = timed(lambda: take_snapshot(prog.cache, on.step, prog.count, lay, prog.active_devices, prog.flat,
                                         prog.memory).replica)
    t_ver = timed(lambda: verify(prog.cache, snap).ok)
    every = on.cfg.elastic.verify_every
    return {"snapshot_overhead_pct": 100.0 * extra_s / (window * per_step_base),
            "window_steps": window, "steps_overlapping_precompile": overlapped,
            "extra_s_in_window": extra_s, "baseline_step_time_s": per_step_base,
            "step_time_during_precompile_s": _median([t for t, b in zip(t_on, busy) if b]),
            "step_time_after_precompile_s": _median(after),
            "steady_overhead_pct": 100.0 * (_median(after) - per_step_base) / per_step_base,
            "snapshot_program_s": t_snap, "verify_s": t_ver, "verify_every": every,
            # in steady state the step emits the snapshot itself (about the work of the snapshot
            # program) and every `verify_every` steps all copies are verified
            "components_pct_of_step": 100.0 * (t_snap + (t_ver / every if every else 0.0)) / per_step_base,
            "replica_memory": prog.memory, "state_bytes": 3 * 4 * prog.flat_spec.num_params,
            "samples": {"with": [round(t, 5) for t in t_on], "baseline": [round(t, 5) for t in t_base]}}


def gspmd_vs_elastic(steps: int, log) -> dict:
    """Median step time of the GSPMD step and of the layout-invariant step (snapshot off),
    alternating step by step."""
    from jaxsys.train.trainer import Trainer

    g = Trainer(_cfg([f"steps={steps + 4}", "elastic.enabled=false", "mesh.fsdp=-1"]))
    e = _trainer(_cfg([f"steps={steps + 4}", "elastic.precompile=none", "elastic.snapshot=false"]), log=log)
    g.run(2)
    e.run(2)
    tg, te = [], []
    while g.step < 2 + steps:
        tg += [r.step_time_s for r in g.run(g.step + 1).records]
        te += [r.step_time_s for r in e.run(e.step + 1).records]
    mg, me = _median(tg), _median(te)
    return {"gspmd_step_time_s": mg, "elastic_step_time_s": me,
            "layout_invariant_step_overhead_pct": 100.0 * (me - mg) / mg, "samples": len(tg)}


# ----------------------------------------------------------------------------- multi-process detection
DETECT = textwrap.dedent("""
    import hashlib, json, os, sys, time
    pid, nproc, port, work, heartbeat, warm = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4],
                                               int(sys.argv[5]), int(sys.argv[6]))
    overrides = json.loads(sys.argv[7])
    import jax
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid,
                               heartbeat_timeout_seconds=heartbeat, initialization_timeout=600)
    from jaxsys.train.config import load_config
    from jaxsys.train.elastic.membership import DistributedMembership
    from jaxsys.train.elastic.runtime import ElasticStep
    from jaxsys.train.trainer import Trainer

    cfg = load_config("tiny", overrides)
    tr = Trainer(cfg, program=ElasticStep(cfg, devices=jax.local_devices(), log=lambda m: None))
    tr.compile()
    watch = DistributedMembership(jax.devices())
    out = {"pid": pid, "local_devices": len(jax.local_devices()), "global_devices": jax.device_count(),
           "check_s": []}

    class Done(Exception):
        pass

    def boundary(s, t):
        now = time.time()
        if "detected" in out:           # step s is the survivors' first step after the loss
            out["resumed"], out["resumed_step"] = now, s
            out["state_sha256"] = hashlib.sha256(t.program.flat_state().tobytes()).hexdigest()[:16]
            raise Done
        fails = watch.failures(s)       # live-device barrier of the processes still alive
        if fails:
            out["detected"], out["events"] = time.time(), [str(e) for e in fails]
        elif s + 1 == warm:
            open(os.path.join(work, f"ready{pid}"), "w").close()
        if not fails and s >= 2:        # the first boundaries also wait for the peers' compiles
            out["check_s"].append(watch.last_check_s)

    try:
        tr.run(on_step=boundary)
    except Done:
        pass
    with open(os.path.join(work, f"result{pid}.json"), "w") as f:
        json.dump(out, f)
    if pid == 0:                        # host of the coordination service: outlive the others
        t0 = time.time()
        while time.time() - t0 < 120 and not all(
                os.path.exists(os.path.join(work, f"result{i}.json")) for i in range(nproc - 1)):
            time.sleep(0.05)
    os._exit(0)
""")


def distributed_detection(nproc: int, devices_per_process: int, heartbeat_s: int, warm: int,
                          repeats: int) -> dict:
    """`nproc` CPU processes of one jax.distributed job, each training the benchmark model on its
    own `devices_per_process` devices and checking live devices at every step boundary; the last
    process is SIGKILLed once all have run `warm` steps. Per survivor: death -> its check reports
    the loss (detection_s) -> its next training step completes (resumed_s)."""
    import socket

    runs = []
    for _ in range(repeats):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = str(s.getsockname()[1])
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
        env["JAX_PLATFORMS"] = "cpu"
        overrides = MODEL + ["steps=100000", "elastic.precompile=none"]
        with tempfile.TemporaryDirectory() as work:
            logs = [open(Path(work) / f"stderr{i}", "w") for i in range(nproc)]
            procs = [subprocess.Popen([sys.executable, "-c", DETECT, str(i), str(nproc), port, work, str(heartbeat_s),
                                       str(warm), json.dumps(overrides)], env=env, stdout=subprocess.DEVNULL,
                                      stderr=logs[i]) for i in range(nproc)]
            victim = procs[-1]
            try:
                t0 = time.time()
                while not all(os.path.exists(os.path.join(work, f"ready{i}")) for i in range(nproc)):
                    if time.time() - t0 > 900 or any(p.poll() is not None for p in procs):
                        raise RuntimeError("a process ended before the kill: " + " | ".join(
                            (Path(work) / f"stderr{i}").read_text()[-1500:] for i in range(nproc)))
                    time.sleep(0.05)
                t_kill = time.time()
                victim.send_signal(signal.SIGKILL)
                for p in procs[:-1]:
                    p.wait(timeout=600)
                missing = [i for i in range(nproc - 1) if not (Path(work) / f"result{i}.json").exists()]
                if missing:
                    raise RuntimeError(f"survivors {missing} reported nothing: " + " | ".join(
                        (Path(work) / f"stderr{i}").read_text()[-1500:] for i in missing))
                results = [json.loads((Path(work) / f"result{i}.json").read_text()) for i in range(nproc - 1)]
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                for f in logs:
                    f.close()
        for r in results:
            r["detection_s"] = r["detected"] - t_kill
            r["resumed_s"] = r["resumed"] - t_kill
            r["barrier_s_median"] = _median(r.pop("check_s"))
        runs.append(results)
    flat = [r for run in runs for r in run]
    return {"processes": nproc, "devices_per_process": devices_per_process, "heartbeat_timeout_s": heartbeat_s,
            "killed": f"process {nproc - 1} (SIGKILL) after {warm} steps", "repeats": repeats,
            "detection_s": _median([r["detection_s"] for r in flat]),
            "resumed_s": _median([r["resumed_s"] for r in flat]),
            "barrier_s_per_step": _median([r["barrier_s_median"] for r in flat]),
            "survivors": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                           if k not in ("detected", "resumed")} for r in flat],
            "survivors_agree": all(len({(r["resumed_step"], r["state_sha256"]) for r in run}) == 1 for run in runs),
            "what": "every process trains a full replica of the model on its own devices (the layout-"
                    "invariant step gives each the same bits; state_sha256 at the resumed step); time from "
                    "SIGKILL of one process to (detection_s) the survivors' live-device check (jax.distributed, "
                    "a barrier at every step boundary) reporting it, and to (resumed_s) each survivor's next "
                    "completed training step on its own devices. barrier_s_per_step: the live-device check's "
                    "time per step before the death (it includes waiting for the slowest process). No state "
                    "moves between processes "
                    "(cross-process resharding is not implemented), so this is detection + resume, not a "
                    "cross-process reshard"}


# ----------------------------------------------------------------------------- report
def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [("detection_s", "detect"), ("replanning_s", "re-plan / process start"),
              ("transfer_s", "state: transfer / restore"), ("compile_s", "compile"), ("first_step_s", "first step"),
              ("replay_s", "lost steps replayed")]
    names = [r["method"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.1, 1]})
    totals = [r["caught_up_s"] for r in records]
    ax1.barh(names, totals, color=["tab:green", "tab:olive", "tab:blue", "tab:orange", "tab:red"][:len(names)])
    for i, r in enumerate(records):
        ax1.text(totals[i] * 1.1, i, f"{totals[i]:.3g} s, {r['lost_steps']} lost", va="center", fontsize=8)
    ax1.set_xscale("log")
    ax1.set_xlim(min(totals) / 3, max(totals) * 12)
    ax1.set_xlabel("failure -> caught up (s, log; median)")
    ax1.invert_yaxis()
    left = np.zeros(len(records))
    parts = [{**r, "replay_s": max(r["caught_up_s"] - r["recovery_s"], 0.0)} for r in records]
    sums = np.array([sum(max(p[k], 0.0) for k, _ in labels) for p in parts])  # medians need not add up
    for key, label in labels:
        share = np.array([max(p[key], 0.0) for p in parts]) / sums * 100
        ax2.barh(names, share, left=left, label=label)
        left += share
    ax2.set_xlabel("share of the time (%)")
    ax2.set_yticks([])
    ax2.invert_yaxis()
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    fig.suptitle(f"Recovery after losing 1 of {NUM_DEVICES} devices ({NUM_DEVICES} virtual CPU devices "
                 f"on {os.cpu_count()} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


NOTES = {
    "ours_precompiled": "in-memory snapshot + planned transfers; executables compiled ahead in the background "
                        "and retargeted to the survivors",
    "orbax_precompiled": "restore of the last checkpoint from local disk onto the survivors' mesh; executables "
                         "(step and restore conversion) compiled ahead in the background and retargeted, as ours",
    "ours_recompiling": "in-memory snapshot + planned transfers; executables compiled at recovery",
    "orbax_recompiling": "restore of the last checkpoint from local disk + compile at recovery + replay of the "
                         "lost steps: the typical user path",
    "full_process_restart": "new Python process: import, compile, restore the checkpoint, first step; replay "
                            "charged at the steady step time (re-plan = process start + import)",
}


def comparisons(by: dict[str, dict], detection_s: float | None = None) -> dict:
    """The three published ratios of caught_up_s. With `detection_s` (the multi-process
    measurement) they are also given with that detection in place of the single-process liveness
    probe on both sides: what a multi-process job would see."""
    ratio = lambda a, b: by[a]["caught_up_s"] / by[b]["caught_up_s"]  # noqa: E731
    out = {
        "1_like_for_like": {
            "precompiled_orbax_over_ours": ratio("orbax_precompiled", "ours_precompiled"),
            "recompiling_orbax_over_ours": ratio("orbax_recompiling", "ours_recompiling"),
            "what": "same executable handling on both sides; the rest is snapshot vs disk plus the replay"},
        "2_precompiled_vs_recompiling": {
            "ours": ratio("ours_recompiling", "ours_precompiled"),
            "orbax": ratio("orbax_recompiling", "orbax_precompiled"),
            "what": "what compiling ahead in the background buys each"},
        "3_typical_user_path": {
            "orbax_recompiling_over_ours_precompiled": ratio("orbax_recompiling", "ours_precompiled"),
            "what": "Orbax restore + recompile + replay (no background compilation) vs ours"},
    }
    if "full_process_restart" in by:
        out["3_typical_user_path"]["full_restart_over_ours_precompiled"] = ratio("full_process_restart",
                                                                                 "ours_precompiled")
    if detection_s is not None:
        real = {m: {**r, "caught_up_s": r["caught_up_s"] - r["detection_s"] + detection_s} for m, r in by.items()}
        with_detection = comparisons(real)
        for v in with_detection.values():
            v.pop("what")
        out["with_measured_detection"] = {"detection_s": detection_s, **with_detection}
    return out


def print_summary(records: list[dict], comp: dict, targets: list[dict]) -> None:
    print()
    print(f"{'method':<22} {'caught_up_s':>11} {'recovery_s':>10} {'lost':>5}  detect  replan transfer  compile  first")
    for r in records:
        print(f"{r['method']:<22} {r['caught_up_s']:>11.4f} {r['recovery_s']:>10.4f} {r['lost_steps']:>5}  "
              f"{r['detection_s']:.4f} {r['replanning_s']:.4f} {r['transfer_s']:.4f} {r['compile_s']:8.4f} "
              f"{r['first_step_s']:.4f}")
    for name, c in comp.items():
        if name == "with_measured_detection":
            print(f"with the measured multi-process detection ({c['detection_s']:.2f} s) on both sides:")
            c = {k: v for part in c.values() if isinstance(part, dict) for k, v in part.items()}
        print(f"{name}: " + ", ".join(f"{k}={v:.2f}x" for k, v in c.items() if isinstance(v, float)))
    for t in targets:
        print(f"target {t['name']}: {t['value']:.3g} {t['direction']} {t['target']}: "
              f"{'met' if t['met'] else 'MISSED'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jaxsys bench elastic", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="failures per method")
    p.add_argument("--ckpt-every", type=int, default=10, help="Orbax checkpoint interval (steps); each "
                   "failure is half-way between two checkpoints")
    p.add_argument("--overhead-steps", type=int, default=40,
                   help="least steps per arm for the snapshot overhead (and after the background compile)")
    p.add_argument("--procs", type=int, default=3, help="processes of the multi-process detection job")
    p.add_argument("--detect-repeats", type=int, default=2, help="process deaths for the detection measurement")
    p.add_argument("--heartbeat", type=int, default=3, help="jax.distributed heartbeat timeout (s)")
    p.add_argument("--skip-restart", action="store_true", help="skip the full-process-restart arm")
    p.add_argument("--skip-extras", action="store_true",
                   help="skip the GSPMD comparison and the multi-process detection job")
    p.add_argument("--model", nargs="*", metavar="key=value",
                   help="config overrides replacing the benchmark model (for a quick check)")
    p.add_argument("--out", type=Path, default=RESULTS / "elastic.json")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON of --out")
    args = p.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.out.read_text())["records"], args.out.with_suffix(".png"))
        return 0
    if jax.device_count() < NUM_DEVICES:
        from jaxsys.runtime import cpu_devices_hint

        print(f"jaxsys bench elastic: needs {NUM_DEVICES} devices, have {jax.device_count()}; "
              f"{cpu_devices_hint(NUM_DEVICES)}", file=sys.stderr)
        return 2
    global MODEL
    if args.model is not None:
        MODEL = ["progress=false"] + list(args.model)
    logs: list[str] = []
    log = logs.append
    t_start = time.time()

    def say(msg):
        print(f"[{time.time() - t_start:7.1f} s] {msg}", flush=True)

    say("snapshot overhead with background precompilation on")
    snap = snapshot_overhead(args.overhead_steps, max(5, args.overhead_steps // 4), log)
    say(f"  {snap['snapshot_overhead_pct']:+.2f} % over {snap['window_steps']} steps "
        f"({snap['steps_overlapping_precompile']} overlapping the background compile); steady "
        f"{snap['steady_overhead_pct']:+.2f} %")
    arms = {}
    with tempfile.TemporaryDirectory() as d:
        for method in ("ours_precompiled", "orbax_precompiled", "ours_recompiling", "orbax_recompiling"):
            say(method)
            arms[method] = recovery_run(method, args.repeats, args.ckpt_every, Path(d) / method, log)
            say(f"  caught up in {[round(x, 3) for x in arms[method]['caught_up_s']]} s")
        if not args.skip_restart:
            say("full_process_restart")
            lost = arms["orbax_recompiling"]["recoveries"][0].lost_steps
            arms["full_process_restart"] = restart(Path(d) / "orbax_recompiling", args.repeats, lost,
                                                   arms["ours_precompiled"]["step_time_s"])
            say(f"  caught up in {[round(x, 3) for x in arms['full_process_restart']['caught_up_s']]} s")
    extras = {}
    if not args.skip_extras:
        say("GSPMD step vs the layout-invariant step (alternating)")
        extras["determinism_cost"] = gspmd_vs_elastic(args.overhead_steps // 2, log)
        say(f"  {extras['determinism_cost']}")
        say(f"multi-process detection: {args.procs} jax.distributed processes, one SIGKILLed")
        extras["distributed_detection"] = distributed_detection(args.procs, 2, args.heartbeat, warm=6,
                                                                repeats=args.detect_repeats)
        dd = extras["distributed_detection"]
        say(f"  detection {dd['detection_s']:.3f} s, survivors' next step done {dd['resumed_s']:.3f} s after death")

    records = [_summary(arm, NOTES[m]) for m, arm in arms.items()]
    by = {r["method"]: r for r in records}
    detection = extras.get("distributed_detection", {}).get("detection_s")
    comp = comparisons(by, detection)
    ours = by["ours_precompiled"]
    targets = [
        target("typical_user_path_speedup (orbax+recompile+replay / ours precompiled)",
               comp["3_typical_user_path"]["orbax_recompiling_over_ours_precompiled"], 10.0),
        target("like_for_like_speedup (orbax precompiled / ours precompiled)",
               comp["1_like_for_like"]["precompiled_orbax_over_ours"], 2.0),
        target("ours_lost_steps", ours["lost_steps"], 0, higher_is_better=False),
        target("snapshot_overhead_pct (background precompilation on)", snap["snapshot_overhead_pct"], 10.0,
               higher_is_better=False),
    ]
    cfg = _cfg([])
    write_results(
        "elastic", records, args.out, targets=targets, loadavg_start=LOADAVG_AT_IMPORT,
        model={"parameters": cfg.model.num_params(), "layers": cfg.model.num_layers,
               "hidden": cfg.model.hidden_size, "vocab": cfg.model.vocab_size,
               "tokens_per_step": cfg.data.global_batch * cfg.data.seq_len,
               "micro_batches": cfg.data.micro_batches, "dropout": cfg.dropout, "overrides": MODEL},
        protocol={"devices": NUM_DEVICES, "repeats": args.repeats, "ckpt_every": args.ckpt_every,
                  "failures": "device 3, 5, 1, 6, 2 half-way between checkpoints, back at the next one"},
        comparisons=comp, snapshot=snap, **extras,
        notes=[
            f"{NUM_DEVICES} virtual CPU devices share {os.cpu_count()} cores: throughput before and after a "
            "membership change is not a meaningful ratio here.",
            "caught_up_s: from the failure until the failed step has run on the survivors (recovery + the lost "
            "steps replayed, timed as they ran); recovery_s: until the first step after the recovery is done.",
            "detection_s inside the recovery arms is the survivors' liveness round trip in this single-process run; "
            "distributed_detection measures death -> detection -> resume in a real multi-process job.",
            "medians over repeats; every arm ran in this same invocation.",
        ],
        wall_s=time.time() - t_start)
    plot(records, args.out.with_suffix(".png"))
    print_summary(records, comp, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
