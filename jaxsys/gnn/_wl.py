"""Colour refinement (1-WL) over typed, weighted relations: the expressiveness upper bound.

A message-passing network with sum aggregation over the relations of `jaxsys.gnn._relations`
can separate two graphs only if this refinement does; with injective layers (float64, generic
random weights) it separates exactly those. The tests use it as the oracle for the untrained
models, and the expressiveness benchmark reports it next to the models.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from jaxsys.gnn._relations import Relations

__all__ = ["colour_refinement", "wl_distinguishes"]


def colour_refinement(
    graphs: Sequence[tuple[int, Relations, np.ndarray | None]],
    *,
    max_rounds: int | None = None,
) -> list[tuple[tuple[int, int], ...]]:
    """Jointly refine node colours of several graphs; return each graph's colour histogram.

    Args:
      graphs: `(num_nodes, relations, node_labels [N, F] or None)` per graph. Relation weights
        count as multiplicities; the relation types and the extra node features of `relations`
        are part of the colours.
      max_rounds: stop after this many rounds (default: until the partition is stable).

    Returns:
      Per graph, the sorted `(colour, count)` histogram of its final node colours; two graphs
      are separated iff their histograms differ.
    """
    palette: dict[object, int] = {}

    def colour_of(key: object) -> int:
        c = palette.get(key)
        if c is None:
            c = palette[key] = len(palette)
        return c

    colours: list[list[int]] = []
    incoming: list[list[list[tuple[int, int, float]]]] = []
    for n, rel, labels in graphs:
        feats = rel.node_features
        cols = []
        for v in range(n):
            lab = () if labels is None else tuple(np.asarray(labels[v]).reshape(-1).tolist())
            extra = tuple(feats[v].tolist()) if feats.shape[1] else ()
            cols.append(colour_of(("init", lab, extra)))
        colours.append(cols)
        inc: list[list[tuple[int, int, float]]] = [[] for _ in range(n)]
        for s, r, t, w in zip(rel.senders.tolist(), rel.receivers.tolist(), rel.types.tolist(),
                              rel.weights.tolist()):
            inc[r].append((s, t, w))
        incoming.append(inc)

    n_classes = len(set(c for cols in colours for c in cols))
    rounds = max_rounds if max_rounds is not None else max([g[0] for g in graphs] + [1])
    for _ in range(rounds):
        new_colours = []
        for cols, inc in zip(colours, incoming):
            new = []
            for v, rels in enumerate(inc):
                agg: Counter = Counter()
                for s, t, w in rels:
                    agg[(t, cols[s])] += w
                new.append(colour_of((cols[v], tuple(sorted(agg.items())))))
            new_colours.append(new)
        colours = new_colours
        k = len(set(c for cols in colours for c in cols))
        if k == n_classes:
            break
        n_classes = k
    return [tuple(sorted(Counter(cols).items())) for cols in colours]


def wl_distinguishes(a: tuple[int, Relations, np.ndarray | None],
                     b: tuple[int, Relations, np.ndarray | None]) -> bool:
    ha, hb = colour_refinement([a, b])
    return ha != hb
