"""`jaxsys bench gnn` end to end on a small slice: records, targets, the networkx check, the rules
for partial runs. The benchmark is run as the command a user runs, in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gnn.py"


def _bench(*args, cache=None):
    env = dict(os.environ, **({"JAXSYS_CACHE_DIR": str(cache)} if cache else {}))
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_partial_runs_must_write_elsewhere_and_bad_names_are_clear():
    run = _bench("--speed", "--datasets", "csl")
    assert run.returncode == 2 and "partial record" in run.stderr and "--out" in run.stderr
    run = _bench("--speed", "--datasets", "cls", "--out", "/nonexistent")
    assert run.returncode == 2 and "unknown dataset(s) ['cls']" in run.stderr
    run = _bench("--accuracy", "--models", "GCN", "--out", "/nonexistent")
    assert run.returncode == 2 and "unknown model(s) ['GCN']" in run.stderr


def test_speed_slice_checks_networkx_and_writes_a_full_record(tmp_path, shared_data):
    run = _bench("--speed", "--datasets", "sr25", "--repeats", "1", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "gnn_speed.json").read_text())
    for key in ("commit", "device", "loadavg", "noisy", "targets"):
        assert key in doc
    assert doc["complete"] is False
    cycles, pre = doc["records"]
    assert cycles["same_cycle_sets_as_networkx"] and cycles["graphs"] == 15 and cycles["cycles"]
    assert pre["same_relation_sets_as_networkx"] and pre["relations"]
    (t,) = doc["targets"]
    assert t["name"].startswith("sr25: chordless-cycle enumeration") and t["value"] == (
        cycles["speedup"]) and t["met"] == (cycles["speedup"] >= 5.0) and t["protocol"]


@pytest.mark.slow  # 42 s on 2 cores (CI budget)
def test_accuracy_target_uses_the_validation_selected_score(tmp_path, shared_data):
    run = _bench("--accuracy", "--datasets", "mutag", "--models", "CSGNN", "--max-epochs", "3",
                 "--max-folds", "2", "--out", str(tmp_path), cache=tmp_path / "cache")
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "gnn_accuracy.json").read_text())
    assert doc["finished"] is True and doc["complete"] is False
    (rec,) = doc["records"]
    assert rec["selected_on"] == "validation" and rec["folds_run"] == 2 and rec["epochs"] == 3
    (t,) = doc["targets"]
    assert t["value"] == rec["test_mean"] and t["target"] == 0.894
    assert "validation" in t["protocol"] and "Xu et al." in t["name"]
    (c,) = doc["comparisons"]  # Xu et al.'s test-fold selection: a comparison, not a target
    xu = rec["xu_protocol_test_selected"]
    assert xu["selected_on"] == "test folds" and c["value"] == xu["mean"]
    assert "test" in c["protocol"] and c["published_gin"] == 0.894
