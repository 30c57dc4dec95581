"""The balancer's cost-model fit (`calibration.py`) on synthetic timings with known answers."""

from __future__ import annotations

import pytest

from jaxsys.pallas_kernels.shared_prefix_attention import calibration


def test_step_overhead_is_the_one_that_loses_least():
    """The balancer shares a step iff its saving exceeds the step overhead: the fitted overhead is
    the middle of the interval whose decisions lose the least time on steps timed both ways."""
    # (saving, t_plain, t_share): sharing wins exactly from 7000 on -> any overhead in [3000, 7000)
    cases = [(1000, 1.0, 2.0), (3000, 1.0, 1.5), (7000, 2.0, 1.0), (20000, 5.0, 1.0)]
    assert calibration.min_regret_overhead(cases) == (5000.0, 0.0)
    assert calibration.decision_loss(cases, 0.0) == 1.5 and calibration.decision_loss(cases, 1e9) == 5.0
    # noisy: a small win at 2000 and a loss at 9000 on the wrong sides; no overhead decides all
    # six right, and [3000, 7000) loses least (0.1 + 0.5; [1000, 2000) would lose 0.5 + 0.5)
    noisy = cases + [(2000, 1.1, 1.0), (9000, 3.0, 3.5)]
    overhead, lost = calibration.min_regret_overhead(noisy)
    assert (overhead, round(lost, 6)) == (5000.0, 0.6)
    assert calibration.decision_loss(noisy, overhead) == pytest.approx(lost)
    # sharing always wins: below the smallest saving; never: a quarter above the largest
    assert calibration.min_regret_overhead([(400, 2.0, 1.0), (800, 3.0, 1.0)]) == (200.0, 0.0)
    assert calibration.min_regret_overhead([(400, 1.0, 2.0), (800, 1.0, 3.0)]) == (1000.0, 0.0)


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
    record, model = calibration.fit_cost_model(points)
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
    record, model = calibration.fit_cost_model(small + big)
    assert record["step_overhead_fit"]["lost_s"] > 0
    assert all(f["lost_s"] == 0.0 for f in record["step_overhead_by_size_fit"].values())
    assert model.overhead(2) < model.overhead(8)
    for c in record["step_overhead_fit"]["cases"]:
        assert (c["saving"] > model.overhead(c["s"])) == (c["share_s"] < c["plain_s"]), c


def test_fit_cost_model_is_monotone_in_item_size():
    """A bigger item never costs less per token: a noisy small kappa above a bigger one is carried up."""
    a = _star_points(tau=1e-9, a_p=20e-6, sigma=2.0e-9, a_s=30e-6, sizes=(2,))
    b = _star_points(tau=1e-9, a_p=20e-6, sigma=1.5e-9, a_s=30e-6, sizes=(4,))
    _, model = calibration.fit_cost_model(a + b)
    assert dict(model.shared_token_cost) == {2: 2.0, 4: 2.0}


def test_fit_cost_model_needs_two_lengths():
    with pytest.raises(ValueError, match="two or more lengths"):
        calibration.fit_cost_model(_star_points(1e-9, 0.0, 1e-9, 0.0, lengths=(1024,)))


def test_item_sizes():
    assert calibration.item_sizes(32) == [2, 4, 8, 16, 32] and calibration.item_sizes(3) == [2]
