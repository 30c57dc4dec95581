"""Online planning over a program that changes (sequence-length buckets, a device-count change):
a program seen before costs a lookup, a new one is re-planned from a reused measurement, every
plan fits the budget, and the fixed modes check the budget too."""

import jax
import numpy as np
import pytest

from jaxsys.models import decoder
from jaxsys.models.config import ModelConfig
from jaxsys.train.memory import Hardware, InfeasibleBudgetError, MemoryPlanner, Profiler, traced_peak_bytes
from jaxsys.train.memory.steps import init_opt_state, lm_train_step

CFG = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=96, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=8)
HW = Hardware("test", matmul_flops_per_s=2e10, elementwise_bytes_per_s=5e9, link_bytes_per_s=2e9)


def _tokens(T, seed=0):
    return jax.random.randint(jax.random.key(seed), (4, T + 1), 0, CFG.vocab_size)


@pytest.fixture(scope="module")
def setup():
    params = decoder.init_params(CFG, jax.random.key(0))
    return lm_train_step(CFG), params, init_opt_state(params)


@pytest.mark.slow  # 106 s on 2 cores (CI budget); the budget check stays in test_fixed_modes_check_the_budget
def test_buckets_replan_only_on_a_new_program_and_stay_within_budget(setup):
    step, params, opt = setup
    profiler = Profiler(HW, measure_repeats=1, measure_steps=False)
    probe = profiler.profile(step, params, opt, _tokens(128))
    smallest = min(probe.peak_bytes({n: d for n in probe.names}) for d in ("recompute", "offload"))
    budget = int(smallest + 0.3 * (probe.probe_peak_bytes - smallest))  # the longest bucket needs a plan
    planner = MemoryPlanner(step, budget, profiler=profiler)
    losses = []
    for i, T in enumerate([32, 128, 32, 64, 128, 64]):
        tokens = _tokens(T, seed=i)
        plan = planner.plan_for(params, opt, tokens)
        assert plan.peak_bytes <= budget
        assert traced_peak_bytes(step, plan.remat, params, opt, tokens) <= budget
        params, opt, loss = planner.jitted(params, opt, tokens)(params, opt, tokens)
        losses.append(float(loss))
    assert [e["reused"] for e in planner.events] == ["structure", "program", "structure"]
    assert all(e["measure_s"] == 0 for e in planner.events)
    assert len({e["fingerprint"] for e in planner.events}) == 3
    assert np.isfinite(losses).all()


def test_device_count_change_replans_without_profiling(setup):
    step, params, opt = setup
    planner = MemoryPlanner(step, 10**9, profiler=Profiler(HW, measure_repeats=1, measure_steps=False))
    tokens = _tokens(32)
    one = planner.plan_for(params, opt, tokens)
    planner.set_shards(2)
    two = planner.plan_for(params, opt, tokens)
    assert planner.events[-1]["reused"] == "program" and planner.events[-1]["measure_s"] == 0
    assert two.shards == 2 and two.peak_bytes <= one.peak_bytes // 2 + 1


def test_fixed_modes_check_the_budget(setup):
    step, params, opt = setup
    tokens = _tokens(32)
    prof = Profiler(HW, measure_repeats=1, measure_steps=False)
    keep = MemoryPlanner(step, 10**9, policy="keep", profiler=prof).plan_for(params, opt, tokens)
    assert keep.keep_all and keep.policy() is None
    remat = MemoryPlanner(step, 10**9, policy="remat", profiler=prof).plan_for(params, opt, tokens)
    assert set(remat.decision.values()) == {"recompute"}
    offload = MemoryPlanner(step, 10**9, policy="offload", profiler=prof).plan_for(params, opt, tokens)
    assert set(offload.decision.values()) == {"offload"} and offload.host_bytes > 0
    with pytest.raises(InfeasibleBudgetError, match="memory.policy=keep"):
        MemoryPlanner(step, keep.peak_bytes - 1, policy="keep", profiler=prof).plan_for(params, opt, tokens)
    with pytest.raises(ValueError, match="auto, keep, remat, offload"):
        MemoryPlanner(step, 10**9, policy="everything")
