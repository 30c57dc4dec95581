"""benchmarks/cluster.py on a small synthetic workload: the simulated sweep, goodput and targets
computed from its records, and the refusal of partial runs into benchmarks/results."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from conftest import ROOT
from test_cluster_sim import small_hw, workload

from jaxsys.serve.cluster.sim import goodput_rate


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cluster", ROOT / "benchmarks" / "cluster.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_records_and_targets(bench):
    rng = np.random.default_rng(0)
    wl = workload(rng.integers(20, 200, 80), rng.integers(1, 300, 80), noise=0.3)
    hw = small_hw(kv_capacity_tokens=3072, max_batch=16)
    args = bench.build_parser().parse_args(["--instances", "2", "4", "--loads", "0.5", "1.0", "1.5",
                                            "--requests-per-instance", "30", "--thresholds", "0.1", "--out", "x"])
    records, per_hw = bench.simulation_section(wl, {"test": hw}, args)
    assert len(records) == 6 and {r["instances"] for r in records} == {2, 4}
    for r in records:
        assert set(r["policies"]) == set(bench.POLICIES)
        best = min(r["policies"][n]["tpot_p99_s"] for n in bench.STATIC)
        assert r["p99_tpot_ours_over_best_static"] == pytest.approx(r["policies"]["ours"]["tpot_p99_s"] / best)
    targets, summary = bench.simulation_targets(records, per_hw)
    names = [t["name"] for t in targets]
    assert len(targets) == 4 and all("simulated" in n for n in names)
    ratios = [r["p99_tpot_ours_over_best_static"] for r in records]
    assert targets[0]["value"] == pytest.approx(math.exp(np.mean(np.log(ratios))))
    assert targets[0]["met"] == (targets[0]["value"] <= 0.5)
    assert per_hw["test"]["nominal_rate_per_instance"] == pytest.approx(bench.nominal_rate(wl, hw))


def test_goodput_rate_interpolates():
    assert goodput_rate([1, 2, 3], [1.0, 0.95, 0.85]) == (pytest.approx(2.5), True)
    assert goodput_rate([1, 2, 3], [1.0, 0.99, 0.95]) == (3.0, False)
    assert goodput_rate([1, 2], [0.5, 0.4]) == (0.0, True)


def test_partial_runs_must_not_write_into_results(bench, capsys):
    assert bench.main(["--skip-sim"]) == 2
    assert "pass --out" in capsys.readouterr().err
