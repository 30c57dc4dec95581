"""The `jaxsys` command: help without jax, `jaxsys generate` end to end on the default model."""

from __future__ import annotations

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
