"""The roofline tuner: a hand-computed step time, the direction of each effect, memory limits, and
the CLI's clear errors (cache below top-k, a draft vocabulary that differs, gamma outside the
compiled set, an unknown hardware file)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jaxsys.serve.moe_offload import cli
from jaxsys.serve.moe_offload import tuner as tu

HW = tu.HardwareSpec.model_validate({
    "name": "toy", "accelerator": {"flops": 1e12, "bandwidth": 1e11, "memory_bytes": 1e9},
    "link": {"bandwidth": 1e9}, "host": {"flops": 1e11, "bandwidth": 2e10, "memory_bytes": 1e10}})
M = tu.ModelShape(num_layers=2, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, vocab=100, num_experts=8,
                  top_k=2, expert_ffn=128)
W = tu.Workload(unique_experts={(1, 1): 2.0, (1, 4): 3.0, (4, 1): 6.0, (4, 4): 8.0},
                hit_rate={2: 0.25, 4: 0.5, 6: 0.75}, acceptance={"ngram": 0.8, "early_exit_1": 0.7},
                draft_layers={"ngram": 0, "early_exit_1": 1}, context=32)


def test_step_time_by_hand():
    plan = tu.Plan(gamma=0, batch=1, cache_slots=4, attention="device", draft="none")
    p = tu.predict(HW, M, W, plan, overlap=False)
    eb = 3 * 64 * 128 * 2.0
    fetch = 2.0 * (1 - 0.5) * eb / 1e9
    experts = max(2 * 3 * 64 * 128 * 1 * 2 / 1e12, 2.0 * eb / 1e11)
    dense = max(2 * M.dense_layer_bytes / 2.0 / 1e12, M.dense_layer_bytes / 1e11)
    S = 33
    attn = max(4 * S * 4 * 16 / 1e12, S * 2 * 2 * 16 * 2.0 / 1e11)
    head = max(2 * M.head_bytes / 2.0 / 1e12, M.head_bytes / 1e11)
    assert p.step_s == pytest.approx(2 * (fetch + experts + dense + attn) + head, rel=1e-12)
    assert p.tokens_per_step == 1.0 and p.tokens_per_s == pytest.approx(1 / p.step_s)


def test_speculation_amortizes_fetches_when_the_link_is_the_bottleneck():
    base = tu.predict(HW, M, W, tu.Plan(0, 1, 2, "device", "none"))
    spec = tu.predict(HW, M, W, tu.Plan(3, 1, 2, "device", "ngram"))
    assert spec.parts["unique_per_layer"] > base.parts["unique_per_layer"]  # more experts per step...
    assert spec.tokens_per_s > 1.5 * base.tokens_per_s  # ...but far fewer per token
    bigger = tu.predict(HW, M, W, tu.Plan(0, 1, 6, "device", "none"))
    assert bigger.tokens_per_s > base.tokens_per_s  # a larger cache misses less
    faster = tu.HardwareSpec.model_validate({**HW.model_dump(), "link": {"bandwidth": 1e12}})
    assert tu.predict(faster, M, W, tu.Plan(0, 1, 2, "device", "none")).tokens_per_s > base.tokens_per_s
    draft = tu.predict(HW, M, W, tu.Plan(3, 1, 2, "device", "early_exit_1"))
    assert draft.parts["draft_s"] > 0 and spec.parts["draft_s"] == 0


def test_choose_respects_memory_and_picks_the_fastest():
    small = tu.HardwareSpec.model_validate({**HW.model_dump(), "accelerator": {
        "flops": 1e12, "bandwidth": 1e11, "memory_bytes": 2 * M.dense_layer_bytes + 2 * M.head_bytes
        + 3 * 2 * M.expert_bytes}})
    plans = tu.candidate_plans(small, M, W, system="ours", gammas=(0, 1, 3), batches=(1, 4),
                               attentions=("device", "host"))
    assert plans and all(p.cache_slots <= 3 for p in plans)
    best = tu.choose(small, M, W, plans)
    assert best.tokens_per_s == max(tu.predict(small, M, W, p).tokens_per_s for p in plans
                                    if tu.predict(small, M, W, p).fits)
    assert tu.max_cache_slots(HW, M, tu.Plan(0, 1, 2, "device", "none"), 32) == 8


def test_workload_interpolates_and_rescales():
    assert W.unique(1, 1, 8) == 2.0 and W.unique(4, 4, 8) == 8.0
    assert 2.0 < W.unique(1, 2, 8) < 3.0
    assert W.hits(5, 8) == 0.5 and W.hits(8, 8) == 1.0 and W.hits(1, 8) == 0.0
    same = W.rescaled(8, 2, 8, 2)
    assert same.unique_experts == pytest.approx(W.unique_experts)
    fewer = W.rescaled(8, 1, 8, 2)
    assert all(fewer.unique_experts[k] < W.unique_experts[k] for k in W.unique_experts if W.unique_experts[k] < 8)
    assert fewer.unique_experts[(1, 1)] == pytest.approx(1.0)  # one token needs exactly its top-k
    half = dataclasses.replace(W, unique_experts={(1, 1): 4.0, (1, 4): 6.9, (4, 4): 8.0})
    mixtral_like = half.rescaled(8, 2, 8, 4)  # the MoEfied model's top-4 of 8 carried to top-2 of 8
    assert mixtral_like.unique_experts[(1, 1)] == pytest.approx(2.0) and mixtral_like.unique_experts[(4, 4)] == 8.0
    assert 2.0 < mixtral_like.unique_experts[(1, 4)] < 6.9


def test_measured_tokens_per_step_replace_the_independent_acceptance_formula(tmp_path):
    from jaxsys.serve.speculative import expected_tokens_per_step

    measured = dataclasses.replace(W, tokens_per_step={"ngram": {3: 2.5}})
    plan = tu.Plan(3, 2, 2, "device", "ngram")
    by_formula, by_measure = tu.predict(HW, M, W, plan), tu.predict(HW, M, measured, plan)
    assert by_formula.tokens_per_step == pytest.approx(2 * expected_tokens_per_step(0.8, 3))
    assert by_measure.tokens_per_step == pytest.approx(2 * 2.5) and by_measure.step_s == by_formula.step_s
    other = tu.Plan(2, 1, 2, "device", "ngram")  # not measured at gamma 2: the formula
    assert tu.predict(HW, M, measured, other).tokens_per_step == pytest.approx(expected_tokens_per_step(0.8, 2))
    ev = json.loads(open(_stats_file(tmp_path)).read())
    ev["ngram"]["by_gamma"] = {"1": {"tokens_per_step": 1.4}, "3": {"tokens_per_step": 1.9}}
    w = tu.workload_from_evaluation(ev)
    assert w.tokens_per_step == {"ngram": {1: 1.4, 3: 1.9}} and w.step_tokens("ngram", 3) == 1.9
    assert w.rescaled(8, 1, 8, 2).step_tokens("ngram", 1) == 1.4


def test_tuner_errors():
    with pytest.raises(tu.TunerError, match="top-k"):
        tu.predict(HW, M, W, tu.Plan(0, 1, 1, "device", "none"))
    with pytest.raises(tu.TunerError, match="acceptance"):
        tu.predict(HW, M, W, tu.Plan(2, 1, 2, "device", "eagle"))
    with pytest.raises(tu.TunerError, match="compiled set"):
        tu.check_gamma(5, [0, 1, 2, 4])
    with pytest.raises(tu.TunerError, match="h100-pcie5.yaml"):
        tu.load_hardware("no-such-gpu.yaml")
    assert tu.load_hardware("h100-pcie5.yaml").link.bandwidth == 5e10
    assert tu.load_hardware("h100-pcie4").link.bandwidth < tu.load_hardware("h100-pcie5").link.bandwidth


def test_hardware_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\naccelerator: {flops: 1, bandwidth: 1, memory_bytes: 1, hbm: 3}\n"
                   "link: {bandwidth: 1}\nhost: {flops: 1, bandwidth: 1, memory_bytes: 1}\n")
    with pytest.raises(tu.TunerError, match="hbm"):
        tu.load_hardware(bad)


def _stats_file(tmp_path):
    ev = {"routing": {"unique_experts": {f"{b},{t}": u for (b, t), u in W.unique_experts.items()},
                      "lru_hit_rate": {str(c): h for c, h in W.hit_rate.items()}},
          "acceptance_teacher_forced": {"early_exit_1": {"greedy": 0.8, "sampled": 0.7}},
          "ngram": {"acceptance": 0.6},
          "model": {"num_experts": 8, "top_k": 2, "shape": dataclasses.asdict(M)}}
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps(ev))
    return str(path)


def test_cli_prints_a_plan_and_clear_errors(tmp_path, capsys):
    stats = _stats_file(tmp_path)
    assert cli.main(["--hardware", "h100-pcie5.yaml", "--stats", stats, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chosen"]["tokens_per_s"] > 0 and set(out["baselines"]) == {"offload", "fiddler", "moe-lightning"}
    assert cli.main(["--hardware", "h100-pcie4.yaml", "--stats", stats, "--model", "moefied-smollm2"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    for argv, msg in [(["--expert-cache", "1", "--model", "moefied-smollm2"], "smaller than top-k"),
                      (["--draft-vocab", "49152"], "vocabulary"),
                      (["--gamma", "5", "--gammas", "0,1,2,4"], "outside the compiled set"),
                      (["--model", "gpt-5"], "unknown --model")]:
        assert cli.main(["--hardware", "h100-pcie5.yaml", "--stats", stats, *argv]) == 2
        assert msg in capsys.readouterr().err
    assert cli.main(["--hardware", "h100-pcie5.yaml", "--stats", str(tmp_path / "none.json")]) == 2
    assert "moefy" in capsys.readouterr().err
