"""The simulated sweep of `jaxsys bench cluster` (`jaxsys.serve.cluster.sweep`) on a small
synthetic workload: the nominal rate against its closed form, threshold tuning on the grid, one
row per cell with every policy on the same trace, goodput and the geometric-mean summary
computed from the rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from test_cluster_sim import small_hw, workload

from jaxsys.serve.cluster import sweep as sw
from jaxsys.serve.cluster.sim import goodput_rate


def test_nominal_rate_is_the_smaller_of_the_kv_and_batch_bounds():
    hw = small_hw(kv_capacity_tokens=3072, max_batch=16)
    wl = workload([100] * 4, [101] * 4)  # context 100 + 101 / 2 = 150.5 on average
    t_full = hw.step_a + hw.step_b * 16 + hw.step_c * 16 * 150.5
    assert sw.nominal_rate(wl, hw) == pytest.approx(16 / (100 * t_full))  # batch-bound: 3072 / 150.5 > 16
    tight = small_hw(kv_capacity_tokens=1024, max_batch=16)
    b = 1024 / 150.5
    t_kv = tight.step_a + tight.step_b * b + tight.step_c * 1024
    assert sw.nominal_rate(wl, tight) == pytest.approx(1024 / (100 * 150.5 * t_kv))
    shared = small_hw(kv_capacity_tokens=3072, max_batch=16, host_slowdown=[1.0, 1.2, 2.0])  # all 3 busy when full
    assert sw.nominal_rate(wl, shared) == pytest.approx(sw.nominal_rate(wl, hw) / 2.0)


def test_sweep_rows_goodput_and_summary():
    rng = np.random.default_rng(0)
    wl = workload(rng.integers(20, 200, 80), rng.integers(1, 300, 80), noise=0.3)
    hw = small_hw(kv_capacity_tokens=3072, max_batch=16)
    cfg = sw.SweepConfig(instances=(2, 4), loads=(0.5, 1.0, 1.5), requests_per_instance=30, thresholds=(0.05, 0.2))
    lines = []
    records, per_hw = sw.sweep(wl, {"test": hw}, cfg, log=lines.append)
    assert len(records) == 6 and [(r["instances"], r["load"]) for r in records] == [
        (2, 0.5), (2, 1.0), (2, 1.5), (4, 0.5), (4, 1.0), (4, 1.5)]
    h = per_hw["test"]
    assert h["nominal_rate_per_instance"] == pytest.approx(sw.nominal_rate(wl, hw))
    for name in sw.MIGRATING:  # the tuned threshold is the grid value with the lowest p99 TPOT
        by = h["threshold_tuning"][name]["p99_tpot_s_by_threshold"]
        assert set(by) == {"0.05", "0.2"} and h["thresholds"][name] == float(min(by, key=by.get))
    for r in records:
        p = r["policies"]
        assert set(p) == set(sw.POLICIES) and r["requests"] == 30 * r["instances"]
        assert r["rate_per_s"] == pytest.approx(r["load"] * h["nominal_rate_per_instance"] * r["instances"])
        assert all(p[n]["threshold"] == h["thresholds"].get(n) for n in sw.POLICIES)
        assert all(p[n]["finished"] == p[n]["requests"] for n in sw.POLICIES)
        best = min(p[n]["tpot_p99_s"] for n in sw.STATIC)
        assert r["p99_tpot_ours_over_best_static"] == pytest.approx(p["ours"]["tpot_p99_s"] / best)
        assert r["p99_tpot_ours_over_llumnix"] == pytest.approx(p["ours"]["tpot_p99_s"] / p["llumnix"]["tpot_p99_s"])
    # the same trace for every policy in a cell: the static policies serve the same requests
    for N in (2, 4):
        rows = [r for r in records if r["instances"] == N]
        for name in sw.POLICIES:
            want = goodput_rate([r["rate_per_s"] for r in rows], [r["policies"][name]["slo_attainment"] for r in rows])
            got = h["goodput"][N][name]
            assert (got["rate_per_s"], got["bounded_by_sweep"]) == (pytest.approx(want[0]), want[1])
    s = sw.summarize(records, per_hw)
    ratios = [r["p99_tpot_ours_over_best_static"] for r in records]
    assert s["p99_tpot_ours_over_best_static_geomean"] == pytest.approx(math.exp(np.mean(np.log(ratios))))
    g = [h["goodput"][N] for N in (2, 4) if N not in {int(x.split("=")[1]) for x in s["goodput_configs_skipped"]}]
    if g:
        want = [x["ours"]["rate_per_s"] / max(x[n]["rate_per_s"] for n in sw.STATIC) for x in g]
        assert s["goodput_ours_over_best_static_geomean"] == pytest.approx(math.exp(np.mean(np.log(want))))
    assert len(lines) == 1 + len(sw.MIGRATING) + 6 and "SIMULATED" in lines[0]


def test_summary_skips_configurations_without_goodput():
    row = {"p99_tpot_ours_over_best_static": 0.5, "p99_tpot_ours_over_llumnix": 2.0}
    zero = {n: {"rate_per_s": 0.0, "bounded_by_sweep": True} for n in sw.POLICIES}
    good = {n: {"rate_per_s": 2.0, "bounded_by_sweep": True} for n in sw.POLICIES} | {
        "ours": {"rate_per_s": 4.0, "bounded_by_sweep": True}}
    s = sw.summarize([row, {**row, "p99_tpot_ours_over_best_static": 2.0}], {"hw": {"goodput": {4: good, 16: zero}}})
    assert s["p99_tpot_ours_over_best_static_geomean"] == pytest.approx(1.0)
    assert s["p99_tpot_ours_over_llumnix_geomean"] == pytest.approx(2.0)
    assert s["goodput_ours_over_best_static_geomean"] == pytest.approx(2.0)
    assert s["goodput_configs_skipped"] == ["hw N=16"]


def test_sweep_config_rejects_bad_input():
    with pytest.raises(ValueError, match="instance counts"):
        sw.SweepConfig(instances=(0,))
    with pytest.raises(ValueError, match="loads"):
        sw.SweepConfig(loads=())
    with pytest.raises(ValueError, match="prefill"):
        sw.SweepConfig(prefill="both")
    assert sw.SweepConfig(requests_per_instance=300, max_requests=1000).requests(16) == 1000


def test_sweep_on_two_processes_gives_the_same_records():
    rng = np.random.default_rng(1)
    wl = workload(rng.integers(20, 200, 40), rng.integers(1, 200, 40), noise=0.3)
    hw = small_hw(kv_capacity_tokens=2048, max_batch=8)
    cfg = sw.SweepConfig(instances=(2, 3), loads=(0.8, 1.6), requests_per_instance=20, thresholds=(0.05, 0.2))

    def strip(records):
        return [{**r, "policies": {n: {k: v for k, v in p.items() if k != "wall_s"} for n, p in r["policies"].items()}}
                for r in records]

    one, per_one = sw.sweep(wl, {"test": hw}, cfg)
    two, per_two = sw.sweep(wl, {"test": hw}, cfg, workers=2)
    assert strip(one) == strip(two) and per_one == per_two
