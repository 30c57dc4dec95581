"""Expressiveness checks of untrained models: float64, random weights, relabelling-aware.

Protocol (the issue's): every graph is embedded together with a random relabelling of itself.
Two graphs count as distinguished when their embeddings differ by more than `tol` (L2 distance)
while each graph's own relabellings agree within `tol`. Reported units:

* pairs (EXP, CEXP, BREC): a pair is distinguished as above;
* classes (CSL): a class is distinguished when all its graphs (relabellings of one graph) agree
  within `tol` and every other class is farther than `tol`;
* graphs (SR25): a graph is distinguished when its relabelling agrees and every other graph is
  farther than `tol`.

Float64 runs inside a scoped `enable_x64` context, so it never leaks into other code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxsys.gnn._config import StructureConfig
from jaxsys.gnn._graph import Graph
from jaxsys.gnn._relations import Relations, build_relations

__all__ = ["ExpressivenessResult", "count_distinguished", "embed_graphs", "enable_x64"]


def enable_x64():
    """Scoped float64: `jax.enable_x64(True)` (jax >= 0.8) or the older experimental one."""
    import jax

    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as legacy  # pragma: no cover - jax < 0.8

    return legacy()


@dataclasses.dataclass(frozen=True)
class ExpressivenessResult:
    distinguished: int
    total: int
    unreliable: int  # units whose own relabellings disagreed (counted as not distinguished)


def embed_graphs(
    graphs: Sequence[Graph],
    structure: StructureConfig,
    *,
    width: int = 64,
    depth: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    relations: Sequence[Relations] | None = None,
) -> np.ndarray:
    """Float64 graph embeddings [len(graphs), (depth + 1) * width] of an untrained model."""
    import jax

    from jaxsys.gnn._batching import GraphBatcher
    from jaxsys.gnn._models import GraphNet

    rels = list(relations) if relations is not None else build_relations(list(graphs), structure)
    with enable_x64():
        batcher = GraphBatcher(graphs, rels, batch_size=batch_size, regression=False,
                               dtype=np.float64)
        model = GraphNet(num_types=batcher.num_types, num_outputs=1, width=width, depth=depth,
                         norm="none", dtype=jax.numpy.float64, param_dtype=jax.numpy.float64)
        first = batcher.batch(np.arange(min(1, len(graphs))))
        params = jax.jit(model.init)(jax.random.key(seed), first)  # eager init is ~10x slower
        embed = jax.jit(lambda p, g: model.apply(p, g, method=model.embed))
        out = []
        for ids in batcher.pack(list(range(len(graphs)))):
            e = np.asarray(embed(params, batcher.batch(ids)))
            out.append(e[:ids.shape[0]])
        return np.concatenate(out).astype(np.float64)


def _relabelled(graphs: Sequence[Graph], rng: np.random.Generator) -> list[Graph]:
    return [g.relabel(rng.permutation(g.num_nodes)) for g in graphs]


def count_distinguished(
    graphs: Sequence[Graph],
    unit: str,
    structure: StructureConfig,
    *,
    groups: np.ndarray | None = None,
    tol: float = 1e-5,
    width: int = 64,
    depth: int = 4,
    seed: int = 0,
) -> ExpressivenessResult:
    """Count distinguished units ("pairs", "classes" or "graphs"; see the module docstring).

    Args:
      graphs: for "pairs", consecutive graphs form a pair; for "classes", `groups` gives each
        graph's class; for "graphs", every graph is its own unit.
    """
    rng = np.random.default_rng(seed + 12345)
    both = list(graphs) + _relabelled(graphs, rng)
    emb = embed_graphs(both, structure, width=width, depth=depth, seed=seed)
    n = len(graphs)
    e, e2 = emb[:n], emb[n:]
    self_ok = np.linalg.norm(e - e2, axis=1) <= tol

    def dist(a, b):
        return np.linalg.norm(a - b)

    if unit == "pairs":
        total = n // 2
        good = unreliable = 0
        for i in range(total):
            a, b = 2 * i, 2 * i + 1
            if not (self_ok[a] and self_ok[b]):
                unreliable += 1
            elif dist(e[a], e[b]) > tol:
                good += 1
        return ExpressivenessResult(good, total, unreliable)
    if unit == "classes":
        if groups is None:
            raise ValueError("unit='classes' needs groups")
        classes = np.unique(groups)
        good = unreliable = 0
        for c in classes:
            members = np.flatnonzero(groups == c)
            others = np.flatnonzero(groups != c)
            agree = self_ok[members].all() and all(
                dist(e[members[0]], e[m]) <= tol for m in members)
            if not agree:
                unreliable += 1
                continue
            d_other = np.linalg.norm(e[others] - e[members[0]].reshape(1, -1), axis=1)
            if (d_other > tol).all():
                good += 1
        return ExpressivenessResult(good, len(classes), unreliable)
    if unit == "graphs":
        good = unreliable = 0
        for i in range(n):
            if not self_ok[i]:
                unreliable += 1
                continue
            d = np.linalg.norm(e - e[i].reshape(1, -1), axis=1)
            d[i] = np.inf
            if (d > tol).all():
                good += 1
        return ExpressivenessResult(good, n, unreliable)
    raise ValueError(f"unit must be 'pairs', 'classes' or 'graphs', got {unit!r}")
