"""`jaxsys train gnn`: train CSGNN / KP-GNN / GIN on a graph dataset from a YAML config."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]

_EPILOG = """\
examples:
  jaxsys train gnn --config configs/gnn/csl.yaml
  jaxsys train gnn --config csl structure.kind=gin train.epochs=50
  jaxsys train gnn --config configs/gnn/micro_zinc.yaml structure.flag_lengths=[4,5,6,7,8] \\
      --out zinc_flags.json

A config has the sections data, structure, model and train (see jaxsys/gnn/_config.py for every
field and its default); key=value arguments override any field with a YAML value. Structures
(chordless cycles, hop distances) are cached per dataset under $JAXSYS_CACHE_DIR/gnn or
~/.cache/jaxsys/gnn. The metrics JSON holds per-fold train/val/test metrics, their mean and std,
the train throughput and the number of compilations (2: one train step, one eval step). Each
fold's test score is taken at its best validation epoch (k-fold: fold i tests, fold i+1
validates); with train.test_curve=true the summary adds `xu_protocol`, the epoch with the best
mean test score (Xu et al., 2019), which selects on test data and is only for comparison with
results published that way.
"""


def _resolve_config(name: str) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    stem = p.stem if p.suffix in (".yaml", ".yml") else name
    candidates = [Path(__file__).resolve().parents[2] / "configs" / "gnn" / f"{stem}.yaml"]
    try:
        import importlib.resources as ir

        candidates.append(Path(str(ir.files("jaxsys.configs") / "gnn" / f"{stem}.yaml")))
    except (ModuleNotFoundError, TypeError):
        pass
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"config {name!r} is neither a file nor a bundled config name "
                            f"(looked in {', '.join(str(c.parent) for c in candidates)})")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="jaxsys train gnn",
        description="Train CSGNN (chordless-cycle relations), KP-GNN (K-hop shortest-path "
                    "kernel) or GIN on a graph dataset, with early stopping on validation and "
                    "k-fold cross-validation where the config asks for it.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", required=True,
                    help="YAML config file, or the name of a bundled one (csl, exp, cexp, "
                         "counting, mutag, proteins, micro_zinc)")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="override config fields, e.g. structure.kind=gin train.folds=5")
    ap.add_argument("--out", "-o", help="write the metrics JSON here (default: config `output`)")
    ap.add_argument("--no-cache", action="store_true",
                    help="rebuild structures instead of reading/writing the on-disk cache")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from pydantic import ValidationError

    from jaxsys.gnn._config import load_config
    from jaxsys.gnn._cycles import CycleCountExceeded

    try:
        cfg = load_config(_resolve_config(args.config), args.overrides)
    except (FileNotFoundError, ValueError, ValidationError) as e:
        print(f"jaxsys train gnn: bad config: {e}", file=sys.stderr)
        return 2

    from jaxsys.runtime import enable_compilation_cache
    from jaxsys.gnn._datasets import load_dataset
    from jaxsys.gnn._train import run_experiment

    enable_compilation_cache()
    try:
        ds = load_dataset(cfg.data.name, seed=cfg.data.seed, self_loops=cfg.data.self_loops,
                          multi_edges=cfg.data.multi_edges)
        metrics = run_experiment(cfg, dataset=ds, progress=not args.quiet,
                                 use_cache=not args.no_cache)
    except (FileNotFoundError, ValueError, CycleCountExceeded, FloatingPointError) as e:
        print(f"jaxsys train gnn: {e}", file=sys.stderr)
        return 1
    s = metrics["summary"]
    print(f"{metrics['model']} on {metrics['dataset']}: test {s['metric']} "
          f"{s['test_mean']:.4f} +- {s['test_std']:.4f} over {len(metrics['folds'])} fold(s), "
          f"each at its best validation epoch; {metrics['train_graphs_per_s']:.0f} train "
          f"graphs/s; {metrics['seconds']:.1f} s")
    if "xu_protocol" in s:
        b = s["xu_protocol"]
        print(f"  for comparison with Xu et al. (2019) only, their protocol (the epoch with the "
              f"best mean test {s['metric']}, selected on test folds): {b['mean']:.4f} +- "
              f"{b['std']:.4f} at epoch {b['epoch']}")
    out = args.out or cfg.output
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(metrics, indent=1))
        print(f"metrics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
