"""Orbax train-state checkpoints: a save killed midway leaves the last committed step restorable."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.train.checkpoint import CheckpointManager, abstract_like

N = 16_000_000  # 64 MB per array: the write takes long enough to be killed in the middle

SAVER = textwrap.dedent(f"""
    import os, signal, sys, threading, time
    import numpy as np
    import jax, jax.numpy as jnp
    from jaxsys.train.checkpoint import CheckpointManager

    d = sys.argv[1]
    mgr = CheckpointManager(d, keep=3, async_save=True)
    def state(v):
        return {{"params": {{"w": jnp.full(({N},), v, jnp.float32)}}, "count": jnp.int32(v)}}
    mgr.save(1, state(1.0), {{"note": "committed"}})
    mgr.wait()
    mgr.save(2, state(2.0), {{"note": "killed"}})   # async: returns while the write goes on
    print("KILL", sorted(os.listdir(d)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_killed_save_leaves_last_committed_step_restorable(tmp_path):
    d = tmp_path / "ck"
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", SAVER, str(d)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert "KILL" in p.stdout
    names = sorted(os.listdir(d))
    assert "1" in names and "2" not in names, names  # step 2 never committed...
    assert any(n.startswith("2.") and "tmp" in n for n in names), names  # ...it died midway
    with CheckpointManager(d) as mgr:
        assert mgr.latest_step() == 1 and mgr.all_steps() == [1]
        target = {"params": {"w": jax.ShapeDtypeStruct((N,), jnp.float32)}, "count": jax.ShapeDtypeStruct((), jnp.int32)}
        state, meta = mgr.restore(target)
        assert meta["note"] == "committed" and meta["step"] == 1
        assert int(state["count"]) == 1 and np.all(np.asarray(state["params"]["w"]) == 1.0)
        # and the run can go on: step 2 saves and commits over the debris
        mgr.save(2, {"params": {"w": jnp.full((N,), 2.0)}, "count": jnp.int32(2)}, {"note": "again"})
        mgr.wait()
        assert mgr.latest_step() == 2
        st2, _ = mgr.restore(abstract_like(state))
        assert np.all(np.asarray(st2["params"]["w"]) == 2.0)
