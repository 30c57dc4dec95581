"""`gamma="auto"`: the roofline picks gamma per batch bucket (a slower link, a higher acceptance or a
smaller batch move it the way the cost model says), re-plans from the acceptance measured while
serving, sizes the expert cache and prefetch; served greedy tokens equal the plain engine's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jaxsys.sampling import SamplingParams
from jaxsys.serve.moe_offload import autotune as at
from jaxsys.serve.moe_offload import tuner as tu
from jaxsys.serve.speculative import DraftError, SpeculativeConfig

from serve_helpers import check_idle, tiny_model

HW = tu.HardwareSpec.model_validate({
    "name": "toy", "accelerator": {"flops": 1e12, "bandwidth": 1e11, "memory_bytes": 1e9},
    "link": {"bandwidth": 1e9}, "host": {"flops": 1e11, "bandwidth": 2e10, "memory_bytes": 1e10}})
M = tu.ModelShape(num_layers=2, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, vocab=100, num_experts=8,
                  top_k=2, expert_ffn=128)
UNIQUE, HITS = at.independent_routing(M)
GAMMAS = (1, 2, 3, 4)


def _hw(link: float, flops: float = 1e12, **link_kw) -> tu.HardwareSpec:
    acc = {"flops": flops, "bandwidth": 1e11, "memory_bytes": 1e9}
    return tu.HardwareSpec.model_validate({**HW.model_dump(), "accelerator": acc,
                                           "link": {"bandwidth": link, **link_kw}})


def _schedule(hw=HW, acceptance=0.8, max_batch=16, slots=2) -> at.GammaSchedule:
    w = tu.Workload(UNIQUE, HITS, {"ngram": acceptance}, {"ngram": 0}, context=32)
    return at.GammaSchedule(hw, M, w, draft="ngram", gammas=GAMMAS, max_batch=max_batch, cache_slots=slots)


def _monotone(more: dict, less: dict) -> bool:
    """more's gamma >= less's in every bucket, and somewhere strictly."""
    return all(more[b] >= less[b] for b in less) and more != less


def test_the_pick_is_the_roofline_argmax_and_moves_with_link_acceptance_and_batch():
    s = _schedule()
    assert list(s.table) == [1, 2, 4, 8, 16]
    for b, g in s.table.items():
        w = s.workload()
        rate = {g2: tu.predict(HW, M, w, tu.Plan(g2, b, 2, "device", "ngram" if g2 else "none")).tokens_per_s
                for g2 in (0, *GAMMAS)}
        assert rate[g] == max(rate.values()), (b, rate)
    assert s.gamma_for(3) == s.table[4] and s.gamma_for(100) == s.table[16]
    # a compute-limited accelerator (3 GFLOP/s): each drafted token costs compute, each fetched
    # expert link time; a slower link makes drafting pay (fetches amortized over more tokens)
    slow, mid, fast = (_schedule(_hw(link, flops=3e9)) for link in (1e8, 1e9, 1e10))
    assert _monotone(slow.table, mid.table) and _monotone(mid.table, fast.table)
    assert slow.gamma_for(1) == max(GAMMAS) and set(fast.table.values()) == {0}
    # a larger batch needs most experts anyway, while its drafts' compute grows with it: fewer pay
    gam = list(mid.table.values())
    assert gam == sorted(gam, reverse=True) and gam[0] > gam[-1]
    # a higher acceptance: more tokens per verify step, longer drafts pay
    assert _monotone(_schedule(_hw(1e9, flops=3e9), acceptance=0.95).table,
                     _schedule(_hw(1e9, flops=3e9), acceptance=0.3).table)
    assert _monotone(_schedule(acceptance=0.8).table, _schedule(acceptance=0.05).table)


def test_the_measured_acceptance_replans():
    hw = _hw(1e8, flops=3e9)
    s = _schedule(hw, acceptance=0.8, max_batch=1)
    g = s.gamma_for(1)
    assert g == max(GAMMAS)
    for _ in range(at.REPLAN_ROWS):  # every draft rejected: speculation only costs
        s.observe(g, np.array([g]), np.array([0]))
    assert s.workload().tokens_per_step["ngram"][g] == 1.0 and s.workload().acceptance["ngram"] == 0.0
    assert s.gamma_for(1) == 0
    # no measured acceptance to start from: draft (the prior's best gamma >= 1) until one is measured
    t = _schedule(hw, acceptance=0.05, max_batch=1)
    assert t.gamma_for(1) == 0
    t = at.GammaSchedule(hw, M, t.prior, draft="ngram", gammas=GAMMAS, max_batch=1, cache_slots=2, explore=True)
    g = t.gamma_for(1)
    assert g > 0
    for _ in range(at.MIN_ROWS - 1):  # every draft accepted
        t.observe(g, np.array([g]), np.array([g]))
    assert t.exploring
    t.observe(g, np.array([g]), np.array([g]))
    assert not t.exploring and t.workload().acceptance["ngram"] == 1.0 and t.gamma_for(1) == max(GAMMAS)


def test_choose_engine_sizes_the_cache_and_prefetch():
    from serve_helpers import tiny_config

    cfg = tiny_config().replace(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                                model_type="mixtral")
    shape = at.model_shape(cfg)
    plan = tu.Plan(max(GAMMAS), 16, 2, "device", "ngram")
    fits3 = (shape.num_layers * shape.dense_layer_bytes + 2 * shape.head_bytes + 3 * shape.num_layers
             * shape.expert_bytes + 16 * (512 + max(GAMMAS) + 1) * shape.num_layers * 2 * shape.num_kv_heads
             * shape.head_dim * shape.kv_bytes)
    hw = tu.HardwareSpec.model_validate({**HW.model_dump(), "accelerator": {
        "flops": 1e12, "bandwidth": 1e11, "memory_bytes": fits3 * 1.001}, "link": {"bandwidth": 1e9,
                                                                                    "overlaps_compute": False}})
    assert tu.max_cache_slots(hw, shape, plan, 512) == 3
    choice = at.choose_engine(at.AutoTune(hw), cfg, draft="ngram", draft_layers=1, gammas=GAMMAS, max_batch=16,
                              offload=True)
    assert choice.expert_cache == 3 and not choice.prefetch
    assert at.choose_engine(at.AutoTune(HW), cfg, draft="ngram", draft_layers=1, gammas=GAMMAS, max_batch=16,
                            offload=True, expert_cache=5).expert_cache == 5
    dense = at.choose_engine(at.AutoTune(HW), tiny_config(), draft="self", draft_layers=1, gammas=GAMMAS,
                             max_batch=4, offload=False)
    assert dense.expert_cache is None and dense.schedule.shape.num_experts == 1
    assert dense.schedule.draft == "early_exit_1"


def test_clear_errors(tmp_path):
    import json

    from serve_helpers import tiny_config

    cfg = tiny_config().replace(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                                model_type="mixtral")
    stats = tmp_path / "evaluation.json"
    stats.write_text(json.dumps({"routing": {"unique_experts": {"1,1": 4.0}, "lru_hit_rate": {"4": 0.5}},
                                 "model": {"num_experts": 8, "top_k": 4}}))
    with pytest.raises(tu.TunerError, match="measured on 8 experts, top-4"):
        at.choose_engine(at.AutoTune(HW, stats), cfg, draft="ngram", draft_layers=1, gammas=GAMMAS, max_batch=4,
                         offload=True)
    with pytest.raises(tu.TunerError, match="cannot read"):
        at.choose_engine(at.AutoTune(HW, tmp_path / "missing.json"), cfg, draft="ngram", draft_layers=1,
                         gammas=GAMMAS, max_batch=4, offload=True)
    with pytest.raises(tu.TunerError, match="no hardware file"):
        at.choose_engine(at.AutoTune("no-such-gpu"), cfg, draft="ngram", draft_layers=1, gammas=GAMMAS,
                         max_batch=4, offload=True)
    from jaxsys.serve.llm import ServingLLM

    model = tiny_model(0)
    with pytest.raises(DraftError, match="'auto'"):
        ServingLLM(model, speculate="ngram", gamma="fast")
    with pytest.raises(DraftError, match="draft model"):
        ServingLLM(model, speculate="model", gamma="auto", draft_model=model)
    with pytest.raises(DraftError, match="need speculate"):
        ServingLLM(model, gamma="auto")


def _tiny_moe():
    """A unit-scale random Mixtral-style model (4 experts, top-2)."""
    import jax

    from jaxsys.models import LoadedModel, ModelConfig, init_params

    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=256, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=16, model_type="mixtral")
    p = init_params(cfg, jax.random.key(0), std=1.0)
    D = cfg.hidden_size
    lay = dict(p["layers"])
    for k in ("wq", "wk", "wv", "router", "we_gate", "we_up"):
        lay[k] = lay[k] / np.sqrt(D)
    lay["wo"] = lay["wo"] / np.sqrt(cfg.num_heads * cfg.head_dim)
    lay["we_down"] = lay["we_down"] / np.sqrt(cfg.moe_intermediate_size)
    return LoadedModel(name="tiny-moe", config=cfg, params=dict(p, layers=lay, lm_head=p["lm_head"] / np.sqrt(D)),
                       tokenizer=None, path=Path("tiny-moe"))


@pytest.mark.slow
@pytest.mark.parametrize("offload", [False, True])
def test_auto_serves_the_plain_engines_greedy_tokens(offload):
    """A slow link: the schedule drafts, the engine verifies, the tokens are the plain engine's, and
    the verify steps' acceptance reached the schedule. Offloaded: the accelerator holds 3 of the 4
    experts per layer beside the rest, so the tuner's cache has 3 slots and experts cross the link."""
    from jaxsys.serve.engine.engine import EngineConfig
    from jaxsys.serve.llm import ServingLLM

    model = _tiny_moe() if offload else tiny_model(0)
    engine = EngineConfig(page_size=4, num_pages=64, max_decode_batch=4, max_prefill_batch=4, prefill_chunk=16,
                          shared_attention=False)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 128, 9)], [5, 6, 7, 8] * 3 + [5, 6], [40, 41] * 6]
    sampling = [SamplingParams(max_tokens=m) for m in (12, 10, 12)]
    extra = dict(offload_experts=True, expert_cache=2) if offload else {}
    plain = [o.token_ids for o in ServingLLM(model, config=engine, **extra).generate(prompts, sampling)]
    hw = _hw(1e6)
    if offload:
        shape = at.model_shape(model.config)
        context = 16
        kv = 4 * (context + 3) * shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * shape.kv_bytes
        need = shape.num_layers * (shape.dense_layer_bytes + 3 * shape.expert_bytes) + 2 * shape.head_bytes + kv
        hw = tu.HardwareSpec.model_validate({**hw.model_dump(), "accelerator": {
            "flops": 1e12, "bandwidth": 1e11, "memory_bytes": need * 1.001}})
    llm = ServingLLM(model, config=engine, speculate=SpeculativeConfig(gamma=2, gammas=(2,)),
                     gamma=at.AutoTune(hw, context=16), offload_experts=offload)
    assert llm.autotune.expert_cache == (3 if offload else None) and llm.autotune.schedule.exploring
    assert llm.verifier.gamma_for(3) == 2
    outs = llm.generate(prompts, sampling)
    assert [o.token_ids for o in outs] == plain
    check_idle(llm.scheduler)
    st, sched = llm.scheduler.stats, llm.autotune.schedule
    assert st.spec_proposed > 0 and st.spec_accepted > 0
    assert sched.proposed == st.spec_proposed and sched.accepted == st.spec_accepted
    if offload:
        assert llm.engine.runner.config.expert_cache == 3 and llm.engine.runner.counters().misses > 0
    llm.set_gamma(2)  # a fixed gamma ends the schedule
    assert llm.verifier.schedule is None and llm.verifier.gamma_for(8) == 2


def test_serve_cli_refuses_bad_auto_before_loading(capsys):
    from jaxsys.serve import cli

    assert cli.main(["--speculate", "ngram", "--gamma", "fast"]) == 2
    assert "number of draft tokens or auto" in capsys.readouterr().err
    assert cli.main(["--speculate", "ngram", "--gamma", "2", "--hardware", "h100-pcie5.yaml"]) == 2
    assert "--gamma auto" in capsys.readouterr().err
    assert cli.main(["--speculate", "model", "--draft-model", "x", "--gamma", "auto"]) == 2
    assert "'auto'" in capsys.readouterr().err
    assert "--tuner-stats" in cli.build_parser().format_help()
