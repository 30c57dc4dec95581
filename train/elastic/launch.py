"""Run an elastic training job as several `jax.distributed` processes on this machine, kill and
restart processes on a schedule, restart the job from its checkpoint when it stops, and report how
the job recovered.

    python -m jaxsys.train.elastic.launch --config tiny --processes 4 --devices-per-process 2 \\
        --kill 2@5 --restart 2@9 --out /tmp/job steps=12

Each process is a CPU JAX process with its own virtual devices, one process of one multi-controller
job (the coordination service runs in process 0); together they train with
`jaxsys.train.elastic.multiprocess.DistributedElasticStep`: the layout-invariant step over a mesh
spanning every process, CPU collectives between them. `--kill P@S` SIGKILLs process P right after
it commits step S (the process stops at that step boundary until the signal comes, so the kill
lands between steps; nothing tells the others). The survivors notice at their next boundary
(heartbeat timeout), rebuild the state from the copies they hold and go on. Several processes may
be killed after the same step (`--kill 1@3,3@3`). A second failure during a recovery is scheduled
with a kill point inside it: `--kill P@recovery:S` (process P ends itself, `os._exit`, as it
begins its recovery at boundary S from another loss, i.e. another process killed after step
S-1), `P@transfer:S` (once the survivors have met, before the transfer's collectives) and
`P@step:S` (before the first step on the new layout); the process ends at that point of its own
code, driven by its schedule, and its exit status is 137. `--restart P@S` starts
process P again once the survivors have committed step S; it joins the running job and receives
its share of the state from its peers. The survivors wait at boundary S+1 until the restarted
process has started and connected (Python, JAX and `jax.distributed` take seconds, tens of steps of
this tiny job), so it rejoins at a known step whatever the machine's speed.

Faults the job cannot repair in memory stop it with a checkpoint instead, and the launcher
restarts the whole job from the latest complete one (every process, a new coordination service),
as a cluster scheduler would. A loss after which no layout of the survivors fits in
`recovery.device_memory_gib`: the survivors write the copies they hold of the last committed step
under `<out>/checkpoints` and exit with status 75, and the restarted job resumes from there, no
step lost. The coordinator killed (`--kill 0@S`: `jax.distributed` ends every peer the moment its
coordination service goes) leaves the last periodic checkpoint, written every `--checkpoint-every
N` steps; the steps since it run again; so do neighbouring processes lost at one boundary
(the replicas of a process's shards live in the next process, so both copies of some shards go;
the schedule is refused without a periodic checkpoint to go back to). A loss inside a transfer's
or a step's collectives (`P@transfer:S`, `P@step:S`) stops the job, on the collective's error or
after `--collective-timeout` seconds, with the checkpoint of the copies the survivors hold of the
step before the recovery. Every way, the run is bitwise the failure-free one. A peer of a killed
coordinator that has not ended within the heartbeat timeout plus 60 s is ended by the launcher,
so the job never hangs.

Output (under --out): `metrics<P>.<incarnation>.jsonl` per process (the trainer's metrics lines,
recoveries in their `events`; a process's incarnation counts its starts, the job's restarts
included), `state.npy` (the final [3, P] params, Adam mu and nu, written by the first process in
service), `summary.json` (per process the committed steps, losses and parameter checksums; every
recovery and job restart with the time from its cause (the kill or restart) to the first step
after it and its breakdown), `checkpoints/`, and each process's stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

PROG = "python -m jaxsys.train.elastic.launch"
COLLECTIVE_TIMEOUT_S = 60.0
"""The default `--collective-timeout` (`DistributedElasticStep(collective_timeout_s=...)`)."""
COORDINATOR_GRACE_S = 60.0
"""How long, beyond the heartbeat timeout, the peers of a killed coordinator have to end (jax.distributed
ends them when its coordination service goes) before the launcher ends them."""


SCHEDULED_EXIT_CODE = 137
"""The exit status of a process that ends itself on the schedule (`--kill P@POINT:S`), as a
SIGKILLed one would report it in a shell."""


@dataclasses.dataclass(frozen=True)
class ProcessEvent:
    process: int
    step: int
    point: str = "commit"
    """Where a kill lands: "commit" (SIGKILL right after step `step` commits, between steps),
    "recovery" (the process ends itself, `os._exit`, as it begins its recovery at boundary `step`
    from another process's loss), "transfer" (it ends itself in that recovery once the survivors
    have met, before the transfer's collectives) or "step" (before the first step on the new
    layout)."""

    @property
    def boundary(self) -> int:
        """The step boundary at which the survivors find the loss (b: between steps b-1 and b)."""
        return self.step + 1 if self.point == "commit" else self.step

    def __str__(self) -> str:
        return f"{self.process}@{'' if self.point == 'commit' else self.point + ':'}{self.step}"


RECOVERY_POINTS = {"recovery": "start", "transfer": "transfer", "step": "step"}
"""Kill points inside a recovery -> the `DistributedElasticStep.on_recovery` point they end at."""


def parse_process_events(specs: Sequence[str], what: str) -> list[ProcessEvent]:
    """`P@S[,P@S...]` items -> events (form only; `check_schedule` checks them against the job).
    A kill may also be `P@recovery:S`, `P@transfer:S` or `P@step:S`: process P ends itself at that
    point of its recovery at boundary S (a second failure while the survivors recover from a first)."""
    out = []
    for item in (p.strip() for spec in specs for p in spec.split(",")):
        if not item:
            continue
        try:
            p, s = item.split("@")
            point, _, s = s.rpartition(":")
            if (point and point not in RECOVERY_POINTS) or (point and what != "kill"):
                raise ValueError
            out.append(ProcessEvent(int(p), int(s), point or "commit"))
        except ValueError:
            forms = ("PROCESS@STEP or PROCESS@POINT:STEP (POINT: recovery, transfer, step), e.g. 2@5" if what == "kill"
                     else "PROCESS@STEP, e.g. 2@5")
            raise ValueError(f"--{what} {item!r}: expected {forms}") from None
    return out


def _in_service(kills: list[ProcessEvent], restarts: list[ProcessEvent], processes: int, boundary: int) -> list[int]:
    """The processes in service as the survivors meet at `boundary`, before its losses: those not
    lost at an earlier boundary, or back (a process restarted after step S rejoins at S+1)."""
    out = []
    for p in range(processes):
        k = next((e for e in kills if e.process == p), None)
        r = next((e for e in restarts if e.process == p), None)
        if k is None or k.boundary >= boundary or (r is not None and r.step + 1 < boundary):
            out.append(p)
    return out


def check_schedule(kills: list[ProcessEvent], restarts: list[ProcessEvent], *, processes: int, steps: int,
                   checkpoint_every: int = 0) -> None:
    """Reject a schedule the job cannot run, before any process starts.

    Several processes may be lost at one boundary (killed after the same step, or one ended in
    the recovery from another's loss). Where two of them are neighbours in the order of the
    processes in service (the replicas of a process's shards live in the next one), both copies of
    some shards go, and the job restarts from its last periodic checkpoint, so it needs one."""
    for what, events in (("kill", kills), ("restart", restarts)):
        for e in events:
            if not 0 <= e.process < processes:
                raise ValueError(f"--{what} {e}: the job has processes 0-{processes - 1}")
            if not 0 <= e.step < steps:
                raise ValueError(f"--{what} {e}: the run has steps 0-{steps - 1}")
    killed = [e.process for e in kills]
    if len(set(killed)) != len(killed):
        raise ValueError("--kill: a process can be killed once")

    def need_checkpoint(kill: str, boundary: int, why: str) -> None:
        if not checkpoint_every or checkpoint_every > boundary:
            raise ValueError(f"--kill {kill}: {why}, so the job restarts from its last periodic checkpoint; set "
                             f"--checkpoint-every to at most {boundary}")

    for e in kills:
        if e.point == "commit":
            continue
        if e.process == 0:
            raise ValueError(f"--kill {e}: the coordinator's loss ends the job wherever it lands (--kill 0@STEP)")
        if not any(k.point == "commit" and k.boundary == e.step for k in kills):
            raise ValueError(f"--kill {e}: no recovery at boundary {e.step}: kill another process after step "
                             f"{e.step - 1} (--kill Q@{e.step - 1})")
    for b in sorted({e.boundary for e in kills}):
        lost = sorted(e.process for e in kills if e.boundary == b)
        ring = _in_service(kills, restarts, processes, b)
        if set(ring) <= set(lost):
            raise ValueError(f"--kill: processes {lost} are every process in service at boundary {b}")
        pairs = [(p, q) for p, q in zip(ring, ring[1:] + ring[:1]) if p in lost and q in lost and p != q]
        if pairs:
            spec = ",".join(str(e) for e in kills if e.boundary == b)
            need_checkpoint(spec, b, f"processes {pairs[0][0]} and {pairs[0][1]} are neighbours (the replicas of "
                                     f"{pairs[0][0]}'s shards live in {pairs[0][1]}), lost together at boundary {b}")
    coordinator = next((e for e in kills if e.process == 0), None)
    if coordinator is not None:
        need_checkpoint(str(coordinator), coordinator.boundary, "jax.distributed ends every process when the "
                        "coordinator (process 0) dies")
    for r in restarts:
        if r.process == 0:
            raise ValueError(f"--restart 0@{r.step}: the loss of process 0 (the coordinator) restarts the whole job "
                             "from its checkpoint; there is no process 0 to restart into the running job")
        k = next((e for e in kills if e.process == r.process), None)
        if k is None:
            raise ValueError(f"--restart {r.process}@{r.step}: process {r.process} is never killed")
        if r.step < k.boundary:
            raise ValueError(f"--restart {r.process}@{r.step}: must come after its kill ({k})")
        if coordinator is not None and k.boundary < coordinator.boundary <= r.step + 1:
            raise ValueError(f"--restart {r.process}@{r.step}: process {r.process} would still be down when process 0 "
                             f"is killed at step {coordinator.step}, and the job restart brings it back; restart it "
                             f"before step {coordinator.step}")
    if len({e.process for e in restarts}) != len(restarts):
        raise ValueError("--restart: a process can be restarted once")


# ----------------------------------------------------------------------------- one process
def worker(args: argparse.Namespace) -> None:
    """One process of the job (started by `launch`)."""
    import jax

    def log(msg: str) -> None:
        print(f"[process {args.worker}] {msg}", file=sys.stderr, flush=True)

    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(args.coordinator, num_processes=args.processes, process_id=args.worker,
                               heartbeat_timeout_seconds=args.heartbeat, initialization_timeout=600)
    import numpy as np

    from jaxsys.train.config import TrainConfigError, load_config
    from jaxsys.train.elastic.multiprocess import (RESTART_EXIT_CODE, DistributedElasticStep, RestartFromCheckpoint,
                                                   ShardCheckpoints)
    from jaxsys.train.trainer import Trainer

    exit_at = parse_process_events([f"{args.worker}@{args.exit_at}"], "kill")[0] if args.exit_at else None

    class ScheduledExit(DistributedElasticStep):
        """This process ends itself at the point of its recovery that `--exit-at` names."""

        def on_recovery(self, point: str, step: int, lost: list[int]) -> None:
            if exit_at is not None and (RECOVERY_POINTS[exit_at.point], exit_at.step) == (point, step):
                log(f"step {step}: exits at the {point} of its recovery from the loss of process(es) {lost} "
                    f"(--kill {exit_at})")
                os._exit(SCHEDULED_EXIT_CODE)

    out = Path(args.out)
    cfg = load_config(args.config, list(args.overrides) + ["elastic.enabled=true", "progress=false"])
    program = ScheduledExit(cfg, log=log, resume=args.resume_step, collective_timeout_s=args.collective_timeout,
                            checkpoints=ShardCheckpoints(out / "checkpoints", every=args.checkpoint_every))
    trainer = Trainer(cfg, program=program)
    joins = parse_process_events(args.wait_join, "restart")

    def boundary(step: int, tr) -> None:
        if step == args.hold_after:  # the launcher's SIGKILL lands here, between steps
            (out / f"at_kill_point{args.worker}").touch()
            while True:
                time.sleep(1)
        for j in joins:
            if step == j.step:  # the restarted process checks in at the next boundary
                while not (out / f"ready{j.process}").exists():
                    time.sleep(0.05)

    try:
        trainer.setup()
        if program.joining:  # started, connected and set up: check in at the survivors' next boundary
            (out / f"ready{args.worker}").touch()
        else:
            program.compile()  # the memory check (recovery.device_memory_gib) before the first step
        trainer.run(metrics_out=out / f"metrics{args.worker}.{args.incarnation}.jsonl", on_step=boundary)
    except RestartFromCheckpoint as e:
        log(str(e))
        os._exit(RESTART_EXIT_CODE)
    except TrainConfigError as e:
        log(f"error: {e}")
        os._exit(2)
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


def _last_step(path: Path) -> int:
    return max((x["step"] for x in _committed(path)), default=-1)


def launch(args: argparse.Namespace) -> dict:
    """Start the job, run the kill/restart schedule, restart the job from its checkpoint when it
    stops for one, wait for the end; returns the summary."""
    from jaxsys.train.config import load_config
    from jaxsys.train.elastic.multiprocess import RESTART_EXIT_CODE, ShardCheckpoints, check_config

    cfg = load_config(args.config, list(args.overrides) + ["elastic.enabled=true"])
    check_config(cfg)
    kills = parse_process_events(args.kill, "kill")
    restarts = parse_process_events(args.restart, "restart")
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every {args.checkpoint_every}: expected >= 0")
    if args.collective_timeout <= 0:
        raise ValueError(f"--collective-timeout {args.collective_timeout:g}: expected > 0")
    check_schedule(kills, restarts, processes=args.processes, steps=cfg.steps, checkpoint_every=args.checkpoint_every)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file():
            f.unlink()
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    checkpoints = ShardCheckpoints(out / "checkpoints")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}")
    procs: dict[tuple[int, int], subprocess.Popen] = {}
    incarnation = {p: -1 for p in range(args.processes)}
    logs = []
    pending_kills, pending_restarts = list(kills), list(restarts)
    # the current job: its coordination service, the checkpoint it resumed from, its processes (keys of procs)
    job = {"coordinator": "", "resume": None, "members": set()}

    joiners: set[tuple[int, int]] = set()  # processes restarted into the running job (--restart)
    retired: set[tuple[int, int]] = set()  # processes of jobs that stopped and were restarted

    def start(p: int) -> None:
        incarnation[p] += 1
        key = (p, incarnation[p])
        log = open(out / f"stderr{p}.{key[1]}", "w")
        logs.append(log)
        cmd = [sys.executable, "-m", "jaxsys.train.elastic.launch", "--config", args.config, "--processes",
               str(args.processes), "--devices-per-process", str(args.devices_per_process), "--heartbeat",
               str(args.heartbeat), "--out", str(out), "--coordinator", job["coordinator"], "--checkpoint-every",
               str(args.checkpoint_every), "--collective-timeout", str(args.collective_timeout), "--worker", str(p),
               "--incarnation", str(key[1])]
        kill = next((k for k in pending_kills if k.process == p), None)
        if kill is not None:
            cmd += ["--hold-after", str(kill.step)] if kill.point == "commit" else ["--exit-at", f"{kill.point}:{kill.step}"]
        if job["resume"] is not None:
            cmd += ["--resume-step", str(job["resume"])]
        waits = [r for r in pending_restarts if r.process != p]
        if waits:
            cmd += ["--wait-join", ",".join(f"{r.process}@{r.step}" for r in waits)]
        procs[key] = subprocess.Popen(cmd + ["--"] + list(args.overrides), env=env, stdout=subprocess.DEVNULL,
                                      stderr=log)
        job["members"].add(key)

    def start_job(resume: int | None) -> None:
        retired.update(job["members"])  # their exits were judged when the job stopped
        job.update(coordinator=f"localhost:{_free_port()}", resume=resume, members=set())
        for p in range(args.processes):
            start(p)

    def tails() -> str:
        return "\n".join(f"--- process {p}.{i}:\n" + (out / f"stderr{p}.{i}").read_text()[-2000:]
                         for (p, i) in procs)

    times: dict[str, float] = {}
    killed: set[tuple[int, int]] = set()
    job_restarts: list[dict] = []
    t_start = time.time()
    start_job(None)
    try:
        while True:
            for r in list(pending_restarts):
                if f"kill{r.process}" not in times:
                    continue
                survivors = [key for key in job["members"] if key not in killed]
                done = min((_last_step(out / f"metrics{p}.{i}.jsonl") for p, i in survivors), default=-1)
                if done >= r.step:
                    pending_restarts.remove(r)
                    start(r.process)
                    joiners.add((r.process, incarnation[r.process]))
                    times[f"restart{r.process}"] = time.time()
            running = {key: pr.poll() for key, pr in procs.items()}
            for k in list(pending_kills):
                key = (k.process, incarnation[k.process])
                if k.point == "commit" and (out / f"at_kill_point{k.process}").exists():
                    procs[key].send_signal(signal.SIGKILL)
                elif not (k.point != "commit" and running[key] == SCHEDULED_EXIT_CODE):
                    continue
                killed.add(key)
                times[f"kill{k.process}"] = time.time()
                pending_kills.remove(k)
            members = {key: running[key] for key in job["members"]}
            # Process 0 hosts the job's coordination service: once it is killed, jax.distributed ends every
            # peer; one still running after the grace time is ended here.
            lost = next(key for key in job["members"] if key[0] == 0) in killed
            if lost and time.time() - times["kill0"] > args.heartbeat + COORDINATOR_GRACE_S:
                for key, rc in members.items():
                    if rc is None:
                        print(f"{PROG}: process {key[0]} did not stop after the coordinator's loss; ending it",
                              file=sys.stderr, flush=True)
                        procs[key].kill()
                        killed.add(key)
            crashed = [key for key, rc in running.items() if rc not in (None, 0, RESTART_EXIT_CODE)
                       and key not in killed and key not in retired and not (lost and key in members)]
            if crashed:
                raise RuntimeError(f"process(es) {crashed} failed:\n{tails()}")
            if all(rc is not None for rc in members.values()):
                stopped = sorted(key for key, rc in members.items() if rc == RESTART_EXIT_CODE)
                if not stopped and not lost and not pending_restarts:
                    if pending_kills:
                        raise RuntimeError(f"the job finished before --kill {', '.join(map(str, pending_kills))} "
                                           f"happened (no recovery at that boundary?):\n{tails()}")
                    break
                if stopped or lost:
                    if any(rc == 0 for rc in members.values()):
                        raise RuntimeError(f"process(es) {stopped} stopped for a restart from the checkpoint while "
                                           f"others finished:\n{tails()}")
                    step = checkpoints.latest()
                    if step is None:
                        raise RuntimeError(f"the job stopped to restart from its checkpoint, but "
                                           f"{checkpoints.directory} holds no complete checkpoint "
                                           f"(--checkpoint-every writes periodic ones):\n{tails()}")
                    if len(job_restarts) >= args.max_job_restarts:
                        raise RuntimeError(f"the job stopped again after {len(job_restarts)} restarts "
                                           "(--max-job-restarts)")
                    causes = [t for name, t in times.items() if name.startswith("kill")]
                    back = [r.process for r in pending_restarts if f"kill{r.process}" in times]
                    pending_restarts = [r for r in pending_restarts if r.process not in back]
                    job_restarts.append({"resume_step": step, "stopped_processes": [p for p, _ in stopped],
                                         "exit_codes": {str(p): rc for (p, _), rc in sorted(members.items())},
                                         "restarts_dropped": back, "cause_unix": max(causes, default=time.time()),
                                         "restart_unix": time.time()})
                    why = ("process 0 (the coordinator) was lost and jax.distributed ended its peers" if lost
                           else f"process(es) {[p for p, _ in stopped]} stopped the job")
                    print(f"{PROG}: {why} (exit codes {job_restarts[-1]['exit_codes']}); restarting all "
                          f"{args.processes} processes from the checkpoint of step {step}", file=sys.stderr,
                          flush=True)
                    start_job(step)
                    continue
            late = [key for key in joiners if running[key] is None and not (out / f"done{key[0]}").exists()]
            first = [key for key in job["members"] if key not in killed and key not in joiners]
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
    summary = summarize(out, procs.keys(), times, kills, restarts, job_restarts)
    summary["wall_s"] = round(time.time() - t_start, 3)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def summarize(out: Path, keys, times: dict[str, float], kills, restarts, job_restarts: list[dict]) -> dict:
    """Per process: committed steps, losses, checksums; per recovery and job restart: where the
    time went."""
    processes, recoveries = {}, []
    for jr in job_restarts:
        jr["processes"] = {}
    for p, inc in sorted(keys):
        lines = _committed(out / f"metrics{p}.{inc}.jsonl")
        processes[f"{p}.{inc}"] = {"steps": [x["step"] for x in lines], "losses": [x["loss"] for x in lines],
                                   "param_checksums": [x.get("param_checksum") for x in lines],
                                   "devices": [x["devices"] for x in lines]}
        for x in lines:
            for ev in x.get("events", []):
                if ev.get("event") == "resume":
                    jr = next(j for j in job_restarts if j["resume_step"] == ev["checkpoint_step"])
                    jr["processes"][f"{p}.{inc}"] = {k: ev[k] for k in ("load_s", "first_step_s")}
                    jr["first_step_unix"] = max(jr.get("first_step_unix", 0.0), ev["first_step_done_unix"])
                    jr["cause_to_first_step_s"] = round(jr["first_step_unix"] - jr["cause_unix"], 4)
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
            "processes": processes, "recoveries": recoveries, "job_restarts": job_restarts}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--config", default="tiny", metavar="NAME_OR_PATH", help="training config (default tiny)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--processes", type=int, default=4, help="jax.distributed processes (default 4)")
    p.add_argument("--devices-per-process", type=int, default=2, help="virtual CPU devices each (default 2)")
    p.add_argument("--kill", action="append", default=[], metavar="P@S",
                   help="SIGKILL process P right after it commits step S (P=0, the coordinator: the job restarts "
                        "from its checkpoint); several processes may be killed at one step. P@recovery:S: process "
                        "P ends itself (os._exit) as it begins the recovery at boundary S from another loss "
                        "(another process killed after step S-1); P@transfer:S: once the survivors have met, before "
                        "the transfer's collectives; P@step:S: before the first step on the new layout")
    p.add_argument("--restart", action="append", default=[], metavar="P@S",
                   help="start process P again once the survivors have committed step S; they wait for it at the "
                        "next boundary, where it rejoins")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="every process writes its shards every N steps under OUT/checkpoints (default 0: only when "
                        "the job stops, from the copies the survivors hold)")
    p.add_argument("--max-job-restarts", type=int, default=3,
                   help="give up when the job stops for a restart from its checkpoint more often (default 3)")
    p.add_argument("--heartbeat", type=int, default=3,
                   help="jax.distributed heartbeat timeout in seconds: how long a dead process goes unnoticed")
    p.add_argument("--collective-timeout", type=float, default=COLLECTIVE_TIMEOUT_S, metavar="SECONDS",
                   help="a transfer or step that takes longer means a peer died inside its collectives: the process "
                        f"stops the job with a checkpoint (default {COLLECTIVE_TIMEOUT_S:g})")
    p.add_argument("--out", default="elastic_job", metavar="DIR", help="metrics, state and summary (default ./elastic_job)")
    p.add_argument("--timeout", type=float, default=900, help="give up after this many seconds (default 900)")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--incarnation", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--hold-after", type=int, help=argparse.SUPPRESS)
    p.add_argument("--exit-at", help=argparse.SUPPRESS)
    p.add_argument("--resume-step", type=int, help=argparse.SUPPRESS)
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
    for jr in summary["job_restarts"]:
        print(f"job restarted from the checkpoint of step {jr['resume_step']} (stopped by process(es) "
              f"{jr['stopped_processes']}): {jr.get('cause_to_first_step_s')} s from the kill to its first step")
    print(f"output: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
