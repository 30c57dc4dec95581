"""Elastic training across processes: a real 4-process `jax.distributed` job (CPU collectives
between the processes) loses a process to SIGKILL between steps, recovers on the survivors, takes
the restarted process back, and its losses, parameter checksums and final state are bitwise those
of the failure-free single-process run. Faults memory cannot repair stop the job with a checkpoint
that the launcher restarts it from, bitwise again: no layout of the survivors fits in the memory
limit, and the coordinator (process 0) is killed (the periodic checkpoint). The transfer program
is checked on its own against the plan it runs (8 virtual devices, one process)."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxsys.train.config import load_config
from jaxsys.train.elastic import canonical
from jaxsys.train.elastic.launch import check_schedule, parse_process_events
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
                                 (["1@2,3@2"], [], "one process per step")]:
        with pytest.raises(ValueError, match=match):
            check_schedule(parse_process_events(kill, "kill"), parse_process_events(restart, "restart"),
                           processes=4, steps=10)
    with pytest.raises(ValueError, match="PROCESS@STEP"):
        parse_process_events(["two@3"], "kill")


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

