"""Elastic training changes nothing in the numbers: bitwise equality with the failure-free run.

All runs use configs/train/tiny.yaml (dropout 0.1) on the 8 virtual CPU devices. Equality is
checked for real: every step's loss (float equality), every step's layout-independent parameter
checksum, and the full flat (params, Adam mu, Adam nu) state at several steps with
np.array_equal.
"""

import numpy as np
import pytest

from jaxsys.train.config import load_config
from jaxsys.train.elastic.runtime import BitFlip, ElasticStep
from jaxsys.train.trainer import Trainer

STEPS = 50
WATCH = (2, 5, 19, 20, 21, 39, 40, 49)
CFG = load_config("tiny", [f"steps={STEPS}", "elastic.precompile=scheduled", "progress=false"])


def _run(cfg, steps=None, **kw):
    """(the elastic step program, the run's result, {step: flat state after it})."""
    states = {}

    def watch(s, tr):
        if s in WATCH:
            states[s] = tr.program.flat_state()

    tr = Trainer(cfg, program=ElasticStep(cfg, log=lambda m: None, **kw))
    res = tr.run(steps, on_step=watch)
    tr.close()
    return tr.program, res, states


@pytest.fixture(scope="module")
def clean():
    return _run(CFG)


@pytest.fixture(scope="module")
def lose_and_regain():
    return _run(CFG.replace(**{"elastic.fail": "3@20", "elastic.join": "3@40"}))


def _assert_same_prefix(res_a, res_b, n):
    la, lb = res_a.losses[:n], res_b.losses[:n]
    assert la == lb, next((i, x, y) for i, (x, y) in enumerate(zip(la, lb)) if x != y)
    assert res_a.checksums[:n] == res_b.checksums[:n]


def test_lose_device_3_at_20_regain_at_40_is_bitwise_identical(clean, lose_and_regain):
    tr_a, res_a, st_a = clean
    tr_b, res_b, st_b = lose_and_regain
    assert len(res_a.records) == len(res_b.records) == STEPS
    _assert_same_prefix(res_a, res_b, STEPS)
    for s in WATCH:
        assert np.array_equal(st_a[s], st_b[s]), f"state differs after step {s}"
    pa, pb = tr_a.params(), tr_b.params()
    for x, y in zip(np.asarray(list(_leaves(pa)), dtype=object), list(_leaves(pb))):
        assert np.array_equal(x, y)
    # the failing run really ran on 7 devices in between, and lost no step
    devs = [r.num_devices for r in res_b.records]
    assert devs == [8] * 20 + [7] * 20 + [8] * 10
    kinds = [(r.kind, r.step, r.lost_steps) for r in tr_b.recoveries]
    assert kinds == [("fail", 20, 0), ("join", 40, 0)]
    assert tr_b.recoveries[0].devices_after == [0, 1, 2, 4, 5, 6, 7]
    assert tr_b.recoveries[0].elements_moved > 0
    # and it trains: dropout is on and the loss goes down
    assert res_a.records[0].loss > res_a.records[-1].loss + 0.1


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_torchft_style_averaging_differs(clean):
    """Negative control: survivors average their own gradients (the lost device's examples are
    dropped, the effective batch shrinks): the run departs from the failure-free one."""
    _, res_a, st_a = clean
    cfg = CFG.replace(**{"elastic.fail": "3@20", "elastic.policy": "torchft"})
    tr, res, st = _run(cfg, steps=22)
    _assert_same_prefix(res_a, res, 20)
    assert res.records[20].loss != res_a.records[20].loss
    assert res.checksums[20] != res_a.checksums[20]
    assert not np.array_equal(st[21], st_a[21])
    assert [r.num_devices for r in res.records[19:]] == [8, 7, 7]


@pytest.mark.parametrize("devices", [6, 1])
def test_same_bits_on_6_and_1_devices(clean, devices):
    """16 micro-batches on 6 devices (3,3,3,3,2,2) and on 1 device: same losses, dropout masks
    (dropout is on) and parameters as on 8."""
    _, res_a, st_a = clean
    tr, res, st = _run(CFG.replace(devices=devices), steps=3)
    assert {r.num_devices for r in res.records} == {devices}
    _assert_same_prefix(res_a, res, 3)
    assert np.array_equal(st[2], st_a[2])


def test_bit_flip_in_primary_is_detected_repaired_and_step_rerun(clean):
    _, res_a, st_a = clean
    flip = BitFlip(step=3, copy="primary", shard=2, row=0, index=17, bit=22)
    tr, res, st = _run(CFG, steps=6, faults=[flip])
    ev = [e for e in tr.events if e["event"] == "corruption_repaired"]
    assert len(ev) == 1 and ev[0]["step"] == 3 and ev[0]["bad_primary"] == [2] and ev[0]["bad_replica"] == []
    assert "repaired from the replica on device 3" in ev[0]["notes"][0]
    _assert_same_prefix(res_a, res, 6)
    assert np.array_equal(st[5], st_a[5])


def test_bit_flip_in_replica_is_detected_and_recopied(clean):
    _, res_a, _ = clean
    flip = BitFlip(step=2, copy="replica", shard=5, row=2, index=3, bit=0)
    tr, res, _ = _run(CFG.replace(**{"elastic.verify_every": 1}), steps=4, faults=[flip])
    ev = [e for e in tr.events if e["event"] == "corruption_repaired"]
    assert len(ev) == 1 and ev[0]["bad_replica"] == [5] and ev[0]["bad_primary"] == []
    _assert_same_prefix(res_a, res, 4)


def test_corrupted_copy_is_never_restored(clean, lose_and_regain):
    """Device 3 fails while the primary of shard 4 is corrupted: the recovery verifies the
    surviving copies first and rebuilds shard 4 from its replica on device 5."""
    _, res_a, st_a = clean
    cfg = CFG.replace(**{"elastic.fail": "3@20", "elastic.verify_every": 0})
    flip = BitFlip(step=20, copy="primary", shard=4, index=100, bit=30)
    tr, res, st = _run(cfg, steps=22, faults=[flip])
    assert any("primary of shard 4" in n for n in tr.recoveries[0].notes)
    _assert_same_prefix(res_a, res, 22)
    assert np.array_equal(st[21], st_a[21])


def test_adjacent_losses_fall_back_to_the_checkpoint(clean, tmp_path):
    """Devices 3 and 4 (ring neighbours: 4 holds 3's replica) fail together: no copy of shard 3
    survives in memory, so the run restores the last Orbax checkpoint onto the 6 survivors,
    loses the steps since, re-runs them, and still matches the failure-free run bit for bit."""
    _, res_a, st_a = clean
    cfg = CFG.replace(**{"elastic.fail": "3@20,4@20", "checkpoint.dir": str(tmp_path / "ck"),
                         "checkpoint.every": 8})
    tr, res, st = _run(cfg, steps=22)
    (rec,) = tr.recoveries
    assert rec.kind == "checkpoint" and rec.lost_steps == 4 and rec.devices_after == [0, 1, 2, 5, 6, 7]
    by_step = {r.step: r for r in res.records}  # steps 16-19 ran twice; the second time on 6 devices
    assert [r.step for r in res.records] == list(range(20)) + list(range(16, 22))
    assert [by_step[s].loss for s in range(22)] == res_a.losses[:22]
    assert np.array_equal(st[21], st_a[21])


@pytest.mark.slow  # two more step compiles (the replica memory kind is part of the program)
def test_replicas_in_pinned_host_memory(clean):
    """replica_memory=pinned_host (the default on accelerators that have it) recovers the same."""
    _, res_a, st_a = clean
    cfg = CFG.replace(**{"elastic.fail": "6@3", "elastic.replica_memory": "pinned_host",
                         "elastic.verify_every": 1})
    tr, res, st = _run(cfg, steps=6)
    assert tr.memory == "pinned_host" and tr.recoveries[0].lost_steps == 0
    assert tr._snap.replica.sharding.memory_kind == "pinned_host"
    _assert_same_prefix(res_a, res, 6)
    assert np.array_equal(st[5], st_a[5])
