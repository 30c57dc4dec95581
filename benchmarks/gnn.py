"""CSGNN vs KP-GNN vs GIN: expressiveness (float64, untrained), trained accuracy, speed (vs networkx).

Writes benchmarks/results/gnn_expressiveness.json, gnn_accuracy.json, gnn_speed.json (+ .png
plots); `--quick` writes *_quick.json after a smoke run of a few minutes. With no section flag,
all three sections run. Budget choices (epochs, folds actually run) are recorded in the JSON.

Expressiveness: untrained models in float64 with random weights (width 64, depth 4), each graph
embedded with a random relabelling of itself; a pair (or class / graph) counts as distinguished
when embeddings differ by > 1e-5 while each graph's relabellings agree within 1e-5. Next to each
count, `wl_bound` is what colour refinement over the same relations separates (the upper bound).

Accuracy: the bundled configs (configs/gnn/*.yaml) per model, with the epoch/fold budget below.

Speed: chordless-cycle enumeration and full CSGNN preprocessing vs networkx (the authors'
approach: networkx.chordless_cycles + Python pair loops), and train-step graphs/s of CSGNN and
KP-GNN vs GIN at the same width, depth and batch size, each in the layout `GraphBatcher` picks
(dense per-graph matrices where they pay, e.g. CSL; the sparse layout is then timed too, as a
second record). Medians over repeats, models timed round-robin.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS, median_time, write_results  # noqa: E402

EXPR_TARGETS = {  # (dataset, unit, CSGNN target); GIN's target is 0 everywhere
    "csl": ("classes", 10), "exp": ("pairs", 600), "sr25": ("graphs", 15),
    "brec_basic": ("pairs", 56), "brec_regular": ("pairs", 50), "brec_str": ("pairs", 44),
    "brec_extension": ("pairs", 67),
}
MODELS = {
    "CSGNN": {"kind": "csgnn", "length_bound": 10},
    "KP-GNN": {"kind": "kpgnn", "hops": 4},
    "GIN": {"kind": "gin"},
}


# ------------------------------------------------------------------------------------------
# expressiveness


def _wl_units(ds, unit, rels):
    from jaxsys.gnn import colour_refinement

    graphs = ds.graphs
    if unit == "pairs":
        good = 0
        for i in range(len(graphs) // 2):
            a, b = 2 * i, 2 * i + 1
            ha, hb = colour_refinement([(graphs[a].num_nodes, rels[a], graphs[a].x),
                                        (graphs[b].num_nodes, rels[b], graphs[b].x)])
            good += ha != hb
        return good
    hist = colour_refinement([(g.num_nodes, r, g.x) for g, r in zip(graphs, rels)])
    groups = ds.groups if unit == "classes" else list(range(len(graphs)))
    per_group: dict = {}
    for h, grp in zip(hist, groups):
        per_group.setdefault(grp, set()).add(h)
    counts = Counter(h for s in per_group.values() for h in s)
    return sum(1 for s in per_group.values() if len(s) == 1 and counts[next(iter(s))] == 1)


def run_expressiveness(quick: bool) -> list[dict]:
    from jaxsys.gnn import StructureConfig, build_relations, count_distinguished, load_dataset
    from jaxsys.gnn._datasets import Dataset

    width, depth = (32, 2) if quick else (64, 4)
    records = []
    for name, (unit, target) in EXPR_TARGETS.items():
        ds = load_dataset(name)
        if quick:  # a slice of each set
            keep = {"pairs": 20, "classes": None, "graphs": None}[unit]
            if name == "csl":
                from jaxsys.gnn import make_csl

                ds = make_csl(seed=0, per_class=3)
            elif keep:
                ds = Dataset(ds.name, ds.graphs[:keep], ds.task, ds.num_outputs,
                             groups=None if ds.groups is None else ds.groups[:keep])
        for model, spec in MODELS.items():
            cfg = StructureConfig(**spec)
            t0 = time.perf_counter()
            res = count_distinguished(ds.graphs, unit, cfg, groups=ds.groups, width=width,
                                      depth=depth, seed=0)
            secs = time.perf_counter() - t0
            wl = _wl_units(ds, unit, build_relations(ds.graphs, cfg))
            tgt = target if model == "CSGNN" else (0 if model == "GIN" else None)
            rec = {"model": model, "dataset": name, "distinguished": res.distinguished,
                   "total": res.total, "unit": unit, "unreliable": res.unreliable,
                   "wl_bound": wl, "structure": spec, "width": width, "depth": depth,
                   "tolerance": 1e-5, "seconds": round(secs, 2)}
            if tgt is not None and not quick:
                rec["target"] = tgt
                rec["met"] = (res.distinguished >= tgt) if model == "CSGNN" else (
                    res.distinguished == 0)
            records.append(rec)
            print(f"  {model:7s} {name:15s} {res.distinguished:4d}/{res.total:<4d} "
                  f"(WL bound {wl}, unreliable {res.unreliable}) {secs:.1f}s", flush=True)
    return records


# ------------------------------------------------------------------------------------------
# accuracy

# (config, model label, overrides). Budgets: see the module docstring and `budget` in the JSON.
ACCURACY_RUNS = [
    ("csl", "CSGNN", []), ("csl", "KP-GNN", ["structure.kind=kpgnn", "structure.hops=4"]),
    ("csl", "GIN", ["structure.kind=gin"]),
    ("exp", "CSGNN", []), ("exp", "KP-GNN", ["structure.kind=kpgnn", "structure.hops=4"]),
    ("exp", "GIN", ["structure.kind=gin"]),
    ("cexp", "CSGNN", []), ("cexp", "KP-GNN", ["structure.kind=kpgnn", "structure.hops=4"]),
    ("cexp", "GIN", ["structure.kind=gin"]),
    ("counting", "CSGNN", []), ("counting", "KP-GNN", ["structure.kind=kpgnn", "structure.hops=3"]),
    ("counting", "GIN", ["structure.kind=gin"]),
    ("mutag", "CSGNN", []), ("mutag", "KP-GNN", ["structure.kind=kpgnn"]),
    ("mutag", "GIN", ["structure.kind=gin"]),
    ("proteins", "CSGNN", []), ("proteins", "GIN", ["structure.kind=gin"]),
    ("micro_zinc", "CSGNN", []),
    ("micro_zinc", "CSGNN+flags", ["structure.flag_lengths=[4,5,6,7,8,9,10,11]"]),
    ("micro_zinc", "KP-GNN", ["structure.kind=kpgnn"]), ("micro_zinc", "GIN", ["structure.kind=gin"]),
]
# Full-run budget per config: (epochs, patience, folds actually run or None = all, seeds).
# Seeds > 1 (single-split configs): independent splits + initialisations, mean +- std reported.
FULL_BUDGET = {
    "csl": (200, 100, None, 1), "exp": (60, 20, 5, 1), "cexp": (100, 30, 5, 1),
    "counting": (300, 60, None, 3), "mutag": (150, 50, None, 1), "proteins": (100, 30, None, 1),
    "micro_zinc": (500, 100, 3, 1),
}
QUICK_BUDGET = {k: (2, 2, 1, 1) for k in FULL_BUDGET}
PUBLISHED = {"mutag": 0.894, "proteins": 0.762}  # GIN-0, Xu et al. 2019 (10-fold CV)


def run_accuracy(quick: bool, only: list[str] | None,
                 save: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Train every (config, model) of ACCURACY_RUNS; `save(records)` after each one finishes.

    With `only`, records of the other datasets already in the results file are kept, so a long
    run can be done (or redone) one dataset at a time.
    """
    from pathlib import Path

    import numpy as np

    from jaxsys.gnn import load_config, run_experiment

    root = Path(__file__).resolve().parents[1] / "configs" / "gnn"
    budget = QUICK_BUDGET if quick else FULL_BUDGET
    records = []
    previous = RESULTS / f"gnn_accuracy{'_quick' if quick else ''}.json"
    if only and previous.exists():
        records = [r for r in json.loads(previous.read_text())["records"] if r["dataset"] not in only]
    run_order = [(n, m) for n, m, _ in ACCURACY_RUNS]
    for name, model, overrides in ACCURACY_RUNS:
        if only and name not in only:
            continue
        if quick and (name not in ("csl", "mutag", "micro_zinc") or model not in ("CSGNN", "GIN")):
            continue
        epochs, patience, max_folds, seeds = budget[name]
        ov = list(overrides) + [f"train.epochs={epochs}", f"train.patience={patience}"]
        if max_folds is not None:
            ov.append(f"train.max_folds={max_folds}")
        t0 = time.perf_counter()
        outs = []
        for seed in range(seeds):
            cfg = load_config(root / f"{name}.yaml", ov + [f"train.seed={seed}"])
            outs.append(run_experiment(cfg, progress=False, log=lambda s: None))
        out = outs[0]
        s = out["summary"]
        key = s["metric"]
        tests = np.asarray([f["test"][key] for o in outs for f in o["folds"]])
        rec = {"model": model, "dataset": name, "metric": key,
               "test_mean": float(tests.mean()), "test_std": float(tests.std()),
               "val_mean": float(np.mean([o["summary"]["val_mean"] for o in outs])),
               "folds_run": len(out["folds"]), "folds": cfg.train.folds, "seeds": seeds,
               "epochs": epochs, "patience": patience,
               "best_epochs": [f["best_epoch"] + 1 for o in outs for f in o["folds"]],
               "structure": cfg.structure.model_dump(mode="json"),
               "model_cfg": cfg.model.model_dump(mode="json"),
               "train_graphs_per_s": out["train_graphs_per_s"], "compiles": out["compiles"],
               "seconds": round(time.perf_counter() - t0, 1)}
        if "test_mae_per_target" in s:
            per = np.asarray([list(o["summary"]["test_mae_per_target"].values()) for o in outs])
            names = list(s["test_mae_per_target"])
            rec["test_mae_per_target"] = dict(zip(names, per.mean(0).tolist()))
            rec["test_mae_per_target_std"] = dict(zip(names, per.std(0).tolist()))
        if name in PUBLISHED:
            rec["published_gin"] = PUBLISHED[name]
        if "xu_protocol" in s:  # the published numbers' protocol (seeds = 1 here)
            rec["xu_protocol"] = s["xu_protocol"]
        records.append(rec)
        records.sort(key=lambda r: run_order.index((r["dataset"], r["model"])))  # kept + new
        if save is not None:
            save(records)
        print(f"  {model:11s} {name:11s} test {key} {rec['test_mean']:.4f} "
              f"+- {rec['test_std']:.4f} ({len(out['folds'])} fold(s) x {seeds} seed(s), "
              f"{rec['seconds']:.0f}s)", flush=True)
    return records


# ------------------------------------------------------------------------------------------
# speed


def _networkx_relations(graph, bound: int) -> Counter:
    """The authors' preprocessing, in spirit: networkx.chordless_cycles + Python pair loops."""
    import networkx as nx

    g = graph.to_networkx()
    out: Counter = Counter()
    for u, v in g.edges():
        out[(u, v, 0)] += 1
        out[(v, u, 0)] += 1
    for cyc in nx.chordless_cycles(g, bound):
        length = len(cyc)
        for i, u in enumerate(cyc):
            for j, v in enumerate(cyc):
                d = min(abs(i - j), length - abs(i - j))
                out[(u, v, 1 + d)] += 1
    return out


SPEED_SETS = ["csl", "exp", "cexp", "sr25", "brec_str", "brec_extension", "mutag", "proteins",
              "micro_zinc", "counting"]


def run_speed(quick: bool, repeats: int) -> list[dict]:
    import networkx as nx
    import numpy as np

    from jaxsys.gnn import (
        GraphBatcher,
        GraphNet,
        StructureConfig,
        build_relations,
        chordless_cycles_batch,
        load_dataset,
    )
    from jaxsys.gnn._train import Trainer

    records = []
    bound = 10
    sets = ["csl", "mutag", "brec_str"] if quick else SPEED_SETS
    # -- chordless-cycle enumeration and full preprocessing vs networkx ----------------------
    for name in sets:
        ds = load_dataset(name)
        nxg = [g.to_networkx() for g in ds.graphs]
        pairs = [(g.num_nodes, g.edges) for g in ds.graphs]
        n_nx = sum(len(list(nx.chordless_cycles(g, bound))) for g in nxg)
        n_ours = sum(len(a) for r in chordless_cycles_batch(pairs, length_bound=bound)
                     for a in r.values())
        t_nx, _ = median_time(lambda: [list(nx.chordless_cycles(g, bound)) for g in nxg],
                              1 if quick else min(repeats, 3))
        t_ours, _ = median_time(lambda: chordless_cycles_batch(pairs, length_bound=bound),
                                repeats)
        rec = {"section": "cycles", "dataset": name, "graphs": len(ds), "length_bound": bound,
               "cycles": n_ours, "cycles_networkx": n_nx, "identical_counts": n_ours == n_nx,
               "networkx_graphs_per_s": len(ds) / t_nx, "ours_graphs_per_s": len(ds) / t_ours,
               "speedup": t_nx / t_ours}
        records.append(rec)
        # full CSGNN relations (cycles + pairs + merge); the networkx pipeline on <= 200 graphs
        sub = ds.graphs[:200]
        cfg = StructureConfig(kind="csgnn", length_bound=bound)
        t_rel, _ = median_time(lambda: build_relations(ds.graphs, cfg), repeats)
        t_ref, _ = median_time(lambda: [_networkx_relations(g, bound) for g in sub], 1)
        records.append({"section": "preprocessing", "dataset": name, "graphs": len(ds),
                        "length_bound": bound, "ours_graphs_per_s": len(ds) / t_rel,
                        "networkx_graphs_per_s": len(sub) / t_ref,
                        "networkx_graphs_measured": len(sub),
                        "speedup": (len(ds) / t_rel) / (len(sub) / t_ref)})
        print(f"  {name:15s} cycles x{rec['speedup']:.1f} ({n_ours} cycles, "
              f"{'same' if n_ours == n_nx else 'DIFFERENT'} count); preprocessing "
              f"x{records[-1]['speedup']:.1f} ({records[-1]['ours_graphs_per_s']:.0f} graphs/s)",
              flush=True)
    # -- train-step throughput at the same width / depth / batch size ------------------------
    width, depth, batch = (32, 2, 32) if quick else (64, 4, 32)
    step_repeats = repeats if quick else max(repeats, 9)
    train_sets = ["micro_zinc", "mutag"] if quick else ["micro_zinc", "mutag", "proteins", "exp",
                                                         "csl"]
    bounds = {"micro_zinc": 11, "mutag": 8, "proteins": 6, "exp": 6, "csl": 8}
    for name in train_sets:
        ds = load_dataset(name)
        regression = ds.task == "regression"
        runs = {}
        for model, kind in (("GIN", "gin"), ("CSGNN", "csgnn"), ("KP-GNN", "kpgnn")):
            cfg = StructureConfig(kind=kind, length_bound=bounds[name], hops=3)
            rels = build_relations(ds.graphs, cfg)
            batchers = {"auto": GraphBatcher(ds.graphs, rels, batch_size=batch,
                                             regression=regression)}
            if batchers["auto"].pad.block:  # dense picked: time the sparse layout too
                batchers["sparse"] = GraphBatcher(ds.graphs, rels, batch_size=batch,
                                                  regression=regression, layout="sparse")
            for layout, b in batchers.items():
                m = GraphNet(num_types=b.num_types, num_outputs=ds.num_outputs, width=width,
                             depth=depth)
                tr = Trainer(m, b, regression=regression,
                             loss="l1" if regression else "cross_entropy", lr_schedule=1e-3,
                             weight_decay=0.0, seed=0)
                state = tr.init_state(0)
                tr.compile(state)
                order = np.random.default_rng(0).permutation(len(ds)).tolist()  # as in training
                ids = b.pack(order)
                runs[(model, layout)] = {
                    "trainer": tr, "state": state, "batches": [b.batch(i) for i in ids],
                    "graphs": sum(len(i) for i in ids), "batcher": b, "times": [],
                    "relations_per_graph": float(np.mean([r.num_relations for r in rels]))}

        def epoch(run):
            import jax

            s = run["state"]
            for g in run["batches"]:
                s, out = run["trainer"]._train(s, g)
            jax.block_until_ready(out)
            run["state"] = s

        for run in runs.values():
            epoch(run)  # warm-up
        # Round-robin: each repeat times every model in turn, so drift in the machine's speed
        # hits all three alike; medians per model. A sample is >= 40 steps (CSL has 5 per epoch).
        per_sample = max(1, math.ceil(40 / len(runs["GIN", "auto"]["batches"])))
        for _ in range(step_repeats):
            for run in runs.values():
                t0 = time.perf_counter()
                for _ in range(per_sample):
                    epoch(run)
                run["times"].append(time.perf_counter() - t0)
        thr = {key: per_sample * run["graphs"] / float(np.median(run["times"]))
               for key, run in runs.items()}
        for (model, layout), run in runs.items():
            b = run["batcher"]
            records.append({"section": "train_step", "dataset": name, "model": model,
                            "layout": "dense" if b.pad.block else "sparse",
                            "default_layout": layout == "auto",
                            "graphs_per_s": thr[model, layout], "width": width, "depth": depth,
                            "batch_size": batch,
                            "relations_per_graph": run["relations_per_graph"],
                            "padded_relations": b.pad.n_edge, "padded_nodes": b.pad.n_node,
                            "dense_block": b.pad.block,
                            "num_relation_types": b.num_types, "repeats": step_repeats,
                            "slowdown_vs_gin": thr["GIN", "auto"] / thr[model, layout]})
        print(f"  {name:11s} train graphs/s: " + ", ".join(
            f"{m}{'' if lay == 'auto' else ' (sparse layout)'} {v:.0f}"
            for (m, lay), v in thr.items()) +
            f"  (CSGNN is {thr['GIN', 'auto'] / thr['CSGNN', 'auto']:.2f}x slower than GIN)",
            flush=True)
    return records


# ------------------------------------------------------------------------------------------
# plots and tables


def _plot(expr, speed, suffix: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots")
        return
    if expr:
        sets = list(dict.fromkeys(r["dataset"] for r in expr))
        fig, ax = plt.subplots(figsize=(9, 3.5))
        for k, model in enumerate(MODELS):
            vals = [next((r["distinguished"] / max(r["total"], 1) for r in expr
                          if r["model"] == model and r["dataset"] == s), 0) for s in sets]
            ax.bar([i + 0.27 * (k - 1) for i in range(len(sets))], vals, width=0.27, label=model)
        ax.set_xticks(range(len(sets)), sets, rotation=20)
        ax.set_ylabel("fraction distinguished")
        ax.set_title("untrained, float64, tol 1e-5")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"gnn_expressiveness{suffix}.png", dpi=110)
        plt.close(fig)
    if speed:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.5))
        cyc = [r for r in speed if r["section"] == "cycles"]
        pre = [r for r in speed if r["section"] == "preprocessing"]
        xs = range(len(cyc))
        a1.bar([x - 0.2 for x in xs], [r["speedup"] for r in cyc], width=0.4,
               label="cycle enumeration")
        a1.bar([x + 0.2 for x in xs], [r["speedup"] for r in pre], width=0.4,
               label="CSGNN preprocessing")
        a1.axhline(5, color="k", ls="--", lw=0.8)
        a1.set_xticks(list(xs), [r["dataset"] for r in cyc], rotation=30)
        a1.set_yscale("log")
        a1.set_ylabel("speedup vs networkx")
        a1.legend(fontsize=8)
        tr = [r for r in speed if r["section"] == "train_step" and r.get("default_layout", True)]
        sets = list(dict.fromkeys(r["dataset"] for r in tr))
        for k, model in enumerate(("GIN", "CSGNN", "KP-GNN")):
            vals = [next((r["graphs_per_s"] for r in tr if r["model"] == model
                          and r["dataset"] == s), 0) for s in sets]
            a2.bar([i + 0.27 * (k - 1) for i in range(len(sets))], vals, width=0.27, label=model)
        a2.set_xticks(range(len(sets)), sets, rotation=20)
        a2.set_ylabel("train graphs/s")
        a2.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / f"gnn_speed{suffix}.png", dpi=110)
        plt.close(fig)


def _tables(expr, acc, speed) -> str:
    lines = []
    if expr:
        sets = list(dict.fromkeys(r["dataset"] for r in expr))
        lines += ["| model | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
        for model in MODELS:
            cells = []
            for s in sets:
                r = next((r for r in expr if r["model"] == model and r["dataset"] == s), None)
                cells.append(f"{r['distinguished']}/{r['total']}" if r else "")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    if acc:
        lines += ["| dataset | model | metric | test (mean ± std) | Xu et al. protocol | runs |",
                  "|---|---|---|---|---|---|"]
        for r in acc:
            runs = f"{r['folds_run']}/{r['folds']} folds" if r["folds"] else "1 split"
            if r.get("seeds", 1) > 1:
                runs += f" x {r['seeds']} seeds"
            xu = r.get("xu_protocol")
            xu = f"{xu['mean']:.3f} ± {xu['std']:.3f}" if xu else ""
            lines.append(f"| {r['dataset']} | {r['model']} | {r['metric']} | "
                         f"{r['test_mean']:.3f} ± {r['test_std']:.3f} | {xu} | {runs} |")
        lines.append("")
        cnt = [r for r in acc if r["dataset"] == "counting"]
        if cnt:
            names = list(cnt[0]["test_mae_per_target"])
            lines += ["| counting MAE (std units) | " + " | ".join(names) + " |",
                      "|---" * (len(names) + 1) + "|"]
            for r in cnt:
                lines.append(f"| {r['model']} | " + " | ".join(
                    f"{r['test_mae_per_target'][n]:.3f}" for n in names) + " |")
            lines.append("")
    if speed:
        lines += ["| dataset | cycles vs networkx | preprocessing vs networkx |",
                  "|---|---|---|"]
        for r in [r for r in speed if r["section"] == "cycles"]:
            p = next(q for q in speed if q["section"] == "preprocessing"
                     and q["dataset"] == r["dataset"])
            lines.append(f"| {r['dataset']} | {r['speedup']:.1f}x | {p['speedup']:.1f}x |")
        lines += ["", "| dataset | GIN graphs/s | CSGNN graphs/s | KP-GNN graphs/s | "
                      "CSGNN slowdown |", "|---|---|---|---|---|"]
        tr = [r for r in speed if r["section"] == "train_step"]
        for s in dict.fromkeys(r["dataset"] for r in tr):
            v = {r["model"]: r for r in tr if r["dataset"] == s and r.get("default_layout", True)}
            alt = {r["model"]: r for r in tr if r["dataset"] == s
                   and not r.get("default_layout", True)}

            def cell(model, key, fmt):
                r = v[model]
                out = fmt.format(r[key]) + (" (dense)" if r.get("layout") == "dense" else "")
                if model in alt:
                    out += "; sparse " + fmt.format(alt[model][key])
                return out

            lines.append(f"| {s} | {cell('GIN', 'graphs_per_s', '{:.0f}')} | "
                         f"{cell('CSGNN', 'graphs_per_s', '{:.0f}')} | "
                         f"{cell('KP-GNN', 'graphs_per_s', '{:.0f}')} | "
                         f"{cell('CSGNN', 'slowdown_vs_gin', '{:.2f}x')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="jaxsys bench gnn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--expressiveness", action="store_true", help="untrained float64 checks")
    ap.add_argument("--accuracy", action="store_true", help="trained benchmarks")
    ap.add_argument("--speed", action="store_true", help="preprocessing and train-step speed")
    ap.add_argument("--quick", action="store_true", help="smoke run (minutes); *_quick.json")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    ap.add_argument("--datasets", default=None,
                    help="accuracy: comma-separated subset of configs (default: all); the "
                         "other datasets' records already in the JSON are kept")
    args = ap.parse_args()
    if not (args.expressiveness or args.accuracy or args.speed):
        args.expressiveness = args.accuracy = args.speed = True

    import jax

    from jaxsys.runtime import enable_compilation_cache

    enable_compilation_cache()
    suffix = "_quick" if args.quick else ""
    expr = acc = speed = None
    t0 = time.perf_counter()
    if args.expressiveness:
        print("== expressiveness (untrained, float64)", flush=True)
        expr = run_expressiveness(args.quick)
        write_results(f"gnn_expressiveness{suffix}", expr, protocol=(
            "untrained float64, random weights; distinguished = embeddings differ by > 1e-5 (L2) "
            "while each graph's random relabelling agrees within 1e-5"))
    if args.accuracy:
        print("== trained accuracy", flush=True)
        only = args.datasets.split(",") if args.datasets else None
        budget = {k: {"epochs": e, "patience": p, "max_folds": f, "seeds": n}
                  for k, (e, p, f, n) in (QUICK_BUDGET if args.quick else FULL_BUDGET).items()}
        acc = run_accuracy(args.quick, only, save=lambda recs: write_results(
            f"gnn_accuracy{suffix}", recs, budget=budget))
    if args.speed:
        print("== speed", flush=True)
        speed = run_speed(args.quick, 1 if args.quick else args.repeats)
        write_results(f"gnn_speed{suffix}", speed, repeats=1 if args.quick else args.repeats)
    _plot(expr, speed, suffix)
    print(_tables(expr, acc, speed))
    print(f"total {time.perf_counter() - t0:.0f}s on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
    main()
