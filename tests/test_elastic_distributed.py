"""Membership from a real multi-process `jax.distributed` job: two local CPU processes over
localhost; one dies and comes back; the survivor's live-device check reports fail and join."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

WORKER = textwrap.dedent("""
    import json, os, sys, time
    pid, port, role, sync = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    import jax
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid,
                               heartbeat_timeout_seconds=3, initialization_timeout=120)
    from jaxsys.train.elastic.membership import DistributedMembership
    m = DistributedMembership(jax.devices())
    out = {"devices": [d.process_index for d in jax.devices()]}
    if role == "survivor":
        out["b1"] = [str(e) for e in m.check(1)]
        t0 = time.time()
        while time.time() - t0 < 60:            # until the peer's death shows
            out["b2"] = [str(e) for e in m.check(2)]
            if out["b2"]:
                break
            m._cached = None
            time.sleep(0.2)
        open(sync + ".b2", "w").close()  # the peer restarts only now: its death and return are two checks
        t0 = time.time()
        while not os.path.exists(sync) and time.time() - t0 < 120:
            time.sleep(0.05)
        out["b3"] = [str(e) for e in m.check(3)]
        # Process 0 hosts the coordination service: stay up until the rejoiner has printed its
        # result, or its side of the check can lose the service and abort before printing.
        t0 = time.time()
        while not os.path.exists(sync + ".done") and time.time() - t0 < 60:
            time.sleep(0.05)
    elif role == "dier":
        out["b1"] = [str(e) for e in m.check(1)]
    else:
        open(sync, "w").close()
        out["b3"] = [str(e) for e in m.check(3)]
        print("RESULT", json.dumps(out), flush=True)
        open(sync + ".done", "w").close()
        os._exit(0)
    print("RESULT", json.dumps(out), flush=True)
    os._exit(1 if role == "dier" else 0)
""")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _result(text: str) -> dict:
    line = next(x for x in text.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_live_device_check_reports_fail_and_join(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    port, sync = str(_port()), str(tmp_path / "rejoined")
    cmd = [sys.executable, "-c", WORKER]
    survivor = subprocess.Popen(cmd + ["0", port, "survivor", sync], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        dier = subprocess.run(cmd + ["1", port, "dier", sync], capture_output=True, text=True,
                              env=env, timeout=180)
        assert dier.returncode == 1 and _result(dier.stdout)["b1"] == []
        t0 = time.time()
        while not os.path.exists(sync + ".b2") and time.time() - t0 < 120:
            time.sleep(0.05)
        rejoin = subprocess.run(cmd + ["1", port, "rejoin", sync], capture_output=True, text=True,
                                env=env, timeout=180)
        out, _ = survivor.communicate(timeout=180)
    finally:
        survivor.kill()
    res = _result(out)
    assert res["devices"] == [0, 1]
    assert res["b1"] == []
    assert res["b2"] == ["fail 1@1"]  # process 1's device lost during step 1
    assert res["b3"] == ["join 1@3"]  # back from step 3
    assert _result(rejoin.stdout)["b3"] == []
