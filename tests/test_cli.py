"""The `jaxsys` command: help without jax, `jaxsys generate` end to end on the default model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxsys import cli


def test_help_does_not_import_jax():
    code = ("import sys; from jaxsys.cli import main; main(['--help']); "
            "assert 'jax' not in sys.modules, 'jaxsys --help imported jax'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in ("generate", "serve", "train", "bench", "models"):
        assert command in out


def test_unknown_command_exits_2(capsys):
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_bench_help_lists_benchmarks(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("generate", "engine", "attention", "elastic", "gnn"):
        assert name in out


def test_generate_chat_answers_paris(capsys):
    assert cli.main(["generate", "--chat", "--max-tokens", "24", "--quiet", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["generate", "--model", "no-such-model", "hi"], "no model named 'no-such-model'"),
    (["generate", "--top-p", "0", "hi"], "top_p must be in (0, 1]"),
    (["generate", "--max-tokens", "0", "hi"], "max_tokens must be a positive integer"),
    (["generate", "word " * 9000], "the model's context is 8192 tokens"),
])
def test_generate_bad_input_is_a_clear_error(capsys, argv, message):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_registered_modules_exist():
    """Every module `jaxsys/cli.py` names by string (subcommands, demo sections) imports and has
    its entry point, so a typo in a registry fails here, not in front of a user."""
    import importlib
    import inspect

    def commands(table):
        for entry in table.values():
            yield from commands(entry) if isinstance(entry, dict) else [entry[0]]

    for module in commands(cli.COMMANDS):
        assert callable(importlib.import_module(module).main), module
    for entry in cli.DEMO_SECTIONS:
        module, _, function = entry.partition(":")
        section = getattr(importlib.import_module(module), function)
        assert "out" in inspect.signature(section).parameters, entry


@pytest.mark.parametrize("command", [["serve"], ["generate", "hi"]])
def test_too_few_devices_says_how_to_get_more(capsys, command):
    assert cli.main([command[0], "--tensor-parallel", "16", *command[1:]]) == 2
    err = capsys.readouterr().err
    assert "--tensor-parallel 16 needs 16 devices, this run has 8" in err
    assert "--cpu-devices 16" in err


def test_cpu_devices_after_jax_started_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored after the test
    assert cli.main(["serve", "--cpu-devices", "4"]) == 2
    assert "JAX already started with 8 CPU device(s)" in capsys.readouterr().err


def test_cpu_devices_sets_the_device_count():
    """In a fresh process, --cpu-devices N gives N devices: asking for one more than that for
    tensor parallelism is refused with the count it has."""
    out = subprocess.run([sys.executable, "-m", "jaxsys.cli", "serve", "--cpu-devices", "2", "--tensor-parallel", "4"],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "this run has 2 (cpu)" in out.stderr and "--cpu-devices 4" in out.stderr
