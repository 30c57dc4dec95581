"""The GPU-only code of the attention benchmarks, checked on CPU so that an error shows up here and
not in a scarce GPU run: `benchmarks/attention.py --interpret` runs the GPU path (our Pallas
kernels, JAX's own decode_attention and paged_attention, the GPU tile sweeps) in the Pallas
interpreter on shrunk trees (timings mean nothing; every variant's output is checked against
ours), and `benchmarks/triton_static.py --lower-only` lowers every kernel launch for CUDA."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest


def _load(name):
    spec = importlib.util.spec_from_file_location(
        f"jaxsys_bench_{name}", Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


attention = _load("attention")
triton_static = _load("triton_static")


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
    # ours' launches timed one by one: the shared items where the step shares, never where not
    launches = {r["label"]: r["launches"] for r in doc["records"] if r["variant"] == "ours"}
    share = {r["label"]: r["plan"]["use_sharing"] for r in doc["records"] if r["variant"] == "ours"}
    assert share == {"C1 B=32 P=8192 S=128": True, "C4 chain (16 x 7 nodes, no sharing)": False}
    for label, parts in launches.items():
        assert set(parts) == ({"private_pages", "items", "merge"} if share[label] else {"private_pages", "merge"})
        assert all(t["median_s"] > 0 for t in parts.values())
        assert parts["private_pages"]["kv_bytes_read"] > 0
    rows = launches["C1 B=32 P=8192 S=128"]["items"]["query_row_tokens"]  # 32 requests x G=4 in 128 rows
    assert rows["useful"] == rows["computed"] == rows["full"] > 0


def test_tuning_budget_keeps_the_tables_and_says_what_it_skipped(tmp_path):
    """A spent budget runs no sweep: the run still writes its tuning (best = the tables it started
    from, every sweep listed as skipped), so a device call cut short has JSON to show."""
    doc = _run(tmp_path, "--tune-first", "--tune-budget", "0", "--skip-configs", "--skip-calibration")
    tuning = doc["tuning"]
    assert doc["tune_budget_s"] == 0 and tuning["best"] == doc["block_sizes"]
    assert tuning["skipped"] == ["split_pages", "split_launch_tile", "min_split_programs",
                                 "chunk_pages_x_query_block",
                                 "pages_per_compute_block_x_num_warps_x_num_stages", "prefetch", "row_tiers",
                                 "min_shared_items", "merge_block", "fp32_dot"]
    assert "split_pages" not in tuning and "tuning" in doc["elapsed_s"]


@pytest.mark.slow
def test_gpu_sweeps_in_the_interpreter(tmp_path):
    """The sweeps and the calibration in one call, the configurations with their results in a
    second (`--tuned-from`: a GPU session split over two device calls)."""
    tuned = _run(tmp_path, "--tune-first", "--skip-configs")
    tuning = tuned["tuning"]
    for section in ("split_pages", "split_launch_tile", "min_split_programs", "chunk_pages_x_query_block",
                    "pages_per_compute_block_x_num_warps_x_num_stages", "prefetch", "row_tiers", "min_shared_items",
                    "merge_block", "fp32_dot"):
        assert tuning[section] and all(r.get("median_s") for r in tuning[section]), section
        assert tuning["elapsed_s"][section] > 0, section
    assert not tuning["skipped"] and {"tuning", "calibration"} <= set(tuned["elapsed_s"])
    assert tuned["block_sizes"] == tuning["best"] and not tuned["records"]
    out = tmp_path / "tuned.json"
    out.write_text(json.dumps(tuned))
    doc = _run(tmp_path, "--tuned-from", str(out), "--only", "C1")
    assert doc["block_sizes"] == tuning["best"] and "tuned by the run" in doc["block_sizes_from"]
    assert doc["cost_model"]["shared_token_cost"] == tuned["calibration"]["derived_cost_model"]["shared_token_cost"]
    assert {r["variant"] for r in doc["records"]} >= {"ours", "jax_paged_attention"}


def test_kernels_lower_for_cuda_without_a_gpu(capsys):
    """Every launch, for every tuned GPU table and the tile variants `make kernel-report` and the GPU
    sweep try (stages, tiles, prefetch, shorter splits with their own tile), lowers to Triton IR
    for CUDA here, as jax lowers it on a GPU: a lowering error shows up in CI, not in a GPU run."""
    assert triton_static.main(["--lower-only"]) == 0
    launches = [json.loads(line)["launch"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert set(launches) == set(triton_static.LAUNCHES) and len(launches) > 50


def test_profile_step_in_the_interpreter(capsys):
    """`benchmarks/profile_step.py` (what `make gpu-check` section profile runs under ncu): ours on a
    sharing configuration and JAX's kernel, with tiles from the tables."""
    profile_step = _load("profile_step")
    assert profile_step.main(["--interpret", "--with-jax", "--config", "C1 B=32 P=8192 S=128"]) == 0
    out = capsys.readouterr().out
    assert "sharing=True" in out and "ours:" in out and "jax_decode_attention:" in out
    with pytest.raises(SystemExit):
        profile_step.main(["--interpret", "--config", "C9"])


def test_step_overhead_is_the_one_that_loses_least():
    """The balancer shares a step iff its saving exceeds the step overhead: the fitted overhead is
    the middle of the interval whose decisions lose the least time on steps timed both ways."""
    # (saving, t_plain, t_share): sharing wins exactly from 7000 on -> any overhead in [3000, 7000)
    cases = [(1000, 1.0, 2.0), (3000, 1.0, 1.5), (7000, 2.0, 1.0), (20000, 5.0, 1.0)]
    assert attention.min_regret_overhead(cases) == (5000.0, 0.0)
    assert attention.decision_loss(cases, 0.0) == 1.5 and attention.decision_loss(cases, 1e9) == 5.0
    # noisy: a small win at 2000 and a loss at 9000 on the wrong sides; no overhead decides all
    # six right, and [3000, 7000) loses least (0.1 + 0.5; [1000, 2000) would lose 0.5 + 0.5)
    noisy = cases + [(2000, 1.1, 1.0), (9000, 3.0, 3.5)]
    overhead, lost = attention.min_regret_overhead(noisy)
    assert (overhead, round(lost, 6)) == (5000.0, 0.6)
    assert attention.decision_loss(noisy, overhead) == pytest.approx(lost)
    # sharing always wins: below the smallest saving; never: a quarter above the largest
    assert attention.min_regret_overhead([(400, 2.0, 1.0), (800, 3.0, 1.0)]) == (200.0, 0.0)
    assert attention.min_regret_overhead([(400, 1.0, 2.0), (800, 1.0, 3.0)]) == (1000.0, 0.0)


def _star_points(tau, a_p, sigma, a_s, sizes=(2, 4), lengths=(1024, 4096, 8192), chunk=512):
    return [p for s in sizes for length in lengths for p in (
        {"mode": "plain", "s": s, "P": length, "request_tokens": s * length, "chunk_tokens": 0,
         "min_s": a_p + tau * s * length},
        {"mode": "share", "s": s, "P": length, "request_tokens": s * length,
         "chunk_tokens": -(-length // chunk) * chunk, "min_s": a_s + sigma * length})]


def test_fit_cost_model_recovers_a_linear_machine():
    """On times that are exactly linear, kappa is sigma / tau, and the overhead decides every
    calibration step as the times do."""
    points = _star_points(tau=1e-9, a_p=20e-6, sigma=0.5e-9, a_s=30e-6)
    record, model = attention.fit_cost_model(points)
    assert dict(model.shared_token_cost) == {2: 0.5, 4: 0.5}
    assert record["step_overhead_per_s"] == pytest.approx([10000.0, 10000.0])
    assert record["step_overhead_fit"]["lost_s"] == 0.0
    for c in record["step_overhead_fit"]["cases"]:
        assert (c["saving"] > record["step_overhead_fit"]["tokens"]) == (c["share_s"] < c["plain_s"]), c
        assert (c["saving"] > model.overhead(c["s"])) == (c["share_s"] < c["plain_s"]), c
    assert {s for s, _ in model.step_overhead_by_size} == {2, 4}


def test_fit_cost_model_per_item_size():
    """A machine whose sharing path costs more for bigger items: no single overhead decides all
    trees, one per item size does."""
    small = _star_points(tau=1e-9, a_p=20e-6, sigma=0.5e-9, a_s=22e-6, sizes=(2,))
    big = _star_points(tau=1e-9, a_p=20e-6, sigma=0.5e-9, a_s=60e-6, sizes=(8,))
    record, model = attention.fit_cost_model(small + big)
    assert record["step_overhead_fit"]["lost_s"] > 0
    assert all(f["lost_s"] == 0.0 for f in record["step_overhead_by_size_fit"].values())
    assert model.overhead(2) < model.overhead(8)
    for c in record["step_overhead_fit"]["cases"]:
        assert (c["saving"] > model.overhead(c["s"])) == (c["share_s"] < c["plain_s"]), c


def test_tuned_tf32_cost_model_is_the_fit_of_its_calibration():
    """The TF32 GPU cost model in tuned_block_sizes.py is what `fit_cost_model` derives from the
    calibration points stored with the run it cites, so the table and the code agree."""
    from jaxsys.pallas_kernels.shared_prefix_attention import get_cost_model

    doc = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results"
                      / "attention_gpu_tf32.json").read_text())
    _, fitted = attention.fit_cost_model(doc["calibration"]["points"])
    table = get_cost_model("gpu", "float32", "tf32")
    assert table.shared_token_cost == fitted.shared_token_cost
    assert table.step_overhead == fitted.step_overhead
    assert table.step_overhead_by_size == fitted.step_overhead_by_size


@pytest.mark.parametrize("name, dtype, fp32_dot", [("attention_gpu_tf32.json", "float32", "tf32"),
                                                   ("attention_gpu_bf16.json", "bfloat16", "auto"),
                                                   ("attention_gpu.json", "float32", "auto")])
def test_gpu_tables_decide_as_the_gpu_measured(name, dtype, fp32_dot):
    """The balancer with the GPU tables (host side, no GPU) shares in each configuration of the
    stored H200 run where sharing was measured faster than our plain kernel, and not where it was
    slower (the configurations that ran plain have no shared time to compare)."""
    import numpy as np

    from jaxsys.pallas_kernels import shared_prefix_attention as spa

    doc = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / name).read_text())
    bs, cost = spa.BlockSizes(**doc["block_sizes"]), spa.get_cost_model("gpu", dtype, fp32_dot)
    runs = {}
    for r in doc["records"]:
        runs.setdefault(r["label"], {})[r["variant"]] = r
    checked = 0
    for cfg in attention.configs(False):
        ours, plain = runs[cfg.label]["ours"], runs[cfg.label]["splitkv"]
        if not ours["plan"]["use_sharing"]:
            continue
        tree, _ = attention.build_tree(cfg, np.random.default_rng(0))
        plan = spa.plan_step(tree, block_sizes=bs, cost_model=cost)
        assert plan.use_sharing == (ours["median_s"] < plain["median_s"]), cfg.label
        checked += 1
    assert checked >= 8
