"""Typed training config: YAML + key=value overrides, clear errors, membership-event validation."""

import pytest

from jaxsys.train.config import TrainConfigError, load_config
from jaxsys.train.elastic.events import EventSchedule, EventSpecError, parse_event, parse_events


def test_tiny_config_loads_and_overrides_are_typed():
    cfg = load_config("tiny", ["optim.lr=1e-3", "data.global_batch=64", "dropout=0.0",
                               "elastic.fail=3@20,5@30", "elastic.join=3@40"])
    assert cfg.optim.lr == 1e-3 and cfg.data.global_batch == 64 and cfg.dropout == 0.0
    assert cfg.elastic.fail == ("3@20", "5@30") and cfg.elastic.join == ("3@40",)
    assert cfg.model.num_layers == 2 and cfg.data.micro_size == 4
    # the packaged name and the path give the same config
    assert load_config("configs/train/tiny.yaml") == load_config("tiny")
    # replace() validates too
    assert cfg.replace(**{"optim.lr": 2e-3}).optim.lr == 2e-3


@pytest.mark.parametrize("override, words", [
    (["optim.lrr=1"], ["unknown config key 'optim.lrr'", "lr"]),
    (["nonsense=1"], ["unknown config key 'nonsense'"]),
    (["model.foo=1"], ["unknown model keys ['foo']"]),
    (["data.global_batch=30"], ["multiple of data.micro_batches"]),
    (["optim.lr=-1"], ["optim.lr"]),
    (["elastic.fail=3-20"], ["malformed --fail event '3-20'", "DEV@STEP"]),
    (["elastic.chunk_size=1000"], ["power of two"]),
    (["mesh.tensor=2"], ["tensor", "summation order"]),
    (["model.num_heads=3"], ["num_heads (3) must be a multiple of num_kv_heads (2)"]),
    (["lr"], ["not key=value"]),
])
def test_bad_config_errors_name_the_key(override, words):
    with pytest.raises(TrainConfigError) as e:
        load_config("tiny", override)
    for w in words:
        assert w in str(e.value)


def test_unknown_config_file():
    with pytest.raises(TrainConfigError, match="packaged configs: .*tiny"):
        load_config("no-such-config")


def test_parse_events():
    assert parse_event("3@20", "fail").device == 3
    evs = parse_events(["3@20,5@30", " 1 @ 2 "], "join")
    assert [(e.device, e.step, e.kind) for e in evs] == [(3, 20, "join"), (5, 30, "join"), (1, 2, "join")]
    for bad in ["3", "@20", "a@b", "3@-1", "3@20@1", ""]:
        with pytest.raises(EventSpecError):
            parse_event(bad, "fail")


@pytest.mark.parametrize("fail, join, msg", [
    (["9@5"], [], "device 9 does not exist; this run has 8 devices (0-7)"),
    (["3@60"], [], "step 60 is outside the run"),
    (["3@5", "3@7"], [], "not in service at step 7"),
    ([], ["3@5"], "already in service"),
    (["3@5", "4@5"], [], "holds the only replica"),
    (["0@1", "1@2", "2@3", "3@4", "4@5", "5@6", "6@7", "7@8"], [], "every device would be lost"),
])
def test_schedule_validation(fail, join, msg):
    sched = EventSchedule.from_specs(fail, join)
    with pytest.raises(EventSpecError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        sched.validate(num_devices=8, steps=60)


def test_schedule_accepts_recoverable_patterns():
    # non-adjacent simultaneous losses, rejoin, and adjacent losses with a checkpoint to fall back on
    EventSchedule.from_specs(["3@20", "5@20"], ["3@40"]).validate(num_devices=8, steps=60)
    EventSchedule.from_specs(["3@20", "4@20"]).validate(num_devices=8, steps=60, has_checkpoint=True)
    # after device 4 is lost, 3 and 5 are ring neighbours
    with pytest.raises(EventSpecError, match="holds the only replica"):
        EventSchedule.from_specs(["4@10", "3@20", "5@20"]).validate(num_devices=8, steps=60)
    sets = EventSchedule.from_specs(["3@20"], ["3@40"]).device_sets(8)
    assert sets == [tuple(range(8)), (0, 1, 2, 4, 5, 6, 7), tuple(range(8))]


def test_cli_rejects_bad_input_without_traceback(capsys):
    from jaxsys.train.cli import main

    for argv, msg in [
        (["--config", "tiny", "--fail", "9@5"], "device 9 does not exist"),
        (["--config", "tiny", "--fail", "3-5"], "malformed --fail event"),
        (["--config", "tiny", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["--config", "tiny", "--join", "3@5"], "already in service"),
        (["--config", "tiny", "elastic.enabled=false", "--fail", "3@5"], "need elastic.enabled=true"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
    assert main(["--config", "tiny", "--print-config", "optim.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out


def test_cli_help(capsys):
    from jaxsys.train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for w in ["--fail DEV@STEP", "--join DEV@STEP", "--metrics-out", "key=value", "bit for bit", "--cpu-devices N"]:
        assert w in out


def test_distributed_membership_needs_jax_distributed():
    from jaxsys.train.trainer import make_trainer

    with pytest.raises(TrainConfigError, match="jax.distributed.initialize"):
        make_trainer(load_config("tiny", ["elastic.membership=distributed"]))


def _fresh_cpu_cli(args, cwd):
    """`jaxsys train lm ARGS` as on a fresh CPU machine: no XLA_FLAGS, so JAX would see 1 device."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "jaxsys.cli", "train", "lm", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def test_readme_elastic_command_runs_on_a_fresh_cpu_machine(tmp_path):
    """The README's `--fail 3@20 --join 3@40` command, shortened: the schedule names device 3, so
    the CLI gives the CPU 8 virtual devices before JAX starts and the run loses and regains it."""
    import json

    p = _fresh_cpu_cli(["--config", "tiny", "--fail", "3@1", "--join", "3@2", "--steps", "3",
                        "--metrics-out", "metrics.jsonl", "--no-progress", "elastic.precompile=none"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "8 virtual CPU devices (the schedule names device 3" in p.stderr
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["devices"] for x in lines] == [8, 7, 8]


def test_cli_rejects_a_schedule_naming_missing_devices_before_training(tmp_path):
    p = _fresh_cpu_cli(["--config", "tiny", "--cpu-devices", "2", "--fail", "3@5"], tmp_path)
    assert p.returncode == 2
    assert ("--fail 3@5: device 3 does not exist; this run has 2 devices (0-1); on a CPU-only machine, "
            "pass --cpu-devices 4") in p.stderr
    assert "Traceback" not in p.stderr and "compiled" not in p.stderr


def test_cli_cpu_devices_after_jax_started_is_a_clear_error(capsys, monkeypatch):
    import os

    from jaxsys.train.cli import main

    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored after the test
    assert main(["--config", "tiny", "--cpu-devices", "2", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--cpu-devices 2: JAX already started with 8 CPU device(s)" in err and "Traceback" not in err


@pytest.mark.parametrize("overrides", [["devices=9"], ["elastic.enabled=false", "devices=9"]])
def test_more_devices_than_exist_says_how_to_get_more(overrides):
    from jaxsys.train.trainer import make_trainer

    with pytest.raises(TrainConfigError, match="devices=9 but only 8 are available; on a CPU-only machine, "
                                               "pass --cpu-devices 9"):
        make_trainer(load_config("tiny", overrides))
