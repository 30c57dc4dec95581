"""The attention benchmarks as their users run them (subprocesses of the commands, never a script
loaded by path): the CPU record of `jaxsys bench attention`, and the GPU-only code checked on CPU so
that an error shows up here and not in a scarce GPU run (`--interpret`: our Pallas kernels, JAX's
own decode_attention and paged_attention, the sweeps, in the Pallas interpreter on shrunk trees;
timings mean nothing, every variant's output is checked against ours), the engine decode step,
the profiler's script, and every kernel launch lowered for CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(*argv, timeout=900) -> str:
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _attention(tmp_path, *extra) -> dict:
    out = tmp_path / "attention.json"
    _run(BENCH / "attention.py", "--repeats", "1", "--out", out, *extra)
    return json.loads(out.read_text())


def test_cpu_record_has_targets_and_provenance(tmp_path):
    """`jaxsys bench attention` on CPU (quick trees): every variant agrees with ours, the record
    carries commit, device, load average and the targets computed from its own records."""
    out = tmp_path / "attention.json"
    subprocess.run([sys.executable, "-m", "jaxsys.cli", "bench", "attention", "--quick", "--only", "C1,chain",
                    "--repeats", "1", "--out", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=900)
    doc = json.loads(out.read_text())
    assert doc["commit"] and doc["device"]["platform"] == "cpu" and set(doc["loadavg"]) == {"start", "end"}
    assert doc["phases"] == ["configs", "plan"] and doc["precisions"] == ["ieee"]
    assert {(r["variant"], r["label"]) for r in doc["records"]} >= {("ours", "C1 B=8 P=1024 S=16"), ("splitkv", "C4 chain"),
                                                                    ("naive", "C4 chain")}
    for r in doc["records"]:
        assert r["max_abs_diff_vs_ours"] < 1e-5, r
    ours = {r["label"]: r for r in doc["records"] if r["variant"] == "ours"}
    names = {t["name"]: t for t in doc["targets"]}
    c1 = names["C1 B=8 P=1024 S=16 vs split-KV"]
    assert c1["value"] == ours["C1 B=8 P=1024 S=16"]["speedup_vs_splitkv"] and c1["target"] == 1.5
    assert c1["met"] == (c1["value"] >= 1.5)
    geo = names["geomean vs split-KV, 2/4 configurations"]
    vals = [r["speedup_vs_splitkv"] for r in ours.values()]
    assert geo["value"] == pytest.approx((vals[0] * vals[1]) ** 0.5)
    assert {t["name"] for t in doc["targets"] if t["name"].startswith("host plan")} == {
        f"host plan / attention per decode step, {s['shape']['label']} [ieee]" for s in doc["plan"]}
    assert ours["C1 B=8 P=1024 S=16"]["plan"]["use_sharing"] and not ours["C4 chain"]["plan"]["use_sharing"]


@pytest.mark.slow  # 93 s on 2 cores (CI budget); `make gpu-check-dry` runs the same path
def test_gpu_path_in_the_interpreter(tmp_path):
    doc = _attention(tmp_path, "--interpret", "--only", "C1,chain", "--phases", "configs", "--precisions", "tf32",
                     "--launches")
    assert doc["interpret"] and doc["paths"]["ours"] == "Pallas kernels" and doc["tables_device_kind"] == "NVIDIA H200"
    variants = {r["variant"] for r in doc["records"]}
    assert variants == {"ours", "splitkv", "naive", "jax_decode_attention", "jax_paged_attention"}
    for r in doc["records"]:
        assert r["max_abs_diff_vs_ours"] < 1e-5, r
    ours = {r["label"]: r for r in doc["records"] if r["variant"] == "ours"}
    assert {label: r["plan"]["use_sharing"] for label, r in ours.items()} == {
        "C1 B=32 P=8192 S=128": True, "C4 chain (16 x 7 nodes, no sharing)": False}
    for label, r in ours.items():  # ours' launches timed one by one: the items only where it shares
        parts = r["launches"]
        assert set(parts) == ({"private_pages", "items", "merge"} if r["plan"]["use_sharing"] else {"private_pages", "merge"})
        assert all(t["median_s"] > 0 for t in parts.values()) and parts["private_pages"]["kv_bytes_read"] > 0
        assert r["speedup_vs_jax_best"] == pytest.approx(min(r["speedup_vs_jax_decode_attention"],
                                                             r["speedup_vs_jax_paged_attention"]))
    rows = ours["C1 B=32 P=8192 S=128"]["launches"]["items"]["query_row_tokens"]  # 32 requests x G=4 in 128 rows
    assert rows["useful"] == rows["computed"] == rows["full"] > 0
    assert any(t["name"].startswith("geomean vs JAX") for t in doc["targets"])


def test_a_spent_budget_keeps_the_starting_settings(tmp_path):
    """A spent budget runs no sweep: ours keeps the tables and JAX's kernels their defaults, every
    sweep listed as skipped, and the record still says so (a device call cut short has JSON)."""
    doc = _attention(tmp_path, "--interpret", "--phases", "tune,tune-baselines", "--tune-budget", "0",
                     "--precisions", "tf32x3")
    tuning = doc["tuning"]["tf32x3"]
    assert tuning["best"] == tuning["start"] == doc["ours"]["tf32x3"]["block_sizes"]
    assert tuning["skipped"] == ["split_pages", "split_tile", "split_min_programs", "items_shape", "items_tile",
                                 "row_tiers", "merge"]
    for name in ("jax_decode_attention", "jax_paged_attention"):
        base = doc["baseline_tuning"][name]
        assert base["best"] == base["start"] == doc["baseline_params"][name] and len(base["skipped"]) == 3
    assert doc["phases"] == ["tune", "tune-baselines"] and not doc["records"]


@pytest.mark.slow
def test_sweeps_then_configurations_in_a_second_call(tmp_path):
    """Every sweep of ours and JAX's kernels (one variant each beside the best so far) in one call,
    the configurations with their results in a second (`--tuned-from`: a GPU session split over
    two device calls)."""
    tuned = _attention(tmp_path, "--interpret", "--phases", "tune,tune-baselines", "--max-variants", "1",
                       "--precisions", "tf32")
    tuning = tuned["tuning"]["tf32"]
    assert not tuning["skipped"] and all(tuning["elapsed_s"][s] > 0 for s in tuning["sweeps"])
    for records in tuning["sweeps"].values():
        assert {r["variant"] for r in records} == {0, 1} and all(r["median_s"] or r.get("error") for r in records)
    first = tmp_path / "tuned.json"
    first.write_text(json.dumps(tuned))
    doc = _attention(tmp_path, "--interpret", "--phases", "configs", "--only", "C1", "--precisions", "tf32",
                     "--tuned-from", first)
    assert doc["ours"]["tf32"]["block_sizes"] == tuning["best"] and "tuned by the run" in doc["ours"]["tf32"]["source"]
    jax_paged = next(r for r in doc["records"] if r["variant"] == "jax_paged_attention")
    assert jax_paged["kernel_params"] == tuned["baseline_tuning"]["jax_paged_attention"]["best"]


@pytest.mark.slow
def test_engine_decode_step_in_the_interpreter(tmp_path):
    """`benchmarks/decode_step.py --interpret`: the engine's decode step with the Pallas kernel in the
    interpreter, sharing and not, planning timed inside the step, no compile after warm-up."""
    out = tmp_path / "decode_step.json"
    _run(BENCH / "decode_step.py", "--interpret", "--out", out)
    doc = json.loads(out.read_text())
    by = {r["variant"]: r for r in doc["records"]}
    assert by["shared"]["shared_steps"] == by["shared"]["steps_timed"] > 0 and by["noshare"]["shared_steps"] == 0
    assert by["shared"]["median_plan_s"] > 0 and all(r["compiles_after_warmup"] == 0 for r in by.values())
    assert {t["name"] for t in doc["targets"]} >= {"tiny: decode step, shared vs noshare"}


def test_kernels_lower_for_cuda_without_a_gpu():
    """Every launch, for every GPU table and the tile variants `make kernel-report` tries, lowers to
    Triton IR for CUDA here, as jax lowers it on a GPU: a lowering error shows up in CI."""
    lines = [json.loads(line) for line in _run(BENCH / "triton_static.py", "--lower-only").splitlines()
             if line.startswith("{")]
    assert {r["launch"] for r in lines} == {"shared_prefix_private_pages", "shared_prefix_items", "shared_prefix_merge"}
    assert len(lines) > 50 and {r["precision"] for r in lines} == {"tf32x3", "tf32"}


def test_profile_step_in_the_interpreter():
    """`benchmarks/profile_step.py` (what `make gpu-check` section profile runs under ncu)."""
    out = _run(BENCH / "profile_step.py", "--interpret", "--with-jax", "--config", "C1 B=32 P=8192 S=128")
    assert "sharing=True" in out and "ours:" in out and "jax_decode_attention:" in out
    proc = subprocess.run([sys.executable, BENCH / "profile_step.py", "--interpret", "--config", "C9"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown --config" in proc.stderr


def test_help_explains_the_phases():
    out = _run(BENCH / "attention.py", "--help")
    assert all(p in out for p in ("tune-baselines", "calibrate", "configs", "plan", "--tune-budget"))
    assert "--interpret" in _run(BENCH / "decode_step.py", "--help")
    proc = subprocess.run([sys.executable, BENCH / "attention.py", "--phases", "configs,warp"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown phase" in proc.stderr
