"""`python -m jaxsys.serve.length.cli`: generate the remaining-length data, show it, train predictors.

    data   generate (or resume) hidden-state/remaining-length data with the serving model
    show   summarise a run folder (generations, lengths by source, splits)
    train  fit our hidden-state head and the baselines, print the test MAE table, save our head
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxsys length", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="generate (or resume) length data; cached under the user's cache folder",
                       description="Generate sampled completions of real prompts with the serving model, logging "
                       "hidden states every k decode steps and the true remaining length. Resumable: run the "
                       "same command again to continue. Output: $JAXSYS_CACHE_DIR/length_data/<run>/ (default "
                       "~/.cache/jaxsys/length_data/<run>/).")
    d.add_argument("--model", default="smollm2-135m-instruct")
    d.add_argument("--gsm8k", type=int, default=150, help="GSM8K prompts (default 150)")
    d.add_argument("--mt-bench", type=int, default=80, help="MT-Bench first turns (default 80, all)")
    d.add_argument("--grbench", type=int, default=130, help="GRBench questions (default 130)")
    d.add_argument("--seeds", type=int, default=3, help="sampled generations per prompt (default 3)")
    d.add_argument("--max-new-tokens", type=int, default=512)
    d.add_argument("--capture-every", type=int, default=8, help="log hidden states every k decode steps")
    d.add_argument("--hidden-layer", type=int, default=None, help="layer whose output is logged (default 2/3 depth)")
    d.add_argument("--slots", type=int, default=32, help="requests decoded together")
    d.add_argument("--limit", type=int, default=None, help="stop after this many new generations")
    d.add_argument("--out", type=Path, default=None, help="run folder (default: under the cache folder)")
    s = sub.add_parser("show", help="summarise a length-data run folder")
    s.add_argument("run", type=Path, nargs="?", default=None, help="run folder (default: the latest)")
    t = sub.add_parser("train", help="fit our head and the baselines; print the test MAE table",
                       description="Train ours (hidden-state head) and the baselines on the train split, choose "
                       "each head's width and learning rate on dev, report test MAE (tokens) and parameter counts. "
                       "Saves the dev-chosen head of ours as <run>/predictor.npz (what a rescheduler loads).")
    t.add_argument("run", type=Path, nargs="?", default=None, help="run folder (default: the latest)")
    t.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from jaxsys.serve.length import data

    if args.cmd == "data":
        cfg = data.LengthDataConfig(model=args.model, prompts={"gsm8k": args.gsm8k, "mt_bench": args.mt_bench,
                                                               "grbench": args.grbench},
                                    seeds=args.seeds, max_new_tokens=args.max_new_tokens,
                                    capture_every=args.capture_every, hidden_layer=args.hidden_layer,
                                    slots=args.slots)
        root = data.generate_length_data(cfg, out_dir=args.out, limit=args.limit)
        print(json.dumps({"run": str(root), **data.load_length_data(root).summary()}, indent=1))
        return 0
    root = args.run if args.run is not None else data.latest_run()
    if args.cmd == "show":
        print(json.dumps({"run": str(root), **data.load_length_data(root).summary()}, indent=1))
        return 0
    from jaxsys.serve.length.predictor import fit_predictors

    report = fit_predictors(data.load_length_data(root))
    for name, row in report.rows.items():
        print(f"{name:<22} test MAE {row['test']['mae']:7.1f} tokens   params {row['params']:>9,}")
    dev = {n: min(r["dev_grid_mae"].values()) for n, r in report.rows.items() if r["kind"] == "learned"}
    ours = min(("ours_layer", "ours_final"), key=dev.get)
    report.predictors[ours].save(root / "predictor.npz")
    print(f"saved {ours} (chosen on dev) to {root / 'predictor.npz'}")
    if args.out is not None:
        args.out.write_text(json.dumps(report.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
