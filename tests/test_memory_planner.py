"""Profiler and planner on the decoder's training step: residuals, the modelled peak against the
liveness of each traced plan, recompute FLOPs against the traced backward pass, fingerprint reuse,
optimal plans within the budget, and the errors."""

import functools

import jax
import numpy as np
import pytest

from jaxsys.models import decoder
from jaxsys.models import residuals as rn
from jaxsys.models.config import ModelConfig
from jaxsys.train.memory import (Hardware, InfeasibleBudgetError, Profiler, Remat, evaluate, fixed_plan,
                                 plan, traced_peak_bytes)
from jaxsys.train.memory.costs import dot_flops
from jaxsys.train.memory.profiler import DECISIONS, KEEP, OFFLOAD, RECOMPUTE
from jaxsys.train.memory.steps import init_opt_state, lm_train_step

P = jax.checkpoint_policies
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=16)
NAMES = tuple(sorted(rn.LAYER_KINDS["attention"] + rn.LAYER_KINDS["mlp"]))
# fixed rates (a real input of the planner): profiles made with them are reproducible
HW = Hardware("test", matmul_flops_per_s=2e10, elementwise_bytes_per_s=5e9, link_bytes_per_s=2e9)


def _tokens(T, B=4):
    return jax.random.randint(jax.random.key(1), (B, T + 1), 0, CFG.vocab_size)


@pytest.fixture(scope="module")
def env():
    params = decoder.init_params(CFG, jax.random.key(0))
    step = lm_train_step(CFG)
    opt = init_opt_state(params)
    profiler = Profiler(HW, measure_repeats=1, measure_steps=False)
    prof = profiler.profile(step, params, opt, _tokens(64))
    return step, params, opt, profiler, prof


def _between(prof, frac):
    """A budget `frac` of the way from the smallest feasible peak to the probe's (every name kept)."""
    lo = min(prof.peak_bytes({n: d for n in NAMES}) for d in (RECOMPUTE, OFFLOAD))
    return int(lo + frac * (prof.probe_peak_bytes - lo))


def _policy(decisions):
    keep = [n for n, d in decisions.items() if d == KEEP]
    off = [n for n, d in decisions.items() if d == OFFLOAD]
    return Remat(P.save_and_offload_only_these_names(
        names_which_can_be_saved=keep, names_which_can_be_offloaded=off, offload_src="device",
        offload_dst="pinned_host"))


def test_profile_lists_every_tagged_residual(env):
    *_, prof = env
    assert prof.names == NAMES
    assert prof.unused_names == ()
    by = {r.name: r for r in prof.residuals}
    assert by[rn.MLP_ACT].shape == (4, 64, 160) and by[rn.ATTN_K].shape == (4, 64, 2, 16)
    fwd = int(np.nonzero(prof.phase == 1)[0][0])
    bwd = int(np.nonzero(prof.phase == 2)[0][0])
    for r in prof.residuals:
        assert r.layers == CFG.num_layers
        assert r.layer_bytes == 4 * int(np.prod(r.shape))
        assert r.swap_bytes == 2 * r.stacked_bytes
        assert r.kind == rn.layer_kind(r.name)
        assert r.lifetime[0] == fwd and r.lifetime[1] == bwd  # made by the forward scan, read by the backward
    assert prof.cost.reused == "none" and prof.cost.measure_s > 0
    assert prof.layer_forward_s > 0 and prof.layer_backward_s > 0


def test_modelled_peak_bounds_the_traced_plan(env):
    """For random plans, the model is never below the liveness of the traced plan program, and at
    most 10% above it."""
    step, params, opt, _, prof = env
    rng = np.random.default_rng(0)
    plans = [{n: DECISIONS[rng.integers(3)] for n in NAMES} for _ in range(6)]
    plans += [{n: d for n in NAMES} for d in DECISIONS]
    for dec in plans:
        traced = traced_peak_bytes(step, _policy(dec), params, opt, _tokens(64))
        model = prof.peak_bytes(dec)
        assert traced <= model <= 1.10 * traced, (dec, model, traced)
    assert prof.probe_peak_bytes == prof.peak_bytes({n: KEEP for n in NAMES})


def _backward_dot_flops(closed) -> float:
    def flops(jaxpr):
        total = 0.0
        for e in jaxpr.eqns:
            subs = list(jax.extend.core.jaxprs_in_params(e.params))
            if e.primitive.name == "dot_general":
                total += dot_flops(e)
            elif e.primitive.name == "scan":
                total += e.params["length"] * flops(e.params["jaxpr"].jaxpr)
            for s in subs if e.primitive.name != "scan" else ():
                total += flops(getattr(s, "jaxpr", s))
        return total

    bwd = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan" and e.params["reverse"]]
    return sum(e.params["length"] * flops(e.params["jaxpr"].jaxpr) for e in bwd)


def test_recompute_flops_match_the_traced_backward_pass(env):
    """Our cone analysis predicts the matmul FLOPs JAX's backward scan adds for a plan."""
    step, params, opt, _, prof = env
    args = (params, opt, _tokens(64))
    probe = _backward_dot_flops(jax.make_jaxpr(functools.partial(step, _policy({n: KEEP for n in NAMES})))(*args))
    rng = np.random.default_rng(1)
    cases = [{n: RECOMPUTE for n in NAMES}, {rn.MLP_GATE: RECOMPUTE, rn.MLP_UP: RECOMPUTE},
             {rn.ATTN_NORM: RECOMPUTE, rn.ATTN_Q: RECOMPUTE, rn.ATTN_K: OFFLOAD}]
    cases += [{n: DECISIONS[rng.integers(3)] for n in NAMES} for _ in range(3)]
    for dec in cases:
        full = {n: dec.get(n, KEEP) for n in NAMES}
        traced = _backward_dot_flops(jax.make_jaxpr(functools.partial(step, _policy(full)))(*args)) - probe
        assert prof.recompute_flops(full, contractions_only=True) == pytest.approx(traced, rel=1e-6), full


def test_fingerprints_reuse_what_did_not_change(env):
    step, params, opt, profiler, prof = env
    again = profiler.profile(step, params, opt, _tokens(64))
    assert again.cost.reused == "program" and again.cost.total_s == 0
    assert again.fingerprint == prof.fingerprint
    longer = profiler.profile(step, params, opt, _tokens(128))  # a new sequence-length bucket
    assert longer.cost.reused == "structure" and longer.cost.measure_s == 0
    assert longer.fingerprint != prof.fingerprint
    assert longer.residual(rn.MLP_ACT).shape == (4, 128, 160)
    assert longer.structure_fingerprint == prof.structure_fingerprint
    other_step = lm_train_step(CFG, learning_rate=3e-4)  # same layers, another optimizer constant
    same_body = profiler.profile(other_step, params, opt, _tokens(64))
    assert same_body.cost.reused == "body" and same_body.cost.measure_s == 0
    assert same_body.body_fingerprint == prof.body_fingerprint != longer.body_fingerprint
    full = profiler.profile(step, params, opt, _tokens(128), reuse=False)
    assert full.cost.reused == "none" and full.cost.measure_s > 0
    assert full.fingerprint == longer.fingerprint


def test_plan_is_the_best_of_all_plans_within_the_budget(env):
    *_, prof = env
    budget = _between(prof, 0.5)
    best = plan(prof, budget)
    assert not best.keep_all and best.peak_bytes <= budget
    assert best.peak_bytes == prof.peak_bytes(best.decision)
    assert best.step_s == pytest.approx(prof.step_time_s(best.decision))
    # the scalar model on a sample of all 3^10 plans: none that fits is faster
    rng = np.random.default_rng(2)
    for choice in rng.integers(0, 3, (2000, len(NAMES))):
        dec = {n: DECISIONS[c] for n, c in zip(NAMES, choice)}
        if prof.peak_bytes(dec) <= budget:
            assert prof.step_time_s(dec) >= best.step_s * (1 - 1e-12)


def test_keep_all_when_the_budget_allows_it(env):
    *_, prof = env
    p = plan(prof, prof.keep_all_peak_bytes)
    assert p.keep_all and p.policy() is None and p.remat.policy is None
    assert p.step_s <= prof.step_s


def test_executed_plan_fits_and_trains_like_keep_all(env):
    step, params, opt, _, prof = env
    tokens = _tokens(64)
    p = plan(prof, _between(prof, 0.4))
    assert traced_peak_bytes(step, p.remat, params, opt, tokens) <= p.budget_bytes
    ref = jax.jit(functools.partial(step, Remat(None)))(params, opt, tokens)
    out = jax.jit(functools.partial(step, p.remat))(params, opt, tokens)
    np.testing.assert_allclose(out[2], ref[2], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(ref[0])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_infeasible_budget_names_the_smallest_feasible_one(env):
    *_, prof = env
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget") as err:
        plan(prof, prof.probe_peak_bytes // 10)
    smallest = err.value.smallest_bytes
    assert str(smallest) in str(err.value)
    assert plan(prof, smallest).peak_bytes <= smallest
    with pytest.raises(InfeasibleBudgetError):
        plan(prof, smallest - 1)
    with pytest.raises(InfeasibleBudgetError, match="`keep` for every residual"):
        fixed_plan(prof, KEEP, smallest)


def test_a_plan_within_two_programs_fits_both(env):
    """`also_within`: one plan for a program and a larger one of the same layers (what the elastic
    step needs for a device of headroom); `evaluate` scores those decisions on the other program."""
    step, params, opt, profiler, prof = env
    longer = profiler.profile(step, params, opt, _tokens(96))
    budget = _between(longer, 0.3)
    alone = plan(prof, budget)
    both = plan(prof, budget, also_within=(longer,))
    there = evaluate(longer, both)
    assert there.decisions == both.decisions and there.fingerprint == longer.fingerprint
    assert both.peak_bytes <= budget and there.peak_bytes <= budget
    assert there.peak_bytes == longer.peak_bytes(both.decision)
    assert there.step_s == pytest.approx(longer.step_time_s(both.decision))
    assert alone.step_s <= both.step_s * (1 + 1e-12)
    rng = np.random.default_rng(3)  # none of a sample of plans that fit both programs is faster
    for choice in rng.integers(0, 3, (1000, len(NAMES))):
        dec = {n: DECISIONS[c] for n, c in zip(NAMES, choice)}
        if prof.peak_bytes(dec) <= budget and longer.peak_bytes(dec) <= budget:
            assert prof.step_time_s(dec) >= both.step_s * (1 - 1e-12)
    with pytest.raises(InfeasibleBudgetError):
        plan(prof, _between(longer, 0.0) - 1, also_within=(longer,))


def test_no_offload_and_sharding(env):
    *_, prof = env
    budget = _between(prof, 0.5)
    p = plan(prof, budget, allow_offload=False)
    assert OFFLOAD not in p.decision.values() and p.host_bytes == 0
    half = plan(prof, budget // 2, shards=2)
    assert half.peak_bytes <= budget // 2 and half.shards == 2


def test_plan_table_has_a_block_per_layer_kind(env):
    *_, prof = env
    text = plan(prof, _between(prof, 0.4)).table()
    assert " attention (3 layers)" in text and " mlp (3 layers)" in text
    for n in NAMES:
        assert f"  {n} " in text
    assert "modelled peak" in text and "predicted step" in text


def test_whole_step_measurement_anchors_the_time_model(env):
    """With measure_steps the probe's step time is the measured one, and the fitted cost of keeping
    a byte makes the model reproduce the measured full-remat step as well."""
    step, params, opt, _, _ = env
    profiler = Profiler(HW, measure_repeats=3)
    prof = profiler.profile(step, params, opt, _tokens(32))
    calib = profiler._bodies[prof.body_fingerprint][1]
    assert prof.step_s == pytest.approx(calib["t_probe_step"])
    assert prof.step_time_s({n: RECOMPUTE for n in NAMES}) == pytest.approx(calib["t_remat_step"])
    assert np.isfinite(prof.keep_s_per_byte)


def test_profile_of_a_step_with_micro_batches(env):
    """The layer scans nested in a scan over micro-batches (gradient accumulation): the profile
    reads the micro-batch body's timeline inside the step's, and its model still bounds the traced
    plans."""
    _, params, _, _, _ = env
    from jaxsys.train import objective

    def step(remat, params, micro_MxBxT1):
        def loss(p, t):
            return objective.lm_loss_sum(p, t, None, cfg=CFG, dropout=0.0)

        def one(acc, t):
            g = jax.grad(remat(loss))(params, t)
            return jax.tree.map(lambda a, b: a + b, acc, g), None

        grads, _ = jax.lax.scan(one, jax.tree.map(jax.numpy.zeros_like, params), micro_MxBxT1)
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

    micro = jax.numpy.stack([_tokens(32, B=2)] * 3)
    prof = Profiler(HW, measure_repeats=1, measure_steps=False).profile(step, params, micro)
    assert prof.names == NAMES and prof.outer_offset_bytes > 0
    for dec in ({n: KEEP for n in NAMES}, {n: RECOMPUTE for n in NAMES},
                {n: (OFFLOAD if i % 2 else RECOMPUTE) for i, n in enumerate(NAMES)}):
        traced = traced_peak_bytes(step, _policy(dec), params, micro)
        assert traced <= prof.peak_bytes(dec) <= 1.10 * traced, (dec, prof.peak_bytes(dec), traced)


def test_structure_fingerprint_ignores_sizes_and_line_breaks():
    from jaxsys.train.memory.profiler import structure_digest

    def f(*xs):
        return sum(jax.numpy.tanh(x).sum() for x in xs)

    small = jax.make_jaxpr(f)(*[jax.numpy.ones((2, 8))] * 12)
    large = jax.make_jaxpr(f)(*[jax.numpy.ones((2, 1048576))] * 12)  # the printer wraps its header
    assert str(small).splitlines()[0] != str(large).splitlines()[0]
    assert structure_digest(small) == structure_digest(large)
    assert structure_digest(small) != structure_digest(jax.make_jaxpr(f)(*[jax.numpy.ones((2, 8))] * 11))


def test_moe_layers_tag_their_own_residuals():
    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=0, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, model_type="mixtral")
    params = decoder.init_params(cfg, jax.random.key(0))
    step = lm_train_step(cfg)
    opt = init_opt_state(params)
    tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, cfg.vocab_size)
    prof = Profiler(HW, measure_repeats=1, measure_steps=False).profile(step, params, opt, tokens)
    assert {rn.MOE_GATE, rn.MOE_UP, rn.MOE_ACT, rn.MOE_EXPERT_OUT, rn.MOE_ROUTER} <= set(prof.names)
    assert {r.kind for r in prof.residuals} == {"attention", "mlp", "moe"}  # mlp_norm: the shared norm
    assert prof.residual(rn.MOE_ACT).shape == (2, 32, 4, 32)
    for d in (KEEP, RECOMPUTE):
        dec = {n: d for n in prof.names}
        traced = traced_peak_bytes(step, _policy(dec), params, opt, tokens)
        assert traced <= prof.peak_bytes(dec) <= 1.10 * traced
