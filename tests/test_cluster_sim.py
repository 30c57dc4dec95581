"""The cluster simulator (issue 18 E): exact timings of a single request against the step model,
conservation under preemption and migration, rejection, the policies' dispatch, the prediction
tables, the predictor fallback (G), the step-model fit and the calibration on our engine."""

from __future__ import annotations

import numpy as np
import pytest

from jaxsys.serve.cluster import policies as pol
from jaxsys.serve.cluster.hardware import HardwareParams, fit_linear, h100_like, step_features
from jaxsys.serve.cluster.sim import SimConfig, simulate
from jaxsys.serve.cluster.workload import PredictionTable, Trace, Workload, poisson_trace

K = 8


def small_hw(**kw) -> HardwareParams:
    base = dict(name="test", calibrated_on="test numbers", step_a=0.01, step_b=0.001, step_c=1e-5,
                prefill_p0=0.02, prefill_p1=1e-4, kv_capacity_tokens=4096, page_size=16, max_batch=8,
                kv_bytes_per_token=1000, link_bytes_per_s=1e8, migration_latency_s=0.003, ttft_slo_s=1.0,
                tpot_slo_s=0.05)
    return HardwareParams(**{**base, **kw})


def workload(prompt_len, output_len, noise: float = 0.0, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    prompt_len, output_len = np.asarray(prompt_len), np.asarray(output_len)
    grids, truth = [], []
    for n in output_len:
        g = np.arange(0, n + 1, K)
        truth.append((n - g).astype(np.float32))
        grids.append(np.maximum((n - g) * np.exp(noise * rng.standard_normal(len(g))), 0))
    tables = {"ours": PredictionTable.from_grid(grids, K), "oracle": PredictionTable.from_grid(truth, K)}
    return Workload(prompt_len, output_len, np.zeros(len(prompt_len), np.int64), tables, 512)


def one(arrival=0.0) -> Trace:
    return Trace(np.array([arrival]), np.array([0]))


@pytest.mark.parametrize("prefill", ["disaggregated", "colocated"])
def test_single_request_timing_is_the_step_model(prefill):
    hw = small_hw()
    P, n = 100, 20
    r = simulate(workload([P], [n]), one(), hw, pol.RoundRobin(), SimConfig(1, prefill=prefill))
    ttft = hw.prefill_p0 + hw.prefill_p1 * P
    if prefill == "disaggregated":  # then the prompt's KV travels to the decode instance
        start = ttft + hw.migration_time(P)
    else:
        start = ttft
    steps = sum(hw.step_a + hw.step_b + hw.step_c * (P + 1 + j) for j in range(n - 1))
    assert r.ttft_s[0] == pytest.approx(ttft, rel=1e-9)
    assert r.tpot_s[0] == pytest.approx((start + steps - ttft) / (n - 1), rel=1e-9)
    assert r.finished.all() and r.preemptions == 0 and r.migrations == 0


def test_batched_requests_share_steps():
    """Two identical requests arriving together decode in the same steps (B = 2, twice the KV)."""
    hw = small_hw()
    P, n = 50, 10
    r = simulate(workload([P], [n]), Trace(np.zeros(2), np.zeros(2, np.int64)), hw, pol.LeastKV(),
                 SimConfig(1, prefill="colocated"))
    pre = hw.prefill_p0 + hw.prefill_p1 * 2 * P
    steps = sum(hw.step_a + 2 * hw.step_b + hw.step_c * 2 * (P + 1 + j) for j in range(n - 1))
    np.testing.assert_allclose(r.ttft_s, [pre, pre])
    np.testing.assert_allclose(r.tpot_s, [steps / (n - 1)] * 2)


def test_instances_sharing_a_host_slow_each_other_down():
    """host_slowdown: two instances busy at once step 1.5x slower, prefill included; an instance
    busy alone steps at its own cost; beyond the measured counts the last factor holds."""
    P, n = 50, 10
    wl = workload([P], [n])
    cfg = SimConfig(2, prefill="colocated")
    together = Trace(np.zeros(2), np.zeros(2, np.int64))  # round-robin: one request per instance
    alone = simulate(wl, together, small_hw(), pol.RoundRobin(), cfg)
    shared = simulate(wl, together, small_hw(host_slowdown=[1.0, 1.5]), pol.RoundRobin(), cfg)
    np.testing.assert_allclose(shared.ttft_s, 1.5 * alone.ttft_s, rtol=1e-12)
    np.testing.assert_allclose(shared.tpot_s, 1.5 * alone.tpot_s, rtol=1e-12)
    one_request = simulate(wl, one(), small_hw(host_slowdown=[1.0, 1.5]), pol.RoundRobin(), cfg)
    np.testing.assert_allclose(one_request.tpot_s, alone.tpot_s[:1], rtol=1e-12)
    hw = small_hw(host_slowdown=[1.0, 1.5])
    assert [hw.sharing_factor(k) for k in (1, 2, 3)] == [1.0, 1.5, 1.5]
    assert small_hw().sharing_factor(4) == 1.0
    with pytest.raises(ValueError, match="non-empty list of finite factors"):
        small_hw(host_slowdown=[])
    with pytest.raises(ValueError, match="non-empty list of finite factors"):
        small_hw(host_slowdown=[1.0, -2.0])


class _AllToFirst(pol.LlumnixStyle):
    """Llumnix's rebalancing after the worst possible dispatch: everything to instance 0."""

    def dispatch(self, cluster, rid):
        return 0


@pytest.mark.parametrize("policy", ["round_robin", "least_kv", "llumnix", "ours", "ours_oracle", "all_to_first"])
def test_nothing_is_lost_under_preemption_and_migration(policy):
    rng = np.random.default_rng(1)
    wl = workload(rng.integers(20, 200, 64), rng.integers(1, 300, 64), noise=0.3)
    hw = small_hw(kv_capacity_tokens=1536, max_batch=6)  # tight: forces preemptions
    trace = poisson_trace(wl.size, 40.0, 150, seed=2)
    p = _AllToFirst(threshold=0.05) if policy == "all_to_first" else pol.make_policy(policy)
    r = simulate(wl, trace, hw, p, SimConfig(3))
    assert r.finished.all() and not r.rejected.any()
    assert np.all(r.ttft_s > 0) and np.all(np.isnan(r.tpot_s) == (wl.output_len[trace.entry] <= 1))
    assert r.preemptions > 0
    if policy in ("llumnix", "ours", "ours_oracle", "all_to_first"):
        assert r.migrations > 0 and r.migrated_bytes > 0
    else:
        assert r.migrations == 0


def test_migration_rescues_a_bad_dispatch():
    rng = np.random.default_rng(3)
    wl = workload(rng.integers(20, 100, 32), rng.integers(100, 300, 32))
    hw = small_hw(max_batch=64, kv_capacity_tokens=32768)
    trace = poisson_trace(wl.size, 50.0, 60, seed=4)
    stuck = simulate(wl, trace, hw, type("Stuck", (pol.RoundRobin,), {"dispatch": lambda s, c, r: 0})(), SimConfig(4))
    moved = simulate(wl, trace, hw, _AllToFirst(threshold=0.01), SimConfig(4))
    assert moved.migrations > 0
    assert moved.summary()["tpot_p50_s"] < 0.8 * stuck.summary()["tpot_p50_s"]


def test_request_too_large_is_rejected():
    hw = small_hw(kv_capacity_tokens=256)
    wl = workload([100, 50], [500, 20])
    r = simulate(wl, Trace(np.array([0.0, 0.01]), np.array([0, 1])), hw, pol.LeastKV(), SimConfig(2))
    assert r.rejected.tolist() == [True, False] and r.finished.tolist() == [False, True]
    assert r.summary()["rejected"] == 1


def test_dispatch_policies():
    wl = workload([10] * 4, [400] * 4)
    trace = Trace(np.array([0.0, 0.001, 0.002, 0.003]), np.arange(4))
    hw = small_hw(max_batch=8)
    rr = simulate(wl, trace, hw, pol.RoundRobin(), SimConfig(4, prefill="colocated"))
    lk = simulate(wl, trace, hw, pol.LeastKV(), SimConfig(4, prefill="colocated"))
    # spread over four instances, each request decodes alone: the same TPOT as one request alone
    alone = simulate(wl, one(), hw, pol.RoundRobin(), SimConfig(1, prefill="colocated"))
    np.testing.assert_allclose(rr.tpot_s, alone.tpot_s[0], rtol=1e-9)
    np.testing.assert_allclose(lk.tpot_s, alone.tpot_s[0], rtol=1e-9)


def test_predictive_without_predictions_falls_back_with_a_warning():
    wl = workload([30, 40], [50, 60])
    wl = Workload(wl.prompt_len, wl.output_len, wl.source, {}, 512)
    policy = pol.Predictive(predictor="ours")
    with pytest.warns(RuntimeWarning, match="balancing on current load only"):
        r = simulate(wl, poisson_trace(2, 10.0, 20), small_hw(), policy, SimConfig(2))
    assert r.finished.all() and not policy.uses_future


def test_prediction_table_counts_down_between_grid_points():
    t = PredictionTable.from_grid([np.array([100.0, 40.0]), np.array([5.0])], k=8)
    got = t.lookup(np.array([0, 0, 0, 0, 1, 1]), np.array([0, 3, 8, 30, 0, 9]))
    np.testing.assert_allclose(got, [100, 97, 40, 18, 5, 0])


def test_workload_from_length_data():
    from test_length_predictor import SMALL_HEADS, synthetic_data

    from jaxsys.serve.length import predictor as lp
    from jaxsys.serve.length.data import SPLITS

    data = synthetic_data(prompts=30, seeds=2)
    head, _ = lp.train_head(data, SMALL_HEADS[0])
    wl = Workload.from_length_data(data, {"ours": head}, split="test", k=K)
    test_gens = np.nonzero(data.prompt_split[data.gen_prompt] == SPLITS.index("test"))[0]
    assert wl.size == len(test_gens)
    np.testing.assert_array_equal(wl.output_len, data.gen_len[test_gens])
    e = 0
    gi = test_gens[e]
    rows = np.nonzero(data.gen == gi)[0]  # synthetic captures sit exactly on the grid
    direct = head.predict_features(data.hidden_layer[rows], data.g[rows])
    np.testing.assert_allclose(wl.tables["ours"].lookup(np.full(len(rows), e), data.g[rows]), direct, rtol=1e-5)
    np.testing.assert_allclose(wl.tables["oracle"].lookup(np.full(len(rows), e), data.g[rows]), data.remaining[rows])


def test_fit_linear_recovers_coefficients_and_reports_error():
    B = np.array([1, 2, 4, 8, 16, 32, 1, 8, 32])
    kv = np.array([100, 300, 800, 2000, 4000, 9000, 1000, 500, 20000])
    y = 0.005 + 2e-4 * B + 3e-7 * kv
    fit = fit_linear(step_features(B, kv), y)
    np.testing.assert_allclose(fit.coef, [0.005, 2e-4, 3e-7], rtol=1e-6)
    assert fit.mape < 1e-9
    noisy = fit_linear(step_features(B, kv), y * np.array([1.1, 0.9] * 4 + [1.0]))
    assert 0.01 < noisy.mape < 0.2 and noisy.max_rel_error >= noisy.mape


def test_hardware_params_validate():
    assert h100_like().kv_capacity_tokens > 100_000
    with pytest.raises(ValueError, match="finite number > 0"):
        small_hw(link_bytes_per_s=0)
    with pytest.raises(ValueError, match=">= 1"):
        small_hw(max_batch=0)
    with pytest.raises(ValueError, match="prefill must be one of"):
        SimConfig(2, prefill="both")


def test_calibration_on_our_engine():
    from serve_helpers import tiny_model

    from jaxsys.serve.cluster.calibrate import Calibration, cpu_calibrated, measure_engine

    cal = measure_engine(tiny_model(), batches=(1, 2), contexts=(16, 32), decode_tokens=10, prefill_lengths=(16, 48),
                         num_pages=32, max_batch=4, progress=False)
    assert len(cal.steps) == 4 and all(s.step_s > 0 for s in cal.steps)
    assert cal.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads x 16 dims, fp32
    hw = cpu_calibrated(cal)
    assert hw.kv_capacity_tokens == 31 * 16 and hw.max_batch == 4 and hw.step_fit["n"] == 4
    assert Calibration.from_dict(cal.to_dict()).to_dict() == cal.to_dict()
