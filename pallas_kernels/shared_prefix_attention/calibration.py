"""Fitting the balancer's `CostModel` to timed steps (pure numpy: no device, no timing).

The measurement (`benchmarks/attention.py`, phase "calibration") times star trees, one node of
P tokens shared by s requests (each with a short private suffix), for each item size s in
`item_sizes(query_block)` and each P in `LENGTHS`, each step both ways with the same tiles:
plain (`forced_plan(share=False)`) and shared (`forced_plan(share=True)`). Each timing is a
*point*: a dict with

  mode            "plain" or "share"
  s, P            requests and shared tokens of the tree
  request_tokens  s * P: what the plain path reads of the shared node
  chunk_tokens    padded chunk tokens the shared path reads (whole chunks of `chunk_pages`)
  min_s           the fastest repeat, seconds (the model describes the kernels, not the load
                  other processes put on the machine)

`fit_cost_model` turns points into a model. Per s, least-squares lines give

  plain:  t = a_p + tau_s * (s * P)            (tau_s: seconds per request-token)
  shared: t = a_s + sigma_s * chunk_tokens     (sigma_s: seconds per padded chunk token)

and kappa(s) = sigma_s / tau_s is the cost of one shared chunk token for an item of s requests,
in plain request-token units: `CostModel.shared_token_cost` (made monotone in s: a bigger item
never costs less). The step overhead decides whether a step shares at all, and the intercepts
estimate it poorly (two nearly parallel lines), so it is fitted to the decisions instead: every
calibration tree was timed both ways, so each candidate overhead loses a known time on them (a
tree decided wrongly loses |t_plain - t_share|), and the overhead that loses least is taken, one
per item size (`CostModel.step_overhead_by_size`: the sharing path's fixed cost grows with its
items' rows). A size whose trees all share profitably only bounds its overhead from above (half
its smallest saving is taken); two lengths bound it only to the interval between their savings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .config import CostModel

__all__ = ["LENGTHS", "item_sizes", "decision_loss", "min_regret_overhead", "fit_cost_model"]

LENGTHS = (1024, 2048, 4096, 8192)  # shared tokens P of the calibration trees


def item_sizes(query_block: int) -> list[int]:
    """Item sizes (requests) the calibration times: powers of two from 2 up to the query block."""
    return [s for s in (2, 4, 8, 16, 32, 64) if s <= query_block]


def decision_loss(cases: Sequence[tuple[float, float, float]], overhead: float) -> float:
    """Seconds lost on `cases` ((saving, t_plain, t_share) each) by the balancer's rule with this
    step overhead: share iff saving > overhead, and a wrong choice costs the difference."""
    return sum(max(0.0, (ts - tp) if sv > overhead else (tp - ts)) for sv, tp, ts in cases)


def min_regret_overhead(cases: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """The step overhead whose sharing decisions lose the least time on timed cases.

    cases: (saving, t_plain, t_share) per step timed both ways, `saving` the model's plain cost
    minus its shared cost without overhead (tokens). The loss is a step function of the overhead
    that changes only at the savings, so each interval between them is tried. Returns
    (overhead, loss in seconds): the middle of the first interval that loses least (a quarter
    above the largest saving when it is the last, unbounded one).
    """
    edges = sorted({0.0} | {max(0.0, float(sv)) for sv, _, _ in cases})
    losses = [decision_loss(cases, e) for e in edges]
    i = min(range(len(edges)), key=lambda j: losses[j])
    overhead = (edges[i] + edges[i + 1]) / 2 if i + 1 < len(edges) else edges[i] * 1.25
    return overhead, losses[i]


def fit_cost_model(points: Sequence[Mapping]) -> tuple[dict, CostModel]:
    """The balancer's `CostModel` from calibration points (see the module docstring).

    Returns (the fit's JSON record: per-size lines, the intercept estimates, the cases and the
    time each overhead rule loses on them; the model). Needs, per item size, plain and shared
    points at two or more lengths."""
    sizes = sorted({p["s"] for p in points})
    kappa, overhead, residual, fits = {}, [], [], {}
    for s in sizes:
        plain = sorted((p for p in points if p["mode"] == "plain" and p["s"] == s), key=lambda p: p["P"])
        share = sorted((p for p in points if p["mode"] == "share" and p["s"] == s), key=lambda p: p["P"])
        if len(plain) < 2 or len(share) < 2:
            raise ValueError(f"item size {s} needs plain and shared points at two or more lengths")
        x_p, y_p = np.array([p["request_tokens"] for p in plain], float), np.array([p["min_s"] for p in plain])
        tau, a_p = np.polyfit(x_p, y_p, 1)
        sigma, a_s = np.polyfit([p["chunk_tokens"] for p in share], [p["min_s"] for p in share], 1)
        kappa[s] = float(sigma / tau)
        overhead.append(float((a_s - a_p) / tau))
        residual.append(float(np.sqrt(np.mean((y_p - (tau * x_p + a_p)) ** 2)) / np.mean(y_p)))
        fits[str(s)] = {"tau_s_per_request_token": float(tau), "plain_intercept_s": float(a_p),
                        "sigma_s_per_chunk_token": float(sigma), "shared_intercept_s": float(a_s),
                        "kappa_raw": float(sigma / tau), "plain_fit_relative_rms": residual[-1]}
    run = 0.0
    for s in sizes:  # monotone: a bigger item never costs less per token
        run = max(run, kappa[s])
        kappa[s] = round(max(run, 1e-3), 3)
    # a star's only shared node saves s * P request-tokens for chunk_tokens at kappa(s) each (the
    # balancer's own arithmetic for an item of s <= query_block requests)
    by = {(p["mode"], p["s"], p["P"]): p for p in points}
    cases: dict[int, list] = {s: [] for s in sizes}
    for (mode, s, length), p in sorted(by.items()):
        if mode == "plain" and ("share", s, length) in by:
            share = by[("share", s, length)]
            cases[s].append((p["request_tokens"] - share["chunk_tokens"] * kappa[s], p["min_s"], share["min_s"]))
    every = [c for s in sizes for c in cases[s]]
    step_overhead, lost = min_regret_overhead(every)
    by_size = {s: min_regret_overhead(cases[s]) for s in sizes if cases[s]}
    fitted = CostModel(shared_token_cost=tuple((s, kappa[s]) for s in sizes),
                       step_overhead_by_size=tuple((s, round(o, 1)) for s, (o, _) in by_size.items()))
    straightest = int(np.argmin(residual))
    record = {
        "fits": fits,
        "step_overhead_per_s": overhead,
        "step_overhead_straightest_fit": {"s": sizes[straightest], "tokens": max(0.0, overhead[straightest]),
                                          "lost_s": decision_loss(every, max(0.0, overhead[straightest]))},
        "step_overhead_fit": {"tokens": step_overhead, "lost_s": lost,
                              "cases": [{"s": s, "saving": sv, "plain_s": tp, "share_s": ts}
                                        for s in sizes for sv, tp, ts in cases[s]]},
        "step_overhead_by_size_fit": {str(s): {"tokens": o, "lost_s": lo} for s, (o, lo) in by_size.items()},
    }
    return record, fitted
