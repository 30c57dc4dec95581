"""Elastic training across processes: a real 4-process `jax.distributed` job (CPU collectives
between the processes) loses a process to SIGKILL between steps, recovers on the survivors, takes
the restarted process back, and its losses, parameter checksums and final state are bitwise those
of the failure-free single-process run. Faults memory cannot repair stop the job with a checkpoint
that the launcher restarts it from, bitwise again: no layout of the survivors fits in the memory
limit, and the coordinator (process 0) is killed (the periodic checkpoint). Two processes lost at
once recover in memory when every shard keeps a copy, else from the periodic checkpoint; so does
a second loss while the survivors plan a recovery, and one inside the recovery's collectives (the
transfer, the first step on the new layout) stops the job with the checkpoint of the copies the
survivors hold. The transfer program is checked on its own against the plan it runs (8 virtual
devices, one process); the launcher's schedule (several losses at one boundary, the kill points
inside a recovery) without any process."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxsys.train.config import load_config
from jaxsys.train.elastic import canonical
from jaxsys.train.elastic.launch import ProcessEvent, check_schedule, main, parse_process_events
from jaxsys.train.elastic.layout import FlatLayout
from jaxsys.train.elastic.multiprocess import TransferRounds, make_transfer, step_memory_bytes
from jaxsys.train.elastic.planner import plan_transfers
from jaxsys.train.elastic.runtime import ElasticStep
from jaxsys.train.trainer import Trainer

OVERRIDES = ["steps=14", "data.global_batch=16", "data.micro_batches=8", "data.seq_len=16"]


def _held(layout: FlatLayout, flat_3xP: np.ndarray, replica_3xP: np.ndarray, new_ids, lost) -> np.ndarray:
    """[N', 2, 3, S] what each device of the new mesh holds of the old layout."""
    S, P = layout.shard_size, flat_3xP.shape[1]
    pad = lambda x: np.pad(x, ((0, 0), (0, layout.n * S - P)))  # noqa: E731
    prim, rep = pad(flat_3xP), pad(replica_3xP)
    out = np.zeros((len(new_ids), 2, 3, S), np.float32)
    for j, d in enumerate(new_ids):
        if d in lost or d not in layout.device_ids:
            continue
        k = layout.index_of(d)
        out[j, 0] = prim[:, k * S:(k + 1) * S]
        r = (k - layout.replica_shift) % layout.n  # the shard whose replica device d holds
        out[j, 1] = rep[:, r * S:(r + 1) * S]
    return out


@pytest.mark.parametrize("shift,lost", [(2, (4, 5)), (2, (2, 3)), (1, (3,)), (2, ())])
def test_transfer_program_builds_the_new_layout_exactly(shift, lost):
    """Shrink (a process's two devices lost; replicas two devices on) and grow (nothing lost, all
    back): every new shard equals the same range of the flat vector, bit for bit."""
    devs = jax.devices()
    P = 10_007
    rng = np.random.default_rng(0)
    flat = rng.standard_normal((3, P)).astype(np.float32)
    if lost:
        old_ids = tuple(d.id for d in devs)
        new_ids = [d for d in old_ids if d not in lost]
        held_replica = flat  # replicas hold the same values as the primaries
    else:
        old_ids = tuple(d.id for d in devs if d.id not in (4, 5))
        new_ids = [d.id for d in devs]
        held_replica = np.zeros_like(flat)
    old = FlatLayout(P, old_ids, shift)
    plan = plan_transfers(old, new_ids, list(lost), use_replicas=bool(lost))
    rounds = TransferRounds.from_plan(plan)
    new_devs = [d for d in devs if d.id in new_ids]
    mesh = canonical.layout_mesh(new_devs)
    held = _held(old, flat, held_replica, new_ids, set(lost))
    held_arr = jax.device_put(held, canonical.layout_sharding(mesh, canonical.TABLE_AXES))
    got = np.asarray(make_transfer(rounds, mesh)(held_arr))
    assert np.array_equal(got[:, :P], flat)
    assert not got[:, P:].any()
    assert rounds.network_elements() >= plan.network_elements()


def test_schedule_naming_unknown_or_coordinator_process_is_rejected():
    kills = parse_process_events(["2@3"], "kill")
    check_schedule(kills, parse_process_events(["2@6"], "restart"), processes=4, steps=10)
    for kill, restart, match in [(["4@3"], [], "processes 0-3"), (["0@3"], [], "ends every process"),
                                 (["2@30"], [], "steps 0-9"), (["2@3"], ["1@5"], "never killed"),
                                 (["2@3"], ["2@3"], "after its kill"),
                                 (["1@2,2@2"], [], "processes 1 and 2 are neighbours")]:
        with pytest.raises(ValueError, match=match):
            check_schedule(parse_process_events(kill, "kill"), parse_process_events(restart, "restart"),
                           processes=4, steps=10)
    with pytest.raises(ValueError, match="PROCESS@STEP"):
        parse_process_events(["two@3"], "kill")


def test_kill_points_inside_a_recovery_parse_and_print():
    got = parse_process_events(["3@recovery:4,2@transfer:5", "1@step:6", "0@3"], "kill")
    assert got == [ProcessEvent(3, 4, "recovery"), ProcessEvent(2, 5, "transfer"), ProcessEvent(1, 6, "step"),
                   ProcessEvent(0, 3)]
    assert [e.boundary for e in got] == [4, 5, 6, 4]
    assert [str(e) for e in got] == ["3@recovery:4", "2@transfer:5", "1@step:6", "0@3"]
    for bad, what in [("3@recover:4", "kill"), ("3@recovery:", "kill"), ("3@recovery:x", "kill"), ("3@4:5", "kill"),
                      ("2@recovery:5", "restart")]:
        with pytest.raises(ValueError, match="expected PROCESS@STEP"):
            parse_process_events([bad], what)


@pytest.mark.parametrize("kills,restarts,every", [
    (["1@3,3@3"], [], 0),  # not neighbours: every shard keeps a copy
    (["2@3,3@3"], [], 4),  # neighbours: the periodic checkpoint of step 4
    (["2@1", "1@3,3@3"], ["2@2"], 0),  # process 2 is back (boundary 3) when 1 and 3 go
    (["1@3", "3@recovery:4"], ["3@4"], 0),
    (["1@3", "3@transfer:4"], [], 0),
    (["2@3", "3@step:4"], [], 2),
])
def test_several_losses_at_one_boundary_are_accepted(kills, restarts, every):
    check_schedule(parse_process_events(kills, "kill"), parse_process_events(restarts, "restart"),
                   processes=4, steps=10, checkpoint_every=every)


@pytest.mark.parametrize("kills,restarts,every,match", [
    (["2@3,3@3"], [], 0, "processes 2 and 3 are neighbours"),
    (["3@3,0@3"], [], 0, "processes 3 and 0 are neighbours"),  # the ring wraps
    (["2@3,3@3"], [], 5, "set --checkpoint-every to at most 4"),
    (["2@1", "1@3,3@3"], [], 0, "processes 1 and 3 are neighbours"),  # with 2 gone, the ring is 0, 1, 3
    (["2@3", "3@recovery:4"], [], 0, "processes 2 and 3 are neighbours"),
    (["3@recovery:4"], [], 0, "no recovery at boundary 4"),
    (["1@2", "3@transfer:4"], [], 0, "no recovery at boundary 4"),
    (["1@3", "0@step:4"], [], 4, "the coordinator's loss ends the job"),
    (["0@3,1@3,2@3,3@3"], [], 4, "every process in service"),
    (["1@1", "0@3,2@3,3@3"], [], 4, "every process in service"),
    (["1@3", "3@recovery:4"], ["3@3"], 0, "must come after its kill"),
])
def test_several_losses_at_one_boundary_are_rejected(kills, restarts, every, match):
    with pytest.raises(ValueError, match=match):
        check_schedule(parse_process_events(kills, "kill"), parse_process_events(restarts, "restart"),
                       processes=4, steps=10, checkpoint_every=every)


@pytest.mark.parametrize("args,match", [(["--kill", "3@recovery:4"], "no recovery at boundary 4"),
                                        (["--kill", "3@recovery:x"], "expected PROCESS@STEP"),
                                        (["--collective-timeout", "0"], "--collective-timeout 0: expected > 0")])
def test_launcher_rejects_bad_kill_points_before_starting(args, match, tmp_path, capsys):
    out = tmp_path / "job"
    assert main(["--out", str(out), *args, *OVERRIDES]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_launcher_rejects_bad_schedule_before_starting(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jaxsys.train.elastic.launch", "--kill", "7@3", "--out",
                        str(tmp_path / "job"), *OVERRIDES], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "processes 0-3" in r.stderr
    assert not (tmp_path / "job" / "stderr0.0").exists()


@pytest.fixture(scope="module")
def reference():
    """The failure-free run: one process, 8 virtual devices, the elastic step."""
    cfg = load_config("tiny", OVERRIDES + ["progress=false"])
    tr = Trainer(cfg, program=ElasticStep(cfg, log=lambda m: None))
    res = tr.run()
    return res, tr.program.flat_state()


@pytest.mark.slow
def test_four_processes_kill_and_rejoin_bitwise_equal_to_failure_free(tmp_path, reference):
    res, state = reference
    out = tmp_path / "job"
    r = subprocess.run([sys.executable, "-m", "jaxsys.train.elastic.launch", "--processes", "4",
                        "--devices-per-process", "2", "--kill", "2@3", "--restart", "2@6", "--heartbeat", "3",
                        "--out", str(out), "--timeout", "600", *OVERRIDES], capture_output=True, text=True,
                       timeout=700)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    ref_loss = {rec.step: rec.loss for rec in res.records}
    ref_ck = {rec.step: rec.param_checksum for rec in res.records}
    procs = summary["processes"]
    assert procs["2.0"]["steps"] == [0, 1, 2, 3]  # killed right after step 3
    for name in ("0.0", "1.0", "3.0"):
        assert procs[name]["steps"] == list(range(14))
        assert procs[name]["devices"][:4] == [8] * 4 and procs[name]["devices"][4] == 6
        assert procs[name]["devices"][-1] == 8  # process 2 came back
    rejoined = procs["2.1"]
    assert rejoined["steps"] == list(range(7, 14))  # the survivors wait for it at boundary 7
    for name, p in procs.items():
        for s, loss, ck in zip(p["steps"], p["losses"], p["param_checksums"]):
            assert loss == ref_loss[s], (name, s, loss, ref_loss[s])
            assert ck == ref_ck[s], (name, s)
    assert np.array_equal(np.load(out / "state.npy").view(np.uint32), state.view(np.uint32))
    kinds = sorted({(x["event"], x["step"], tuple(x["lost_or_joined_processes"])) for x in summary["recoveries"]})
    assert kinds[0] == ("fail", 4, (2,))
    assert kinds[1] == ("join", 7, (2,))
    assert procs["0.0"]["devices"][:7] == [8] * 4 + [6] * 3 and procs["0.0"]["devices"][7:] == [8] * 7
    fails = [x for x in summary["recoveries"] if x["event"] == "fail"]
    assert len(fails) == 3 and all(x["elements_moved"] > 0 and x["cause_to_first_step_s"] > 0 for x in fails)


def _launch(out, *args) -> dict:
    r = subprocess.run([sys.executable, "-m", "jaxsys.train.elastic.launch", "--processes", "4",
                        "--devices-per-process", "2", "--heartbeat", "3", "--out", str(out), "--timeout", "600",
                        *args, *OVERRIDES], capture_output=True, text=True, timeout=700)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


def _assert_bitwise(summary: dict, out, reference) -> None:
    """Every committed step of every process, and the final state, are the failure-free run's."""
    res, state = reference
    ref = {rec.step: (rec.loss, rec.param_checksum) for rec in res.records}
    for name, p in summary["processes"].items():
        for s, loss, ck in zip(p["steps"], p["losses"], p["param_checksums"]):
            assert (loss, ck) == ref[s], (name, s)
    assert np.array_equal(np.load(out / "state.npy").view(np.uint32), state.view(np.uint32))


@pytest.mark.slow
def test_no_feasible_layout_and_coordinator_loss_restart_the_job_bitwise(tmp_path, reference):
    """Process 2 killed after step 3 under a memory limit that the 8 devices meet and the 6
    survivors' step does not: the survivors write the copies they hold of the state before step 4
    (process 2's shards from their replicas) and stop (status 75); the launcher restarts the job
    from that checkpoint on all 4 processes, no step lost. Then process 0, the coordinator, is
    killed after step 7: jax.distributed ends its peers, and the job restarts from the periodic
    checkpoint of step 6 (--checkpoint-every 3), running steps 6 and 7 again. Every committed
    step's loss and parameter checksum, and the final state, are bitwise the failure-free run's."""
    cfg = load_config("tiny", OVERRIDES)
    fits, survivors_need = (step_memory_bytes(cfg, jax.devices()[:n], replica_shift=2) for n in (8, 6))
    assert fits < survivors_need
    out = tmp_path / "job"
    summary = _launch(out, "--kill", "2@3", "--kill", "0@7", "--checkpoint-every", "3",
                      f"recovery.device_memory_gib={(fits + survivors_need) / 2 / 2**30:.9f}")
    procs = summary["processes"]
    for p in range(4):
        assert procs[f"{p}.0"]["steps"] == [0, 1, 2, 3]
        assert procs[f"{p}.1"]["steps"] == list(range(4, 8)) and procs[f"{p}.2"]["steps"] == list(range(6, 14))
        assert set(procs[f"{p}.1"]["devices"] + procs[f"{p}.2"]["devices"]) == {8}
    _assert_bitwise(summary, out, reference)
    first, second = summary["job_restarts"]
    assert first["resume_step"] == 4 and first["stopped_processes"] == [0, 1, 3]
    assert second["resume_step"] == 6 and second["stopped_processes"] == []
    assert first["cause_to_first_step_s"] > 0 and second["cause_to_first_step_s"] > 0
    assert "no layout of the 6 surviving devices fits" in (out / "stderr1.0").read_text()



def _assert_in_memory(summary: dict, lost: list[int]) -> None:
    """The processes `lost` at boundary 4 (after step 3 committed): the survivors went on on 4
    devices, no job restart."""
    procs = summary["processes"]
    assert summary["job_restarts"] == []
    for p in range(4):
        if p in lost:
            assert procs[f"{p}.0"]["steps"] == [0, 1, 2, 3]
        else:
            assert procs[f"{p}.0"]["steps"] == list(range(14))
            assert procs[f"{p}.0"]["devices"] == [8] * 4 + [4] * 10
    fails = [x for x in summary["recoveries"] if x["event"] == "fail"]
    assert len(fails) == 4 - len(lost)
    assert all(x["step"] == 4 and x["lost_or_joined_processes"] == lost and x["elements_moved"] > 0 for x in fails)


def _assert_restarted(summary: dict, *, resume: int, stopped: list[int]) -> None:
    """The job stopped at boundary 4 and restarted from the checkpoint of step `resume` on all 4
    processes."""
    procs = summary["processes"]
    (restart,) = summary["job_restarts"]
    assert restart["resume_step"] == resume and restart["stopped_processes"] == stopped
    assert restart["cause_to_first_step_s"] > 0
    for p in range(4):
        assert procs[f"{p}.0"]["steps"] == [0, 1, 2, 3]
        assert procs[f"{p}.1"]["steps"] == list(range(resume, 14)) and set(procs[f"{p}.1"]["devices"]) == {8}


@pytest.mark.slow
@pytest.mark.parametrize("kill,args,lost,resume", [
    ("1@3,3@3", [], [1, 3], None),  # the replicas of 1's shards live in 2, of 3's in 0
    ("2@3,3@3", ["--checkpoint-every", "3"], [2, 3], 3),  # shards 4 and 5 lose both copies
])
def test_two_processes_killed_at_one_step_bitwise(tmp_path, reference, kill, args, lost, resume):
    """Two processes SIGKILLed after step 3: not neighbours, the survivors hold a copy of every
    shard and go on in memory; neighbours, the survivors stop (their copies are incomplete) and
    the job restarts from the periodic checkpoint of step 3, running step 3 again. Bitwise the
    failure-free run either way."""
    out = tmp_path / "job"
    summary = _launch(out, "--kill", kill, *args)
    if resume is None:
        _assert_in_memory(summary, lost)
    else:
        _assert_restarted(summary, resume=resume, stopped=[0, 1])
        assert "is lost: every copy" in (out / "stderr0.0").read_text()
    _assert_bitwise(summary, out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("first,second,args,resume,stopped", [
    ("1@3", "3@recovery:4", [], None, None),  # planned again without 3: every shard keeps a copy
    ("2@3", "3@recovery:4", ["--checkpoint-every", "3"], 3, [0, 1]),  # 2 and 3: both copies of 4, 5
    ("1@3", "3@transfer:4", ["--collective-timeout", "20"], 4, [0, 2]),  # inside the transfer
    ("1@3", "3@step:4", ["--collective-timeout", "20"], 4, [0, 2]),  # inside the first step on 6 devices
])
def test_second_failure_during_recovery_bitwise(tmp_path, reference, first, second, args, resume, stopped):
    """Process 3 ends itself (os._exit) during the survivors' recovery from the loss of process
    1 or 2 at boundary 4. At the start of the recovery: the survivors find it gone when they meet
    and plan again from the copies they hold, in memory (1 and 3) or, with both copies of some
    shards gone (2 and 3), from the periodic checkpoint. Inside the transfer's or the first step's
    collectives: the survivors stop with the checkpoint of the copies of step 3's state that they
    hold in the old layout (complete: 1 and 3 are not neighbours) and the job resumes at step 4.
    Bitwise the failure-free run every time."""
    out = tmp_path / "job"
    summary = _launch(out, "--kill", first, "--kill", second, *args)
    log0 = (out / "stderr0.0").read_text()
    if resume is None:
        _assert_in_memory(summary, [1, 3])
        assert "process(es) [3] lost during the recovery from the loss of [1]" in log0
    else:
        _assert_restarted(summary, resume=resume, stopped=stopped)
        assert (resume == 3) == ("is lost: every copy" in log0)
        assert (resume == 4) == ("a peer died inside its collectives" in log0)
    assert f"exits at the {'start' if 'recovery' in second else second[2:-2]} of its recovery" in (
        out / "stderr3.0").read_text()
    _assert_bitwise(summary, out, reference)
