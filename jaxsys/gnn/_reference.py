"""The networkx reference for CSGNN's preprocessing, and the canonical forms that compare with it.

The CSGNN authors enumerate chordless cycles with `networkx.chordless_cycles` and build the
cyclic-distance relations with Python loops over the node pairs of each cycle. The functions here
do exactly that, one graph at a time. They are the truth for our vectorised path
(`chordless_cycles_batch`, `build_relations`) and the baseline it is timed against:
`benchmarks/gnn.py --speed` checks, graph by graph, that both give the same cycle sets and the
same relation sets on every graph it times, and the tests check it on random graphs.

Canonical forms:

* a cycle is compared as `canonical_cycle(cycle)` (start at its smallest node, go towards the
  smaller neighbour), and a graph's cycles as the sorted list of those, so a cycle reported twice
  shows up as a difference;
* a graph's relations are compared as the set of `(sender, receiver, type, weight)`, where
  weight is the number of shared chordless cycles (1 for an edge); a (sender, receiver, type)
  key appears at most once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from jaxsys.gnn._cycles import canonical_cycle

if TYPE_CHECKING:
    from jaxsys.gnn._config import StructureConfig
    from jaxsys.gnn._graph import Graph
    from jaxsys.gnn._relations import Relations

__all__ = [
    "ReferenceMismatch",
    "canonical_cycles",
    "check_same_cycles",
    "check_same_relations",
    "networkx_chordless_cycles",
    "networkx_csgnn_relations",
    "relation_set",
]

RelationSet = frozenset[tuple[int, int, int, int]]


def canonical_cycles(cycles: Iterable[Sequence[int]] | Mapping[int, np.ndarray]
                     ) -> list[tuple[int, ...]]:
    """Sorted canonical cycles, from a list of cycles or from `{length: int [M, L]}` arrays."""
    if isinstance(cycles, Mapping):
        cycles = [row for rows in cycles.values() for row in np.asarray(rows).tolist()]
    return sorted(canonical_cycle(c) for c in cycles)


def networkx_chordless_cycles(graph: Graph, length_bound: int | None) -> list[list[int]]:
    """`networkx.chordless_cycles` of one graph (node lists in networkx's own order)."""
    import networkx as nx

    return [list(c) for c in nx.chordless_cycles(graph.to_networkx(), length_bound)]


def networkx_csgnn_relations(graph: Graph, cfg: StructureConfig) -> Counter:
    """CSGNN's relations the authors' way: networkx chordless cycles + Python pair loops.

    Returns `{(sender, receiver, type): count}`. Type 0 is each edge in both directions; type
    1 + d holds the ordered pairs at cyclic distance d <= max_distance on a shared chordless
    cycle, counted once per such cycle (d = 0: a node with itself, once per cycle through it).
    Covers the plain CSGNN spec: one type per distance, no complement graph, no node flags.
    """
    import networkx as nx

    if cfg.kind != "csgnn" or cfg.typed_by_length or cfg.complement or cfg.flag_lengths:
        raise ValueError("the networkx reference covers kind='csgnn' with one type per distance, "
                         f"no complement and no flags; got {cfg}")
    dmax = cfg.length_bound // 2 if cfg.max_distance is None else cfg.max_distance
    g = graph.to_networkx()
    out: Counter = Counter()
    for u, v in g.edges():
        out[(u, v, 0)] += 1
        out[(v, u, 0)] += 1
    for cyc in nx.chordless_cycles(g, cfg.length_bound):
        length = len(cyc)
        for i, u in enumerate(cyc):
            for j, v in enumerate(cyc):
                d = min(abs(i - j), length - abs(i - j))
                if d <= dmax:
                    out[(u, v, 1 + d)] += 1
    return out


def relation_set(relations: Relations | Mapping[tuple[int, int, int], int]) -> RelationSet:
    """One graph's relations as `(sender, receiver, type, weight)` tuples.

    Takes our `Relations` or the reference's `{(sender, receiver, type): count}`. Raises
    ValueError when a weight is not a whole number or a (sender, receiver, type) key repeats.
    """
    if isinstance(relations, Mapping):
        keys = [tuple(int(x) for x in k) for k in relations]
        weights = np.asarray(list(relations.values()), np.float64)
    else:
        keys = list(zip(relations.senders.tolist(), relations.receivers.tolist(),
                        relations.types.tolist()))
        weights = relations.weights.astype(np.float64)
    if (weights != np.round(weights)).any():
        raise ValueError("relation weights are cycle counts and must be whole numbers")
    if len(set(keys)) != len(keys):
        raise ValueError("a (sender, receiver, type) relation is listed more than once")
    return frozenset((*k, w) for k, w in zip(keys, np.round(weights).astype(np.int64).tolist()))


class ReferenceMismatch(AssertionError):
    """Our structures differ from the networkx reference on some graph."""


def check_same_cycles(ours: Sequence[Mapping[int, np.ndarray]],
                      reference: Sequence[Iterable[Sequence[int]]]) -> int:
    """Raise `ReferenceMismatch` unless every graph has the same canonical cycles in both.

    `ours` is `chordless_cycles_batch`'s output, `reference` networkx's cycles per graph.
    Returns the number of cycles compared.
    """
    if len(ours) != len(reference):
        raise ReferenceMismatch(f"{len(ours)} graphs against {len(reference)} in the reference")
    total = 0
    for i, (a, b) in enumerate(zip(ours, reference)):
        ca, cb = canonical_cycles(a), canonical_cycles(b)
        if ca != cb:
            only_a = sorted(set(ca) - set(cb))[:3]
            only_b = sorted(set(cb) - set(ca))[:3]
            raise ReferenceMismatch(f"graph {i}: {len(ca)} cycles against networkx's {len(cb)}; "
                                    f"only ours: {only_a}; only networkx's: {only_b}")
        total += len(ca)
    return total


def check_same_relations(ours: Sequence[Relations],
                         reference: Sequence[Mapping[tuple[int, int, int], int]]) -> int:
    """Raise `ReferenceMismatch` unless every graph has the same relation set in both.

    `reference` is `networkx_csgnn_relations`' output per graph. Returns the number of
    relations compared.
    """
    if len(ours) != len(reference):
        raise ReferenceMismatch(f"{len(ours)} graphs against {len(reference)} in the reference")
    total = 0
    for i, (r, ref) in enumerate(zip(ours, reference)):
        mine, ref = relation_set(r), relation_set(ref)
        if mine != ref:
            raise ReferenceMismatch(
                f"graph {i}: {len(mine)} relations against the reference's {len(ref)}; only "
                f"ours: {sorted(mine - ref)[:3]}; only the reference's: {sorted(ref - mine)[:3]}")
        total += len(mine)
    return total
