"""`benchmarks/attention.py --interpret`: the benchmark's GPU path (our Pallas kernels, JAX's own
decode_attention and paged_attention, the GPU tile sweeps) run in the Pallas interpreter on
shrunk trees, so a Python error there shows up here and not in a scarce GPU run. The timings
mean nothing; every variant's output is checked against ours."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "jaxsys_bench_attention", Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py")
attention = sys.modules[_SPEC.name] = importlib.util.module_from_spec(_SPEC)  # its dataclasses look it up
_SPEC.loader.exec_module(attention)


def _run(tmp_path, *extra):
    out = tmp_path / "attention_interpret.json"
    assert attention.main(["--interpret", "--repeats", "1", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_gpu_path_in_the_interpreter(tmp_path):
    doc = _run(tmp_path, "--only", "C1,chain", "--skip-tune", "--skip-calibration")
    assert doc["interpret"] and doc["paths"]["ours"] == "Pallas kernel"
    variants = {r["variant"] for r in doc["records"]}
    assert variants == {"ours", "splitkv", "naive", "jax_decode_attention", "jax_paged_attention"}
    for r in doc["records"]:
        assert r["max_abs_diff_vs_ours"] < 1e-5, r


@pytest.mark.slow
def test_gpu_sweeps_in_the_interpreter(tmp_path):
    doc = _run(tmp_path, "--only", "C1", "--tune-first", "--skip-calibration")
    tuning = doc["tuning"]
    for section in ("split_pages", "split_launch_tile", "min_split_programs", "chunk_pages_x_query_block",
                    "pages_per_compute_block_x_num_warps_x_num_stages", "prefetch", "fp32_dot"):
        assert tuning[section] and all(r.get("median_s") for r in tuning[section]), section
    assert doc["block_sizes"] == tuning["best"]
