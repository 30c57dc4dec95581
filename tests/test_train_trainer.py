"""The host loop with the GSPMD step: explicit shardings over (data, fsdp, tensor), donated state,
JSONL metrics with full-precision losses, checkpoints restorable by the elastic step and back,
the CLI."""

import json
import math

import jax
import numpy as np
import pytest

from jaxsys.train.config import load_config
from jaxsys.train.trainer import Trainer

GSPMD = ["elastic.enabled=false", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "progress=false"]


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def gspmd_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("gspmd")
    cfg = load_config("tiny", GSPMD + ["steps=4", f"checkpoint.dir={d / 'ck'}", "checkpoint.every=1",
                                       "checkpoint.keep=2"])
    tr = Trainer(cfg)
    exe = tr.compile()
    before = tr.state_tree()["params"]["embed"]
    res = tr.run(metrics_out=d / "m.jsonl")
    tr.close()
    return tr, res, exe, before, d


def test_gspmd_step_is_sharded_donated_and_logs_jsonl(gspmd_run):
    tr, res, exe, before, d = gspmd_run
    # the state was donated to the step
    assert before.is_deleted()
    # parameters are sharded over fsdp and tensor as the logical rules say
    spec = tr.state_tree()["params"]["layers"]["wq"].sharding.spec
    assert "tensor" in jax.tree.leaves(tuple(spec)) and "fsdp" in jax.tree.leaves(tuple(spec))
    assert tr.program.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    lines = [json.loads(x) for x in (d / "m.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3]
    assert [x["loss"] for x in lines] == res.losses  # full float precision survives JSON
    assert all(math.isfinite(x["loss"]) and x["devices"] == 8 for x in lines)
    assert lines[0]["lr"] == 0.0 and lines[1]["lr"] > 0.0  # warmup from 0


def test_checkpoints_restore_across_trainers_and_meshes(gspmd_run, tmp_path):
    from jaxsys.train.checkpoint import CheckpointManager

    tr, res, _, _, d = gspmd_run
    with CheckpointManager(d / "ck", read_only=True) as mgr:
        assert mgr.all_steps() == [3, 4]  # keep-2
        meta = mgr.read_meta()
    assert meta["step"] == 4 and meta["device_ids"] == list(range(8))
    # GSPMD (2x2x2 mesh) -> elastic on 6 devices, exactly
    el = Trainer(load_config("tiny", ["devices=6", "progress=false"]))
    assert el.restore(d / "ck") == 4
    assert _leaves_equal(el.params(), tr.params())
    st = el.state_tree()
    assert _leaves_equal(st["mu"], tr.state_tree()["mu"]) and int(st["count"]) == 4
    # elastic -> GSPMD on a 1x4x2 mesh
    el.ckpt = CheckpointManager(tmp_path / "ck2", async_save=False)
    el.save(4)
    el.close()
    g = Trainer(load_config("tiny", GSPMD + ["mesh.data=1", "mesh.fsdp=4"]))
    assert g.restore(tmp_path / "ck2") == 4
    assert _leaves_equal(g.params(), tr.params())
    assert g.program.count == 4


def test_cli_trains_and_writes_metrics(tmp_path, capsys, monkeypatch):
    from jaxsys.train.cli import main

    # the CLI turns on jax's persistent compilation cache; keep this test process as it was
    monkeypatch.setattr("jaxsys.runtime.enable_compilation_cache", lambda: None)

    out = tmp_path / "m.jsonl"
    assert main(["--config", "tiny", "--steps", "3", "--metrics-out", str(out), "--no-progress",
                 "elastic.precompile=none"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]
    assert all({"step", "loss", "grad_norm", "lr", "devices", "param_checksum"} <= set(x) for x in lines)
    assert "steps 0-2: loss" in capsys.readouterr().out


def _elastic(overrides, steps, devices=None):
    cfg = load_config("tiny", ["progress=false", "elastic.precompile=none"] + overrides
                      + ([f"devices={devices}"] if devices else []))
    tr = Trainer(cfg)
    return tr, tr.run(steps)


@pytest.mark.slow  # 35 s on 2 cores (CI budget)
def test_bf16_compute_keeps_f32_masters():
    tr16, r16 = _elastic(["model.dtype=bfloat16"], 3)
    _, r32 = _elastic([], 3)
    assert all(math.isfinite(x) for x in r16.losses)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(tr16.params()))
    diffs = [abs(a - b) for a, b in zip(r16.losses, r32.losses)]
    assert any(d > 0 for d in diffs) and max(diffs) < 0.05  # bf16 compute, same model


@pytest.mark.slow
def test_bf16_is_bitwise_across_device_counts():
    _, a = _elastic(["model.dtype=bfloat16"], 3)
    _, b = _elastic(["model.dtype=bfloat16"], 3, devices=5)
    assert a.losses == b.losses and a.checksums == b.checksums


@pytest.mark.slow
def test_gspmd_bf16_trains():
    tr = Trainer(load_config("tiny", GSPMD + ["model.dtype=bfloat16", "steps=12"]))
    res = tr.run()
    assert all(math.isfinite(x) for x in res.losses) and res.losses[-1] < res.losses[0] - 0.2
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(tr.params()))
