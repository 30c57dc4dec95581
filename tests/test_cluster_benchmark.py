"""`benchmarks/cluster.py` as a program: a partial run must not write into benchmarks/results
(the sweep itself is library code, tested in test_cluster_sweep.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

RESULT = ROOT / "benchmarks" / "results" / "cluster.json"


def _stat():
    return RESULT.stat().st_mtime_ns if RESULT.exists() else None


@pytest.mark.parametrize("argv", [["--skip-sim"], ["--instances", "4"], ["--requests-per-instance", "10"],
                                  ["--hardware", "h100-like"], ["--real-only"], ["--skip-real"],
                                  ["--real-requests", "8"]])
def test_partial_runs_must_not_write_into_results(argv):
    before = _stat()
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cluster.py"), *argv], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert "must not write into benchmarks/results; pass --out" in p.stderr
    assert _stat() == before
