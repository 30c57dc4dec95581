"""Properties of the transfer planner, the layouts and the fixed-order norm plan (pure Python)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsys.train.elastic.canonical import NormPlan
from jaxsys.train.elastic.layout import FlatLayout, MicroBatchPlan, ceil_div
from jaxsys.train.elastic.planner import UnrecoverableError, check_plan, plan_transfers


def _simulate(plan, P):
    """Run the plan on numpy buffers; returns the new shards' contents."""
    old = plan.old
    full = np.arange(P, dtype=np.int64) + 1
    bufs = {}
    for k in range(old.n):
        a, b = old.shard_range(k)
        shard = np.zeros(old.shard_size, np.int64)
        shard[: b - a] = full[a:b]
        bufs[(k, "primary")] = bufs[(k, "replica")] = shard
    out = []
    for j, dst in enumerate(plan.new.device_ids):
        new = np.zeros(plan.new.shard_size, np.int64)
        for t in plan.for_destination(dst):
            assert t.src not in plan.lost
            new[t.dst_offset:t.dst_offset + t.length] = bufs[(t.shard, t.copy)][t.src_offset:t.src_offset + t.length]
        lo, hi = plan.new.shard_range(j)
        np.testing.assert_array_equal(new[: hi - lo], full[lo:hi])
        out.append(new)
    return out


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 12))
    P = draw(st.integers(1, 5000))
    ids = list(range(100, 100 + n))
    kind = draw(st.sampled_from(["loss", "join", "both"]))
    lost = []
    if kind in ("loss", "both") and n > 1:
        # any set of non-adjacent (ring) devices, not all
        cand = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=max(1, n // 2)))
        ring_ok = [i for i in cand if all((i + 1) % n != j and (j + 1) % n != i for j in cand if j != i)]
        lost = [ids[i] for i in sorted(set(ring_ok))][: n - 1]
    survivors = [d for d in ids if d not in lost]
    joiners = draw(st.lists(st.integers(200, 210), unique=True, max_size=4)) if kind in ("join", "both") else []
    new = survivors + joiners
    if draw(st.booleans()):
        new = draw(st.permutations(new))
    return FlatLayout(P, tuple(ids)), list(new), lost


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_plan_properties(sc):
    old, new_devices, lost = sc
    plan = plan_transfers(old, new_devices, lost)
    check_plan(plan)  # sources alive and holding the copy, disjoint complete coverage, <= ceil(P/N')
    bound = ceil_div(old.num_params, len(new_devices))
    for dst, n in plan.bytes_by_destination(itemsize=1).items():
        assert n <= bound
    assert all(t.src not in lost for t in plan.transfers)
    _simulate(plan, old.num_params)
    # a local copy is used whenever the destination holds the data
    for t in plan.transfers:
        if not t.local:
            holders = {old.primary_holder(t.shard), old.replica_holder(t.shard)} - set(lost)
            assert t.dst not in holders


def test_plan_single_loss_example():
    old = FlatLayout(1000, tuple(range(8)))
    plan = plan_transfers(old, [0, 1, 2, 4, 5, 6, 7], lost=[3])
    check_plan(plan)
    assert {t.copy for t in plan.transfers if t.shard == 3} == {"replica"}
    assert all(t.src == 4 for t in plan.transfers if t.shard == 3)  # the replica of 3 is on 4
    assert max(plan.bytes_by_destination(itemsize=1).values()) == ceil_div(1000, 7)


def test_plan_adjacent_loss_is_unrecoverable():
    old = FlatLayout(1000, tuple(range(8)))
    with pytest.raises(UnrecoverableError, match="shard 3"):
        plan_transfers(old, [0, 1, 2, 5, 6, 7], lost=[3, 4])
    # without replicas (a join from the live state) a lost primary is lost for good
    with pytest.raises(UnrecoverableError):
        plan_transfers(FlatLayout(10, (0, 1)), [1], lost=[0], use_replicas=False)


@given(st.integers(1, 64), st.integers(1, 16))
def test_microbatch_plans(M, N):
    plan = MicroBatchPlan.balanced(M, N)
    assert plan.active == tuple(range(M))
    counts = [len(a) for a in plan.assignment]
    assert max(counts) - min(counts) <= 1 and plan.slots == max(1, ceil_div(M, N))
    idx, active = plan.micro_to_slot()
    table = plan.slot_table().reshape(-1)
    assert all(table[idx[m]] == m for m in range(M)) and active.all()
    if N > 1:
        ft = plan.without_devices([0])
        assert set(ft.active) == set(range(M)) - set(plan.assignment[0])


def test_sixteen_on_six_is_uneven():
    assert [len(a) for a in MicroBatchPlan.balanced(16, 6).assignment] == [3, 3, 3, 3, 2, 2]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 9), st.sampled_from([1, 2, 8, 64, 1024]))
def test_norm_plan_covers_each_chunk_once(P, n, chunk):
    S = ceil_div(P, n)
    plan = NormPlan.make(P, n, S, chunk)
    owned = []
    for i in range(n):
        for r in range(plan.counts[i]):
            c = plan.starts[i] + r
            owned.append(c)
            start = i * S + plan.offsets[i] + r * chunk  # global start of the chunk device i sums
            assert start == c * chunk
            assert plan.offsets[i] + (r + 1) * chunk <= plan.ext_len
            assert plan.offsets[i] + (r + 1) * chunk <= S * (1 + plan.halo) or (c + 1) * chunk > n * S
        # the chunks a device reads are held by it or its `halo` successors
    assert sorted(owned) == list(range(plan.num_chunks))
    for c, g in enumerate(plan.gather_index):
        i, r = divmod(g, plan.rows)
        assert plan.starts[i] + r == c
