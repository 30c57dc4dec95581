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


ROWS = (1, 2, 4, 8, 16)
# one row is a matrix-vector product, a few rows a much slower general product: a jump, then flat
LAYER = (1.0e-3, 2.5e-3, 2.8e-3, 3.3e-3, 4.5e-3)


def _measured(**over) -> tu.MeasuredCompute:
    fields = dict(shape=tu.measured_shape(M), context=32, rows=ROWS, layer_decode_s=LAYER,
                  layer_verify_s=tuple(t * 0.9 for t in LAYER), ffn_fixed_s=(1e-4,) * 5,
                  expert_s=(2e-5, 5e-5, 6e-5, 8e-5, 1.2e-4), head_s=(5e-3, 20e-3, 22e-3, 25e-3, 30e-3))
    return tu.MeasuredCompute(**{**fields, **over})


def test_piecewise_compute_interpolates_its_points_and_is_monotone():
    for n, t in zip(ROWS, LAYER):
        assert tu.piecewise(ROWS, LAYER, n) == pytest.approx(t, rel=1e-12)
    assert tu.piecewise(ROWS, LAYER, 3) == pytest.approx((2.5e-3 + 2.8e-3) / 2)  # linear between points
    assert tu.piecewise(ROWS, LAYER, 32) == pytest.approx(4.5e-3 + 16 * (4.5e-3 - 3.3e-3) / 8)  # last slope on
    grid = [1 + i / 4 for i in range(4 * 63 + 1)]
    for times in (LAYER, _measured().head_s, (1.0, 1.0, 2.0, 2.0, 1.5)):
        prices = [tu.piecewise(ROWS, times, n) for n in grid]
        if all(b >= a for a, b in zip(times, times[1:])):
            assert all(b >= a for a, b in zip(prices, prices[1:]))
        assert min(prices) >= min(times) and prices[-1] >= times[-1]  # never below what was measured
    c = _measured()
    layer = [[c.layer(b, t) for t in range(1, 9)] for b in range(1, 9)]
    assert all(layer[b][t] <= layer[b + 1][t] and layer[b][t] <= layer[b][t + 1] for b in range(7) for t in range(7))
    assert c.layer(4, 1) == pytest.approx(LAYER[2]) and c.layer(1, 4) == pytest.approx(0.9 * LAYER[2])
    assert c.experts(4, 3.4, 8) == pytest.approx(1e-4 + 4 * 6e-5)  # rounds to 3, padded to its bucket of 4
    assert c.experts(4, 6, 6) == pytest.approx(1e-4 + 6 * 6e-5)  # buckets are capped at the slots
    assert c.experts(4, 7, 4) == pytest.approx(2e-4 + 8 * 6e-5)  # two groups: 4, then 3 padded to 4
    assert all(c.experts(n, u, 8) <= c.experts(n, u + 1, 8) <= c.experts(n + 1, u + 1, 8)
               for n in range(1, 20) for u in range(1, 8))


def test_measured_compute_prices_the_runners_device_steps():
    c = _measured()
    hw = tu.HardwareSpec.model_validate({**HW.model_dump(), "compute": c.model_dump()})
    for B, T, slots in [(1, 1, 4), (1, 4, 4), (4, 1, 2), (4, 4, 8)]:
        plan = tu.Plan(T - 1, B, slots, "device", "ngram" if T > 1 else "none")
        p = tu.predict(hw, M, W, plan, overlap=False)
        U = W.unique(B, T, 8)
        misses = max(U * (1 - W.hits(slots, 8)), U - slots)
        layer = misses * M.expert_bytes / 1e9 + c.layer(B, T) + c.experts(B * T, U, slots)
        assert p.step_s == pytest.approx(M.num_layers * layer + c.head(B * T), rel=1e-12)
    jump = tu.predict(hw, M, W, tu.Plan(1, 1, 8, "device", "ngram"), overlap=False)
    plain = tu.predict(hw, M, W, tu.Plan(0, 1, 8, "device", "none"), overlap=False)
    assert jump.step_s > 3 * plain.step_s  # the measured jump from 1 to 2 rows, which one FLOP rate cannot price
    for plan in (tu.Plan(0, 1, 4, "host", "none"), tu.Plan(0, 1, 4, "device", "none", system="fiddler")):
        assert tu.predict(hw, M, W, plan).step_s == tu.predict(HW, M, W, plan).step_s  # not what was measured
    other = dataclasses.replace(M, expert_ffn=256)
    with pytest.raises(tu.TunerError, match="measured compute"):
        tu.predict(hw, other, W, tu.Plan(0, 1, 4, "device", "none"))
    with pytest.raises(ValueError, match="increasing"):
        _measured(rows=(1, 4, 2, 8, 16))
    with pytest.raises(ValueError, match="head_s"):
        _measured(head_s=(1e-3,))


@pytest.mark.slow  # a real calibration: minutes on 2 cores
def test_measure_compute_times_the_runners_pieces():
    from jaxsys.models.config import ModelConfig
    from jaxsys.serve.moe_offload.machine import measure_compute

    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2,
                      num_kv_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16, model_type="qwen2_moe")
    c = measure_compute(cfg, rows=(1, 2), context=8, reps=2)
    assert c.rows == (1, 2) and c.context == 8
    assert c.shape == tu.measured_shape(tu.ModelShape.from_config(cfg))
    assert all(t > 0 for t in (*c.layer_decode_s, *c.layer_verify_s, *c.head_s))
    assert all(t >= 0 for t in (*c.ffn_fixed_s, *c.expert_s)) and c.experts(2, 4, 4) > 0
    hw = tu.HardwareSpec.model_validate({**HW.model_dump(), "compute": c.model_dump()})
    shape = tu.ModelShape.from_config(cfg)
    w = dataclasses.replace(W, unique_experts={(1, 1): 2.0, (1, 2): 3.0})
    assert tu.predict(hw, shape, w, tu.Plan(1, 1, 4, "device", "ngram")).parts["head_s"] == c.head(2)


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
