"""The `jaxsys` command, and the registry of what lives outside the core.

Each subcommand is named here by the module that implements it and is imported only when it
runs, so `jaxsys --help` answers at once without importing jax, and the core package never
imports `jaxsys.serve` or `jaxsys.train`. A subcommand module exposes `main(argv) -> int`.
`DEMO_SECTIONS` names the sections of `make demo` (`jaxsys.demo`) the same way. This module is
the one place of the core allowed to name serve/ and train/ modules (by string; see
tests/test_import_direction.py).

`jaxsys bench NAME` runs `benchmarks/NAME.py` from the source checkout (benchmarks are not part
of the installed package; they write JSON under `benchmarks/results/`).
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

# command -> (module, one-line help); nested dicts are command groups.
COMMANDS: dict[str, object] = {
    "generate": ("jaxsys.serve.generate_cli", "generate text from a model (greedy or sampled, streamed)"),
    "serve": ("jaxsys.serve.cli", "OpenAI-compatible HTTP server over the serving engine"),
    "graphcot": ("jaxsys.serve.graphcot.cli", "answer graph questions with GLM or Graph-CoT; questions, traces"),
    "length": ("jaxsys.serve.length.cli", "remaining-length prediction (ARES): data from our model, train, show"),
    "train": {
        "lm": ("jaxsys.train.cli", "causal-LM training, elastic on device loss/join"),
        "gnn": ("jaxsys.gnn.cli", "train CSGNN / KP-GNN / GIN on a graph dataset"),
    },
    "models": ("jaxsys.models.cli", "list the named models of the registry"),
    "tune": {
        "moe_offload": ("jaxsys.serve.moe_offload.cli",
                        "roofline tuner: gamma, batch, expert cache, attention place for MoE offloading"),
    },
}

# `make demo` (`python -m jaxsys.demo`), in order: "module:function", each function called with
# `out=` (a print function) and returning None or a summary dict (`ok: False` fails the demo).
DEMO_SECTIONS: tuple[str, ...] = (
    "jaxsys.demo:demo_section",  # jaxsys.generate: chat, and a batch of prompts
    "jaxsys.serve.demo:demo_section",  # the serving engine: shared-prefix decode, the server
    "jaxsys.serve.graphcot.demo:demo_section",  # GLM vs Graph-CoT on two questions (~45 s on 2 cores)
    "jaxsys.train.demo:run_demo",  # elastic training: lose a device, get it back, same bits
)

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _benchmarks() -> dict[str, str]:
    if not BENCHMARKS_DIR.is_dir():
        return {}
    out = {}
    for path in sorted(BENCHMARKS_DIR.glob("*.py")):
        if path.name.startswith("_"):
            continue
        doc = ""
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip().strip('"').strip()
                if line and not line.startswith("#"):
                    doc = line
                    break
        out[path.stem] = doc
    return out


def _usage(prog: str, table: dict[str, object]) -> str:
    lines = [f"usage: {prog} COMMAND [ARGS...]", "", "commands:"]
    for name, entry in table.items():
        if isinstance(entry, dict):
            subs = ", ".join(entry)
            lines.append(f"  {name:<10} ({subs})")
        else:
            lines.append(f"  {name:<10} {entry[1]}")
    if prog == "jaxsys":
        lines.append(f"  {'bench':<10} run a benchmark from benchmarks/ (jaxsys bench --help)")
        lines += ["", f"Run '{prog} COMMAND --help' for the options of a command."]
    return "\n".join(lines)


def _run_bench(argv: list[str]) -> int:
    benches = _benchmarks()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: jaxsys bench NAME [ARGS...]   (NAME=all runs every benchmark)\n")
        if not benches:
            print(f"no benchmarks found (expected a source checkout with {BENCHMARKS_DIR})")
        for name, doc in benches.items():
            print(f"  {name:<14} {doc}")
        return 0
    name, rest = argv[0], argv[1:]
    names = [n for n in benches if n != "gpu_check"] if name == "all" else [name]
    for n in names:
        if n not in benches:
            print(f"jaxsys bench: unknown benchmark {n!r}; known: {', '.join(benches) or 'none'}",
                  file=sys.stderr)
            return 2
    for n in names:
        print(f"== jaxsys bench {n}", flush=True)
        old_argv = sys.argv
        sys.argv = [f"jaxsys bench {n}"] + rest
        try:
            runpy.run_path(str(BENCHMARKS_DIR / f"{n}.py"), run_name="__main__")
        except SystemExit as e:
            if e.code not in (0, None):
                return int(e.code) if isinstance(e.code, int) else 1
        finally:
            sys.argv = old_argv
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    table: dict[str, object] = COMMANDS
    prog = "jaxsys"
    while True:
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage(prog, table))
            return 0
        if argv[0] == "--version" and prog == "jaxsys":
            from jaxsys import __version__

            print(f"jaxsys {__version__}")
            return 0
        if prog == "jaxsys" and argv[0] == "bench":
            return _run_bench(argv[1:])
        name, argv = argv[0], argv[1:]
        if name not in table:
            print(f"{prog}: unknown command {name!r}\n\n{_usage(prog, table)}", file=sys.stderr)
            return 2
        entry = table[name]
        prog = f"{prog} {name}"
        if isinstance(entry, dict):
            table = entry
            continue
        module = importlib.import_module(entry[0])
        return int(module.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
