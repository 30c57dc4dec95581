"""Targets, headline geometric means and the plot of an attention benchmark record.

Targets (`_common.target` entries, computed from the records of the same file):
  per configuration   ours vs naive >= its `vs_naive` (default half the byte ratio: sharing must
                      turn at least half of the KV it saves into time), ours vs split-KV >= its
                      `vs_splitkv` where the configuration names one
  geometric means     over every configuration, at each precision (the shipped default first):
                      vs naive >= the geometric mean of the per-configuration naive targets,
                      vs split-KV >= 1.5, and on a GPU vs the faster of JAX's two kernels (each
                      tuned) >= 1.9
  host plan           per engine shape, the host's work per decode step <= 10% of the step's
                      attention on the device
"""

from __future__ import annotations

import math
from pathlib import Path

from _common import geomean, target

from .configs import Config

GEOMEAN_VS_SPLITKV = 1.5
GEOMEAN_VS_JAX = 1.9
HOST_FRACTION = 0.1


def naive_target(cfg: Config, ratio: float) -> float:
    return cfg.vs_naive if cfg.vs_naive is not None else round(0.5 * ratio, 3)


def summary(records: list[dict], configs: tuple[Config, ...], precisions: tuple[str, ...]) -> dict:
    """Per precision: geometric means of ours' speedups over every configuration that ran, per baseline."""
    out = {}
    for p in precisions:
        ours = [r for r in records if r["variant"] == "ours" and r["precision"] == p and r.get("median_s")]
        row = {"configurations": f"{len(ours)}/{len(configs)}"}
        for key in ("naive", "splitkv", "jax_decode_attention", "jax_paged_attention", "jax_best"):
            vals = [r.get(f"speedup_vs_{key}") for r in ours]
            if vals and all(v for v in vals):
                row[f"geomean_vs_{key}"] = geomean(vals)
        out[p] = row
    return out


def targets(records: list[dict], configs: tuple[Config, ...], precisions: tuple[str, ...], gpu: bool,
            plan_records: list[dict] | None = None) -> list[dict]:
    out = []
    by_label = {c.label: c for c in configs}
    for p in precisions:
        tag = f" [{p}]" if gpu else ""
        ours = [r for r in records if r["variant"] == "ours" and r["precision"] == p and r.get("median_s")]
        naive_goals = []
        for r in ours:
            cfg = by_label[r["label"]]
            goal = naive_target(cfg, r["byte_ratio"])
            naive_goals.append(goal)
            if r.get("speedup_vs_naive"):
                out.append(target(f"{r['label']} vs naive{tag}", r["speedup_vs_naive"], goal))
            if cfg.vs_splitkv is not None:
                out.append(target(f"{r['label']} vs split-KV{tag}", r["speedup_vs_splitkv"], cfg.vs_splitkv))
        if not ours:
            continue
        n = f"{len(ours)}/{len(configs)} configurations"
        if all(r.get("speedup_vs_naive") for r in ours):
            out.append(target(f"geomean vs naive{tag}, {n}", geomean(r["speedup_vs_naive"] for r in ours),
                              round(geomean(naive_goals), 3)))
        out.append(target(f"geomean vs split-KV{tag}, {n}", geomean(r["speedup_vs_splitkv"] for r in ours),
                          GEOMEAN_VS_SPLITKV))
        if gpu and all(r.get("speedup_vs_jax_best") for r in ours):
            out.append(target(f"geomean vs JAX (faster of decode_attention, paged_attention; tuned){tag}, {n}",
                              geomean(r["speedup_vs_jax_best"] for r in ours), GEOMEAN_VS_JAX))
    for rec in plan_records or ():
        out.append(target(f"host plan / attention per decode step, {rec['shape']['label']} [{rec['precision']}]",
                          rec["host_fraction_of_attention"], HOST_FRACTION, higher_is_better=False))
    return out


def plot(records: list[dict], path: Path, title: str) -> None:
    """Bars of ours' speedups per configuration (one group per precision) over each baseline."""
    ours = [r for r in records if r["variant"] == "ours" and r.get("median_s")]
    if not ours:  # no configuration ran: nothing to plot
        return
    try:
        import matplotlib
    except ImportError:  # the JSON is the result
        print(f"matplotlib is not installed: no plot at {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in ours))
    precisions = list(dict.fromkeys(r["precision"] for r in ours))
    keys = [k for k in ("naive", "splitkv", "jax_best") if any(r.get(f"speedup_vs_{k}") for r in ours)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 0.5 * len(labels) + 2.5), sharey=True, squeeze=False)
    ys = list(range(len(labels)))
    for ax, key in zip(axes[0], keys):
        h = 0.8 / max(1, len(precisions))
        for j, p in enumerate(precisions):
            by = {r["label"]: r for r in ours if r["precision"] == p}
            vals = [(by.get(lab) or {}).get(f"speedup_vs_{key}") or 0.0 for lab in labels]
            ax.barh([y + (j - (len(precisions) - 1) / 2) * h for y in ys], vals, height=h, label=f"ours ({p})")
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_title(f"speedup vs {key}")
        if len(precisions) > 1:
            ax.legend(loc="lower right", fontsize=8)
    axes[0][0].set_yticks(ys, labels)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(x: float | None) -> str:
    return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:5.2f}"
