"""The `memory:` section of the training config in the trainers: budget forms, the plan applied to
the GSPMD step (same losses as keeping everything), printed and written into the metrics file, an
infeasible budget stopped before training with the smallest feasible budget named, re-planning when
the step program changes (another bucket, another device count), and the elastic step re-planned
after a device loss, with the same losses as the run without the loss."""

import json

import jax
import numpy as np
import pytest

from jaxsys.train.config import MemoryConfig, TrainConfigError, load_config, parse_memory_budget
from jaxsys.train.gspmd import GSPMDStep, memory_shards
from jaxsys.train.memory import InfeasibleBudgetError, traced_peak_bytes
from jaxsys.train.trainer import Trainer

# Several minutes on 2 cores (profiling and planning real steps), over the CI budget; `make test-all`.
pytestmark = pytest.mark.slow

GSPMD = ["elastic.enabled=false", "progress=false", "steps=3"]


def _cfg(*overrides):
    return load_config("tiny", GSPMD + list(overrides))


@pytest.mark.parametrize("given, parsed", [
    ("0.5", 0.5), ("50%", 0.5), (0.25, 0.25), ("100%", 1.0), (1, 1.0), ("512MiB", 512 * 2**20),
    ("4GB", 4 * 10**9), ("4 GiB", 4 * 2**30), (4e9, 4 * 10**9), ("1e9", 10**9), (1000, 1000),
    ("2_000_000", 2 * 10**6), (None, None)])
def test_budget_forms(given, parsed):
    out = parse_memory_budget(given)
    assert out == parsed and type(out) is type(parsed)


@pytest.mark.parametrize("given", ["0", "-1", "0%", "150%", "half", "5 parsecs", True, "inf"])
def test_bad_budgets_are_errors(given):
    with pytest.raises(ValueError, match="memory budget"):
        parse_memory_budget(given)


def test_memory_section_in_the_config():
    assert MemoryConfig().policy == "keep" and MemoryConfig().budget is None  # no behaviour change
    cfg = _cfg("memory.policy=auto", "memory.budget=50%")
    assert cfg.memory.policy == "auto" and cfg.memory.budget == 0.5
    assert _cfg("memory.budget=64MiB").memory.budget == 64 * 2**20
    assert cfg.replace(**{"steps": 4}).memory == cfg.memory  # survives the dict round trip
    with pytest.raises(TrainConfigError, match="memory.policy"):
        _cfg("memory.policy=everything")
    with pytest.raises(TrainConfigError, match="memory.budget: .*150%"):
        _cfg("memory.budget=150%")
    with pytest.raises(TrainConfigError, match="unknown config key 'memory.size'"):
        _cfg("memory.size=1")


def test_fraction_and_offload_on_cpu_are_clear_errors():
    with pytest.raises(TrainConfigError, match="does not report its memory size"):
        GSPMDStep(_cfg("memory.policy=auto", "memory.budget=50%")).build()
    with pytest.raises(TrainConfigError, match="does not report its memory size"):
        GSPMDStep(_cfg("memory.policy=auto")).build()  # auto's default budget: all device memory
    with pytest.raises(TrainConfigError, match="does not lower host offloading"):
        GSPMDStep(_cfg("memory.policy=offload")).build()


def test_default_keep_plans_nothing():
    prog = GSPMDStep(_cfg())
    prog.build()
    assert prog.memory_plan is None and not prog.memory.enabled


@pytest.fixture(scope="module")
def bounds():
    """Per-device modelled peaks of the tiny GSPMD step: every named residual recomputed, every
    named residual kept under a per-layer checkpoint (the probe), no checkpoint at all."""
    prog = GSPMDStep(_cfg("memory.policy=remat"))
    prog.build()
    plan = prog.memory_plan
    assert set(plan.decision.values()) == {"recompute"}
    probe = plan.profile.probe_peak_bytes // plan.shards
    keep_all = plan.profile.keep_all_peak_bytes // plan.shards
    assert plan.peak_bytes < probe <= keep_all
    return plan.peak_bytes, probe, keep_all


def test_auto_within_a_budget_trains_like_keeping_everything(bounds, tmp_path):
    lo, probe, _ = bounds
    budget = (lo + probe) // 2
    keep = Trainer(_cfg())
    ref = keep.run()
    auto = Trainer(_cfg("memory.policy=auto", f"memory.budget={budget}"))
    auto.setup()
    plan = auto.program.memory_plan
    assert not plan.keep_all and "recompute" in plan.decision.values()
    assert plan.peak_bytes <= budget and plan.shards == memory_shards(auto.program.mesh) == 8
    # the plan's model against the liveness of the program the plan produces (not modelled)
    remat = auto.program.memory.remat_for(*auto.program._global_args())
    traced = traced_peak_bytes(auto.program._planned_step, remat, *auto.program._global_args(),
                               donate_argnums=(0,))
    assert traced / plan.shards <= budget
    res = auto.run(metrics_out=tmp_path / "m.jsonl")
    np.testing.assert_allclose(res.losses, ref.losses, rtol=1e-4)
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    events = [e for x in lines for e in x.get("events", [])]
    assert [e["event"] for e in events] == ["memory_plan"] and events[0]["step"] == 0
    assert events[0]["decisions"] == plan.decision and events[0]["budget_bytes"] == budget
    assert set(events[0]["by_kind"]) == {"attention", "mlp"}


def test_plan_is_printed_per_layer_kind(bounds, capsys):
    lo, *_ = bounds
    tr = Trainer(_cfg("memory.policy=auto", f"memory.budget={lo}", "steps=1"))
    tr.run()
    err = capsys.readouterr().err
    assert "memory plan (auto (no offload))" in err
    assert " attention (2 layers)" in err and " mlp (2 layers)" in err
    assert "attn_q" in err and "mlp_act" in err


def test_infeasible_budget_names_the_smallest_feasible_one(bounds):
    lo, *_ = bounds
    tr = Trainer(_cfg("memory.policy=auto", f"memory.budget={lo // 2}"))
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget") as e:
        tr.compile()
    assert tr.step == 0 and not tr._ready  # before training: nothing was set up or run
    smallest = e.value.smallest_bytes
    assert smallest <= lo  # recomputing every residual is one of the plans
    at = GSPMDStep(_cfg("memory.policy=auto", f"memory.budget={smallest}"))
    at.build()
    assert at.memory_plan.peak_bytes <= smallest
    with pytest.raises(InfeasibleBudgetError, match="memory.policy=keep"):
        GSPMDStep(_cfg(f"memory.budget={lo}")).build()  # keep checks the budget too


def test_cli_rejects_an_infeasible_budget_before_training(bounds, capsys, monkeypatch):
    from jaxsys.train.cli import main

    monkeypatch.setattr("jaxsys.runtime.enable_compilation_cache", lambda: None)
    lo, *_ = bounds
    rc = main(["--config", "tiny", "elastic.enabled=false", "--no-progress", "--memory-policy", "auto",
               "--memory-budget", str(lo // 2)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "smallest feasible budget for this step is" in err and "modelled peak per device" in err
    assert "Traceback" not in err and "step compiled" not in err


def test_step_memory_replans_on_a_new_bucket_and_device_count(bounds):
    lo, probe, _ = bounds
    prog = GSPMDStep(_cfg("memory.policy=auto", f"memory.budget={(lo + probe) // 2}"))
    prog.build()
    mem = prog.memory
    first = mem.plan
    assert [e["event"] for e in mem.report(None)] == ["memory_plan"]
    state, inp = prog._global_args()
    # another sequence-length bucket: a new program, profiled from the measured layer structure
    shorter = inp._replace(tokens_BxT1=jax.ShapeDtypeStruct((32, 16 + 1), inp.tokens_BxT1.dtype))
    mem.remat_for(state, shorter)
    (ev,) = mem.report(None)
    assert ev["fingerprint"] != first.fingerprint and ev["reused"] == "structure"
    # the same program again: a lookup, nothing reported
    mem.remat_for(state, inp)
    assert mem.plan == first and mem.report(None) == []
    # a device lost (8 -> 7 shards): re-planned from the profile already made
    mem.set_shards(7)
    mem.remat_for(state, inp)
    (ev,) = mem.report(None)
    assert ev["shards"] == 7 and ev["reused"] == "program" and ev["peak_bytes"] <= ev["budget_bytes"]


@pytest.mark.slow
def test_elastic_device_loss_replans_and_trains_like_the_run_without_it(tmp_path):
    from jaxsys.train.elastic.runtime import ElasticStep

    # the budget sits between recomputing and keeping every named residual on the 7 survivors
    # (each holds a larger state shard and more micro-batch gradients than on 8)
    probe = ElasticStep(load_config("tiny", ["progress=false", "memory.policy=remat"]))
    probe._spec(probe._plan(list(range(7))))
    lo = probe.activation_memory.plan(7).peak_bytes
    kept = probe.activation_memory.plan(7).profile.probe_peak_bytes  # every name kept, per layer
    assert lo < kept
    budget = (lo + kept) // 2
    base = ["progress=false", "steps=4", "memory.policy=auto", f"memory.budget={budget}"]
    plain = Trainer(load_config("tiny", base)).run()
    lossy = Trainer(load_config("tiny", base + ["elastic.fail=3@2"]))
    res = lossy.run(metrics_out=tmp_path / "m.jsonl")
    assert res.losses == plain.losses  # the elastic invariant holds with memory plans
    assert res.checksums == plain.checksums
    plans = [e for e in res.events if e["event"] == "memory_plan"]
    assert [(e["step"], e["devices"]) for e in plans] == [(0, 8), (2, 7)]
    assert plans[1]["reused"] == "body"  # the layer body measured for 8 devices, re-planned only
    assert all(e["peak_bytes"] <= budget for e in plans)
    assert not plans[1]["keep_all"] and "recompute" in plans[1]["decisions"].values()
    written = [e for x in (tmp_path / "m.jsonl").read_text().splitlines()
               for e in json.loads(x).get("events", []) if e["event"] == "memory_plan"]
    assert [e["devices"] for e in written] == [8, 7]
