"""Run an elastic training job as several `jax.distributed` processes on this machine, kill and
restart processes on a schedule, and report how the job recovered.

    python -m jaxsys.train.elastic.launch --config tiny --processes 4 --devices-per-process 2 \\
        --kill 2@5 --restart 2@9 --out /tmp/job steps=12

Each process is a CPU JAX process with its own virtual devices, one process of one multi-controller
job (the coordination service runs in process 0); together they train with
`jaxsys.train.elastic.multiprocess.DistributedElasticStep`: the layout-invariant step over a mesh
spanning every process, CPU collectives between them. `--kill P@S` SIGKILLs process P right after
it commits step S (the process stops at that step boundary until the signal comes, so the kill
lands between steps; nothing tells the others). The survivors notice at their next boundary
(heartbeat timeout), rebuild the state from the copies they hold and go on. `--restart P@S` starts
process P again once the survivors have committed step S; it joins the running job and receives
its share of the state from its peers. The survivors wait at boundary S+1 until the restarted
process has started and connected (Python, JAX and `jax.distributed` take seconds, tens of steps of
this tiny job), so it rejoins at a known step whatever the machine's speed.

Output (under --out): `metrics<P>.<incarnation>.jsonl` per process (the trainer's metrics lines,
recoveries in their `events`), `state.npy` (the final [3, P] params, Adam mu and nu, written by
process 0), `summary.json` (per process the committed steps, losses and parameter checksums; every
recovery with the time from the kill (or restart) to the first step after it and its breakdown),
and each process's stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

PROG = "python -m jaxsys.train.elastic.launch"


@dataclasses.dataclass(frozen=True)
class ProcessEvent:
    process: int
    step: int


def parse_process_events(specs: Sequence[str], what: str) -> list[ProcessEvent]:
    """`P@S[,P@S...]` items -> events (form only; `check_schedule` checks them against the job)."""
    out = []
    for item in (p.strip() for spec in specs for p in spec.split(",")):
        if not item:
            continue
        try:
            p, s = item.split("@")
            out.append(ProcessEvent(int(p), int(s)))
        except ValueError:
            raise ValueError(f"--{what} {item!r}: expected PROCESS@STEP, e.g. 2@5") from None
    return out


def check_schedule(kills: list[ProcessEvent], restarts: list[ProcessEvent], *, processes: int, steps: int) -> None:
    """Reject a schedule the job cannot run, before any process starts."""
    for what, events in (("kill", kills), ("restart", restarts)):
        for e in events:
            if not 0 <= e.process < processes:
                raise ValueError(f"--{what} {e.process}@{e.step}: the job has processes 0-{processes - 1}")
            if not 0 <= e.step < steps:
                raise ValueError(f"--{what} {e.process}@{e.step}: the run has steps 0-{steps - 1}")
            if e.process == 0:
                raise ValueError(f"--{what} 0@{e.step}: process 0 hosts the coordination service; the job cannot "
                                 "survive its loss (kill another process)")
    killed = [e.process for e in kills]
    if len(set(killed)) != len(killed):
        raise ValueError("--kill: a process can be killed once")
    steps_killed = [e.step for e in kills]
    if len(set(steps_killed)) != len(steps_killed):
        raise ValueError("--kill: one process per step (the copies of a process's shards live in the next "
                         "process: two processes lost at once can take both copies)")
    for r in restarts:
        k = next((e for e in kills if e.process == r.process), None)
        if k is None:
            raise ValueError(f"--restart {r.process}@{r.step}: process {r.process} is never killed")
        if r.step <= k.step:
            raise ValueError(f"--restart {r.process}@{r.step}: must come after its kill at step {k.step}")
    if len({e.process for e in restarts}) != len(restarts):
        raise ValueError("--restart: a process can be restarted once")


# ----------------------------------------------------------------------------- one process
def worker(args: argparse.Namespace) -> None:
    """One process of the job (started by `launch`)."""
    import jax

    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(args.coordinator, num_processes=args.processes, process_id=args.worker,
                               heartbeat_timeout_seconds=args.heartbeat, initialization_timeout=600)
    import numpy as np

    from jaxsys.train.config import load_config
    from jaxsys.train.elastic.multiprocess import DistributedElasticStep
    from jaxsys.train.trainer import Trainer

    out = Path(args.out)
    cfg = load_config(args.config, list(args.overrides) + ["elastic.enabled=true", "progress=false"])
    program = DistributedElasticStep(cfg, log=lambda m: print(f"[process {args.worker}] {m}", file=sys.stderr,
                                                              flush=True))
    trainer = Trainer(cfg, program=program)
    hold = args.hold_after if args.incarnation == 0 else None
    joins = parse_process_events(args.wait_join, "restart") if args.incarnation == 0 else []

    def boundary(step: int, tr) -> None:
        if step == hold:  # the launcher's SIGKILL lands here, between steps
            (out / f"at_kill_point{args.worker}").touch()
            while True:
                time.sleep(1)
        for j in joins:
            if step == j.step:  # the restarted process checks in at the next boundary
                while not (out / f"ready{j.process}").exists():
                    time.sleep(0.05)

    trainer.setup()
    if program.joining:  # started, connected and set up: check in at the survivors' next boundary
        (out / f"ready{args.worker}").touch()

    trainer.run(metrics_out=out / f"metrics{args.worker}.{args.incarnation}.jsonl", on_step=boundary)
    state = program.flat_state()  # a collective over the processes in service
    in_service = sorted({program.devices[i].process_index for i in program.active})
    if args.worker == in_service[0]:
        np.save(out / "state.npy", state)
    (out / f"done{args.worker}").write_text(json.dumps({"in_service": in_service}))
    # Nobody leaves before every peer has its copy: a process that exits closes its sockets, and a
    # closed socket with unread bytes resets the connection under a peer still reading. Process 0
    # (the coordination service) waits like the others.
    t0 = time.time()
    while time.time() - t0 < 120 and not all((out / f"done{p}").exists() for p in in_service):
        time.sleep(0.05)
    os._exit(0)  # no shutdown handshake: the peers that died cannot take part in one


# ----------------------------------------------------------------------------- the launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _committed(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return lines


def launch(args: argparse.Namespace) -> dict:
    """Start the job, run the kill/restart schedule, wait for the end; returns the summary."""
    from jaxsys.train.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    kills = parse_process_events(args.kill, "kill")
    restarts = parse_process_events(args.restart, "restart")
    check_schedule(kills, restarts, processes=args.processes, steps=cfg.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file():
            f.unlink()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}")
    coordinator = f"localhost:{_free_port()}"
    base = [sys.executable, "-m", "jaxsys.train.elastic.launch", "--config", args.config, "--processes",
            str(args.processes), "--devices-per-process", str(args.devices_per_process), "--heartbeat",
            str(args.heartbeat), "--out", str(out), "--coordinator", coordinator]
    hold = {e.process: e.step for e in kills}
    procs: dict[tuple[int, int], subprocess.Popen] = {}
    logs = []

    def start(p: int, incarnation: int) -> None:
        log = open(out / f"stderr{p}.{incarnation}", "w")
        logs.append(log)
        cmd = base + ["--worker", str(p), "--incarnation", str(incarnation)]
        if p in hold:
            cmd += ["--hold-after", str(hold[p])]
        if incarnation == 0 and restarts:
            cmd += ["--wait-join", ",".join(f"{r.process}@{r.step}" for r in restarts)]
        procs[(p, incarnation)] = subprocess.Popen(cmd + ["--"] + list(args.overrides), env=env,
                                                   stdout=subprocess.DEVNULL, stderr=log)

    def tails() -> str:
        return "\n".join(f"--- process {p}.{i}:\n" + (out / f"stderr{p}.{i}").read_text()[-2000:]
                         for (p, i) in procs)

    times: dict[str, float] = {}
    t_start = time.time()
    for p in range(args.processes):
        start(p, 0)
    pending_kills, pending_restarts = list(kills), list(restarts)
    try:
        while True:
            for k in list(pending_kills):
                if (out / f"at_kill_point{k.process}").exists():
                    procs[(k.process, 0)].send_signal(signal.SIGKILL)
                    times[f"kill{k.process}"] = time.time()
                    pending_kills.remove(k)
            for r in list(pending_restarts):
                if f"kill{r.process}" not in times:
                    continue
                survivors = [p for p in range(args.processes) if f"kill{p}" not in times]
                done = min((max((x["step"] for x in _committed(out / f"metrics{p}.0.jsonl")), default=-1)
                            for p in survivors), default=-1)
                if done >= r.step:
                    start(r.process, 1)
                    times[f"restart{r.process}"] = time.time()
                    pending_restarts.remove(r)
            running = {key: pr.poll() for key, pr in procs.items()}
            killed = {(k.process, 0) for k in kills if f"kill{k.process}" in times}
            crashed = [key for key, rc in running.items() if rc not in (None, 0) and key not in killed]
            if crashed:
                raise RuntimeError(f"process(es) {crashed} failed:\n{tails()}")
            if all(rc is not None for rc in running.values()) and not pending_restarts:
                break
            first = [key for key in running if key[1] == 0 and key not in killed]
            late = [key for key, rc in running.items() if key[1] == 1 and rc is None
                    and not (out / f"done{key[0]}").exists()]
            if late and all(running[key] is not None for key in first):
                raise RuntimeError("the job finished before the restarted process(es) joined it (restart earlier "
                                   "or run more steps)")
            if time.time() - t_start > args.timeout:
                raise RuntimeError(f"the job did not finish in {args.timeout} s:\n{tails()}")
            time.sleep(0.05)
    finally:
        for pr in procs.values():
            if pr.poll() is None:
                pr.kill()
        for log in logs:
            log.close()
    summary = summarize(out, procs.keys(), times, kills, restarts)
    summary["wall_s"] = round(time.time() - t_start, 3)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def summarize(out: Path, keys, times: dict[str, float], kills, restarts) -> dict:
    """Per process: committed steps, losses, checksums; per recovery: where the time went."""
    processes, recoveries = {}, []
    for p, inc in sorted(keys):
        lines = _committed(out / f"metrics{p}.{inc}.jsonl")
        processes[f"{p}.{inc}"] = {"steps": [x["step"] for x in lines], "losses": [x["loss"] for x in lines],
                                   "param_checksums": [x.get("param_checksum") for x in lines],
                                   "devices": [x["devices"] for x in lines]}
        for x in lines:
            for ev in x.get("events", []):
                if ev.get("event") not in ("fail", "join"):
                    continue
                cause = times.get(("kill" if ev["event"] == "fail" else "restart") + str(ev["processes"][0]))
                rec = dict(ev["recovery"])
                recoveries.append({"process": f"{p}.{inc}", "event": ev["event"], "step": ev["step"],
                                   "lost_or_joined_processes": ev["processes"],
                                   "cause_to_first_step_s": (round(ev["first_step_done_unix"] - cause, 4)
                                                             if cause else None),
                                   **{k: rec[k] for k in ("detection_s", "replanning_s", "compile_s", "transfer_s",
                                                          "first_step_s", "recovery_s", "elements_moved")}})
    return {"kills": [dataclasses.asdict(k) for k in kills], "restarts": [dataclasses.asdict(r) for r in restarts],
            "processes": processes, "recoveries": recoveries}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--config", default="tiny", metavar="NAME_OR_PATH", help="training config (default tiny)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--processes", type=int, default=4, help="jax.distributed processes (default 4)")
    p.add_argument("--devices-per-process", type=int, default=2, help="virtual CPU devices each (default 2)")
    p.add_argument("--kill", action="append", default=[], metavar="P@S",
                   help="SIGKILL process P right after it commits step S")
    p.add_argument("--restart", action="append", default=[], metavar="P@S",
                   help="start process P again once the survivors have committed step S; they wait for it at the "
                        "next boundary, where it rejoins")
    p.add_argument("--heartbeat", type=int, default=3,
                   help="jax.distributed heartbeat timeout in seconds: how long a dead process goes unnoticed")
    p.add_argument("--out", default="elastic_job", metavar="DIR", help="metrics, state and summary (default ./elastic_job)")
    p.add_argument("--timeout", type=float, default=900, help="give up after this many seconds (default 900)")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--incarnation", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--hold-after", type=int, help=argparse.SUPPRESS)
    p.add_argument("--wait-join", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--coordinator", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.worker is not None:
        worker(args)
        return 0
    if args.processes < 2 or args.devices_per_process < 1:
        print(f"{PROG}: error: need --processes >= 2 and --devices-per-process >= 1", file=sys.stderr)
        return 2
    try:
        summary = launch(args)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    for name, p in summary["processes"].items():
        if p["steps"]:
            print(f"process {name}: steps {p['steps'][0]}-{p['steps'][-1]}, loss {p['losses'][0]:.4f} -> "
                  f"{p['losses'][-1]:.4f}, devices {p['devices'][0]} -> {p['devices'][-1]}")
    for r in summary["recoveries"]:
        print(f"process {r['process']}: {r['event']} of process(es) {r['lost_or_joined_processes']} at step "
              f"{r['step']}: {r['cause_to_first_step_s']} s from the {'kill' if r['event'] == 'fail' else 'restart'} "
              f"to the first step after it (detect {r['detection_s']:.3f}, compile {r['compile_s']:.3f}, transfer "
              f"{r['transfer_s']:.3f}, first step {r['first_step_s']:.3f})")
    print(f"output: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
