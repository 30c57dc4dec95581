"""Faults the multi-process elastic job cannot repair in memory, and bad schedules (fast parts).

* `ShardCheckpoints`, what the processes write without any coordination when the job must stop
  (no feasible layout) or every N steps: a checkpoint is complete only when every shard of one
  layout and its meta are there, whoever wrote them (a primary and its replica write the same
  file); an incomplete or torn one is never chosen, and files of another layout never mix in; a
  load gives back the exact bits.
* The launcher's schedule: the coordinator (process 0) may be killed (the job restarts from its
  last periodic checkpoint, so it needs one) but not restarted into the running job; a restart
  that the coordinator's loss would overtake is refused; two neighbouring processes killed at the
  same step need a periodic checkpoint; device schedules (`elastic.fail/join`, which name one process's
  devices), Orbax checkpoints and unknown processes are refused before any process starts.

The 4-process runs (no feasible layout, the coordinator killed; the
restarted job bitwise equal to the failure-free run) are in tests/test_elastic_multiprocess.py
(slow).
"""

import numpy as np
import pytest

from jaxsys.train.elastic.launch import check_schedule, main, parse_process_events
from jaxsys.train.elastic.layout import FlatLayout
from jaxsys.train.elastic.multiprocess import ShardCheckpoints
from jaxsys.train.elastic.planner import UnrecoverableError


def test_shard_checkpoints_are_complete_only_with_every_shard_and_load_exactly(tmp_path):
    P = 1001
    state_3xP = np.random.default_rng(0).standard_normal((3, P)).astype(np.float32)

    def shards(layout, ks):
        S = layout.shard_size
        padded = np.pad(state_3xP, ((0, 0), (0, layout.padded_size - P)))
        return {k: padded[:, k * S:(k + 1) * S] for k in ks}

    eight, four = FlatLayout(P, tuple(range(8)), 2), FlatLayout(P, (0, 1, 4, 5), 2)
    ck = ShardCheckpoints(tmp_path, every=2)
    ck.write(4, 7, eight, shards(eight, range(4)))  # one survivor's copies
    assert not ck.complete(4) and ck.latest() is None
    ck.write(4, 7, eight, shards(eight, (2, 3, 4, 5, 6, 7)))  # another's, with replicas of 2 and 3
    assert ck.complete(4) and ck.latest() == 4

    ck.write(6, 9, eight, shards(eight, range(7)))  # shard 7's holders died before writing it
    (ck.path(6) / ".shard_00007-of-00008.npy.123.tmp").write_bytes(b"torn")
    assert not ck.complete(6) and ck.latest() == 4
    with pytest.raises(UnrecoverableError, match="no complete checkpoint of step 6"):
        ck.load(6)
    ck.write(6, 9, four, shards(four, range(4)))  # a restarted job on 4 devices: its own files
    assert ck.latest() == 6

    for step, count in ((4, 7), (6, 9)):
        got_3xP, got_count = ck.load(step)
        assert got_count == count and got_3xP.shape == (3, P)
        assert np.array_equal(got_3xP.view(np.uint32), state_3xP.view(np.uint32))
    assert ck.due(4) and not ck.due(5) and not ShardCheckpoints(tmp_path).due(4)


@pytest.mark.parametrize("kills,restarts,every", [
    (["0@3"], [], 4),  # the coordinator: the periodic checkpoint of step 4
    (["2@2", "0@5"], ["2@4"], 2),
    (["0@3", "2@6"], ["2@8"], 3),  # a kill and restart in the restarted job
])
def test_schedules_that_stop_the_job_are_accepted(kills, restarts, every):
    check_schedule(parse_process_events(kills, "kill"), parse_process_events(restarts, "restart"),
                   processes=4, steps=10, checkpoint_every=every)


@pytest.mark.parametrize("kills,restarts,every,match", [
    (["0@3"], [], 0, "jax.distributed ends every process when the coordinator"),
    (["0@3"], [], 5, "set --checkpoint-every to at most 4"),
    (["0@3"], ["0@6"], 2, "restarts the whole job"),
    (["2@2", "0@5"], ["2@5"], 2, "still be down when process 0 is killed at step 5"),
    (["1@3", "2@3"], [], 5, "processes 1 and 2 are neighbours"),
])
def test_schedules_that_stop_the_job_are_rejected(kills, restarts, every, match):
    with pytest.raises(ValueError, match=match):
        check_schedule(parse_process_events(kills, "kill"), parse_process_events(restarts, "restart"),
                       processes=4, steps=10, checkpoint_every=every)


@pytest.mark.parametrize("args,match", [
    (["elastic.fail=9@2"], "elastic.fail/elastic.join schedule one process's devices"),
    (["elastic.join=1@2"], "elastic.fail/elastic.join schedule one process's devices"),
    (["checkpoint.dir=/tmp/x"], "unset checkpoint.dir"),
    (["--kill", "0@3", "--restart", "0@5", "--checkpoint-every", "2"], "restarts the whole job"),
    (["--kill", "0@3"], "set --checkpoint-every to at most 4"),
    (["--kill", "5@3"], "processes 0-3"),
    (["--checkpoint-every", "-1"], "--checkpoint-every -1"),
])
def test_launcher_rejects_bad_input_before_any_process_starts(args, match, tmp_path, capsys):
    out = tmp_path / "job"
    assert main(["--out", str(out), "steps=6", *args]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
