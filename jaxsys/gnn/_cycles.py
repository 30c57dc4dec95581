"""Exact enumeration of chordless (induced) cycles with a length bound, for many graphs at once.

A chordless cycle is a simple cycle whose vertex set induces exactly the cycle: no edge joins two
non-consecutive vertices. Because the vertex set determines the cycle, each one is reported once,
canonically: it starts at its smallest vertex `s` and continues towards the smaller of the two
cycle neighbours of `s`.

Algorithm (our own; same cycle sets as `networkx.chordless_cycles` on simple graphs, which the
property tests check). Every cycle is rooted at its smallest vertex `s` and closes at `t` with
`v1 < t`, where `v1` is its second vertex. From each root pair `(s, v1)` (an edge, `v1 > s`) we
grow induced paths `s, v1, v2, ..., vk` over vertices `> s`:

* a candidate `w` for the next vertex is a neighbour of `vk` that is adjacent to none of
  `s, v1, ..., v(k-1)` and not on the path ("blocked" is kept as a bitset);
* a candidate in `ends(s, v1) = {t in N(s): t > v1, t not adjacent to v1}` closes a cycle;
* the others extend the path, but only if they can still reach `ends` within the length bound:
  a breadth-first search from `ends` through the allowed interior vertices, once per root pair,
  gives that distance, and prunes most dead-end paths (the reason CSL-size bounds stay cheap).

The search is level-synchronous and vectorised with numpy over *all* root pairs of *all* graphs
of a chunk: a state is one path, its neighbourhood bitsets are rows of `uint64` words, and one
level extends every live path of every graph with a few array operations. This avoids the
per-node Python work that dominates `networkx.chordless_cycles`; `benchmarks/gnn.py --speed`
measures the ratio. Live states are processed in slices of at most `max_states`, so memory stays
bounded on dense graphs, and a per-graph `max_cycles` guard stops graphs whose cycle count
explodes (complements of sparse graphs, cliques) with an error or, on request, a truncated set
and a warning.

Self-loops and parallel edges are not part of this model: graphs are normalised first
(`jaxsys.gnn.normalize_edges`); `adjacency_bitsets` rejects a self-loop outright.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "CycleCountExceeded",
    "canonical_cycle",
    "chordless_cycle_arrays",
    "chordless_cycles",
    "chordless_cycles_batch",
]

_ONE = np.uint64(1)


class CycleCountExceeded(RuntimeError):
    """Raised when a graph has more chordless cycles than the configured cap allows."""


def canonical_cycle(cycle: Sequence[int]) -> tuple[int, ...]:
    """Rotation/reflection-invariant form: start at the minimum, go towards the smaller neighbour."""
    c = [int(x) for x in cycle]
    i = c.index(min(c))
    c = c[i:] + c[:i]
    if len(c) > 2 and c[-1] < c[1]:
        c = [c[0]] + c[1:][::-1]
    return tuple(c)


# ----------------------------------------------------------------------------------------------
# uint64 bitset rows: shape [..., W], node i is bit i % 64 of word i // 64.


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    b = np.unpackbits(np.ascontiguousarray(x).view(np.uint8), axis=-1)
    return b.reshape(x.shape + (64,)).sum(-1)


def _bit(idx: np.ndarray, w: int) -> np.ndarray:
    """One-hot bitsets [len(idx), W]."""
    out = np.zeros((idx.shape[0], w), np.uint64)
    out[np.arange(idx.shape[0]), idx // 64] = _ONE << (idx % 64).astype(np.uint64)
    return out


def _upto(idx: np.ndarray, w: int) -> np.ndarray:
    """Bitsets of {0..idx} (inclusive), [len(idx), W]."""
    word = (idx // 64).reshape(-1, 1)
    j = np.arange(w).reshape(1, -1)
    off = (idx % 64).astype(np.uint64).reshape(-1, 1)
    # (1 << (off + 1)) - 1 without overflow at off = 63: ((1 << off) - 1) | (1 << off).
    partial = ((_ONE << off) - _ONE) | (_ONE << off)
    full = np.uint64(0xFFFFFFFFFFFFFFFF)
    return np.where(j < word, full, np.where(j == word, partial, np.uint64(0))).astype(np.uint64)


def _expand(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Set bits of rows [Q, W] as (row, node) pairs, rows ascending within each word pass."""
    rows_l, nodes_l = [], []
    for j in range(m.shape[1]):
        idx = np.flatnonzero(m[:, j])
        x = m[idx, j]
        while idx.size:
            low = x & (~x + _ONE)
            rows_l.append(idx)
            nodes_l.append(np.log2(low.astype(np.float64)).astype(np.int64) + 64 * j)
            x = x ^ low
            keep = x != 0
            idx, x = idx[keep], x[keep]
    if not rows_l:
        e = np.zeros((0,), np.int64)
        return e, e
    rows = np.concatenate(rows_l)
    nodes = np.concatenate(nodes_l)
    order = np.argsort(rows, kind="stable")
    return rows[order], nodes[order]


def _or_rows(rows: np.ndarray, vals: np.ndarray, q: int) -> np.ndarray:
    """out[r] = OR of vals[i] over rows[i] == r, for sorted rows; [q, W]."""
    out = np.zeros((q, vals.shape[1]), np.uint64)
    if rows.size:
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        out[rows[starts]] = np.bitwise_or.reduceat(vals, starts, axis=0)
    return out


def _any(m: np.ndarray) -> np.ndarray:
    return (m != 0).any(axis=1)


# ----------------------------------------------------------------------------------------------


def _prepare(graphs: Sequence[tuple[int, object]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate all graphs at once: (num_nodes [G], edge graph ids [E], unique edges [E, 2] u<v)."""
    sizes = np.asarray([int(n) for n, _ in graphs], np.int64)
    if (sizes < 0).any():
        raise ValueError("num_nodes must be >= 0")
    arrs = [np.asarray(e, dtype=np.int64).reshape(-1, 2) for _, e in graphs]
    counts = np.asarray([a.shape[0] for a in arrs], np.int64)
    if counts.sum() == 0:
        z = np.zeros((0,), np.int64)
        return sizes, z, np.zeros((0, 2), np.int64)
    e = np.concatenate(arrs)
    gid = np.repeat(np.arange(len(arrs)), counts)
    n_of = sizes[gid]
    bad = (e < 0).any(1) | (e >= n_of.reshape(-1, 1)).any(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"graph {int(gid[i])}: edge {e[i].tolist()} references a node outside "
                         f"0..{int(n_of[i]) - 1}")
    loops = e[:, 0] == e[:, 1]
    if loops.any():
        i = int(np.flatnonzero(loops)[0])
        raise ValueError(
            f"graph {int(gid[i])}: self-loop on node {int(e[i, 0])}; chordless cycles are defined "
            "on simple graphs; normalise the graph first (normalize_edges(..., self_loops='drop'))")
    lo, hi = np.minimum(e[:, 0], e[:, 1]), np.maximum(e[:, 0], e[:, 1])
    m = int(sizes.max())
    key = (gid * m + lo) * m + hi  # each undirected edge once, sorted by graph
    key = np.unique(key)
    hi = key % m
    lo = (key // m) % m
    gid = key // (m * m)
    return sizes, gid, np.stack([lo, hi], axis=1)


def chordless_cycles_batch(
    graphs: Sequence[tuple[int, object]],
    *,
    length_bound: int | None = None,
    min_length: int = 3,
    max_cycles: int | None = None,
    on_exceed: str = "error",
    max_states: int = 1 << 20,
    chunk_nodes: int = 4096,
) -> list[dict[int, np.ndarray]]:
    """Chordless cycles of many simple undirected graphs.

    Args:
      graphs: `(num_nodes, edges)` per graph; edges `[E, 2]` (each undirected edge once or in
        both directions; self-loops raise).
      length_bound: longest cycle reported (None: no bound). Must be >= 3 when given.
      min_length: shortest cycle reported (>= 3; shorter cycles do not exist in simple graphs).
      max_cycles: per-graph guard against exploding cycle counts; None disables it.
      on_exceed: once a graph has more than `max_cycles` cycles: "error" raises
        `CycleCountExceeded`; "warn" keeps `max_cycles` of them (shortest first), stops that
        graph's search and warns (a truncated, not an exact, set).
      max_states: live paths processed at once (memory bound, not a result bound).
      chunk_nodes: graphs are processed in chunks of about this many nodes in total.

    Returns:
      Per graph, `{L: int32 [M_L, L]}`: its cycles of length L as canonical rows.
    """
    if length_bound is not None and length_bound < 3:
        raise ValueError(f"length_bound must be >= 3 (or None), got {length_bound}")
    if min_length < 3:
        raise ValueError(f"min_length must be >= 3, got {min_length}")
    if on_exceed not in ("error", "warn"):
        raise ValueError(f"on_exceed must be 'error' or 'warn', got {on_exceed!r}")
    sizes, edge_gid, edges = _prepare(graphs)
    results: list[dict[int, np.ndarray]] = [{} for _ in graphs]
    edge_start = np.searchsorted(edge_gid, np.arange(len(graphs) + 1))
    order = np.argsort(sizes, kind="stable").tolist()
    chunk: list[int] = []
    total = 0
    for i in order + [-1]:
        if i >= 0 and (not chunk or total + sizes[i] <= chunk_nodes):
            chunk.append(i)
            total += int(sizes[i])
            continue
        if chunk:
            ids = np.asarray(chunk)
            sel = np.concatenate([np.arange(edge_start[c], edge_start[c + 1]) for c in chunk])
            pos = np.empty(len(graphs), np.int64)
            pos[ids] = np.arange(ids.shape[0])
            local = pos[edge_gid[sel]]
            _run_chunk(sizes[ids], local, edges[sel], chunk, results, length_bound, min_length,
                       max_cycles, on_exceed, max_states)
        chunk, total = ([i], int(sizes[i])) if i >= 0 else ([], 0)
    return results


def _run_chunk(sizes, pg, pairs, global_ids, results, length_bound, min_length, max_cycles,
               on_exceed, max_states) -> None:
    """One chunk: graphs with `sizes`, edges `pairs` [E, 2] (u < v) of local graph ids `pg`."""
    n_max = int(sizes.max())
    w = max(1, (n_max + 63) // 64)
    g_count = sizes.shape[0]
    adj_GxNxW = np.zeros((g_count, max(n_max, 1), w), np.uint64)
    u, v = pairs[:, 0], pairs[:, 1]
    np.bitwise_or.at(adj_GxNxW, (pg, u, v // 64), _ONE << (v % 64).astype(np.uint64))
    np.bitwise_or.at(adj_GxNxW, (pg, v, u // 64), _ONE << (u % 64).astype(np.uint64))
    bounds = sizes if length_bound is None else np.minimum(sizes, length_bound)
    bound = int(bounds.max()) if g_count else 0
    counts = np.zeros(g_count, np.int64)
    stopped = np.zeros(g_count, bool)
    found: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

    def emit(g_of_row: np.ndarray, cyc: np.ndarray) -> None:
        """Record cycles [M, L] of graphs g_of_row, enforcing bounds and the per-graph cap."""
        length = cyc.shape[1]
        ok = (length <= bounds[g_of_row]) & ~stopped[g_of_row]
        g_of_row, cyc = g_of_row[ok], cyc[ok]
        if not g_of_row.size:
            return
        if max_cycles is not None:
            new = np.bincount(g_of_row, minlength=g_count)
            over = np.flatnonzero(counts + new > max_cycles)
            if over.size:
                gi = int(over[0])
                n = int(sizes[gi])
                if on_exceed == "error":
                    raise CycleCountExceeded(
                        f"graph {global_ids[gi]} ({n} nodes) has more than {max_cycles} chordless "
                        f"cycles of length <= {int(bounds[gi])}; raise max_cycles, lower "
                        "length_bound, or set on_exceed='warn' to keep a truncated set")
                # Keep the first (max_cycles - counts[g]) rows of each over-full graph.
                srt = np.argsort(g_of_row, kind="stable")
                gs = g_of_row[srt]
                first_of = np.searchsorted(gs, gs)
                rank = np.empty_like(srt)
                rank[srt] = np.arange(srt.shape[0]) - first_of
                keep = rank < (max_cycles - counts[g_of_row])
                for g in over.tolist():
                    warnings.warn(
                        f"chordless-cycle search stopped after {max_cycles} cycles in graph "
                        f"{global_ids[g]} ({int(sizes[g])} nodes): its relations are built from a "
                        "truncated cycle set", UserWarning, stacklevel=4)
                stopped[over] = True
                g_of_row, cyc = g_of_row[keep], cyc[keep]
                new = np.bincount(g_of_row, minlength=g_count)
            counts[:] += new
        found.setdefault(length, []).append((g_of_row, cyc.astype(np.int32)))

    # ---- root pairs (g, s, v1): every edge, s < v1.
    if not pg.size:
        _collect(found, global_ids, results)
        return
    ps, pv = u, v
    n_s = adj_GxNxW[pg, ps]
    n_v = adj_GxNxW[pg, pv]
    upto_s = _upto(ps, w)
    first = n_s & ~upto_s
    above_v = ~_upto(pv, w)
    # Triangles (s, v1, t), t > v1.
    if min_length <= 3 <= bound:
        rows, t = _expand(n_v & first & above_v)
        emit(pg[rows], np.stack([ps[rows], pv[rows], t], axis=1))
    if bound < 4:
        _collect(found, global_ids, results)
        return
    ends = first & above_v & ~n_v
    keep = _any(ends) & (bounds[pg] >= 4)
    pg, ps, pv, n_s, n_v, upto_s, ends = (x[keep] for x in (pg, ps, pv, n_s, n_v, upto_s, ends))
    if not pg.size:
        _collect(found, global_ids, results)
        return
    # within[p, j]: vertices at distance <= j from ends(p) through allowed interior vertices.
    depth = bound - 4
    base = ~upto_s & ~n_s
    interior = base & ~n_v & ~_bit(pv, w)
    within = np.zeros((pg.shape[0], depth + 1, w), np.uint64)
    within[:, 0] = reach = frontier = ends
    for j in range(1, depth + 1):
        rows, u = _expand(frontier)
        nxt = _or_rows(rows, adj_GxNxW[pg[rows], u], pg.shape[0]) & interior & ~reach
        reach = reach | nxt
        within[:, j] = reach
        frontier = nxt
        if not frontier.any():
            within[:, j + 1:] = reach[:, None, :]
            break
    # ---- level 3 states: paths (s, v1, v2), v2 in N(v1), v2 > s, v2 not in N(s), and v2 has a
    # neighbour within distance (bound - 4) of ends.
    rows, v2 = _expand(n_v & base)
    near = _any(adj_GxNxW[pg[rows], v2] & within[rows, depth])
    rows, v2 = rows[near], v2[near]
    state_pi = rows
    state_path = np.stack([ps[rows], pv[rows], v2], axis=1)
    state_blocked = upto_s[rows] | n_v[rows] | _bit(pv[rows], w) | _bit(v2, w)
    # Graph-specific bounds: a path of k vertices may extend only if k + 2 <= bound(g).
    work = [(state_pi, state_path, state_blocked)]
    while work:
        pi, path, blocked = work.pop()
        if pi.shape[0] > max_states:
            half = pi.shape[0] // 2
            work.append((pi[half:], path[half:], blocked[half:]))
            work.append((pi[:half], path[:half], blocked[:half]))
            continue
        live = ~stopped[pg[pi]]
        pi, path, blocked = pi[live], path[live], blocked[live]
        if not pi.size:
            continue
        k = path.shape[1]
        last = path[:, -1]
        n_last = adj_GxNxW[pg[pi], last]
        cand = n_last & ~blocked
        if k + 1 >= min_length:
            rows, t = _expand(cand & ends[pi])
            if rows.size:
                emit(pg[pi[rows]], np.concatenate([path[rows], t.reshape(-1, 1)], axis=1))
        j = bound - k - 1  # next vertex must be within distance j of ends
        if j < 1:
            continue
        ext = cand & within[pi, j] & ~ends[pi]
        ext[bounds[pg[pi]] < k + 2] = 0
        rows, x = _expand(ext)
        if not rows.size:
            continue
        work.append((pi[rows], np.concatenate([path[rows], x.reshape(-1, 1)], axis=1),
                     blocked[rows] | n_last[rows] | _bit(x, w)))
    _collect(found, global_ids, results)


def _collect(found, global_ids, results) -> None:
    for length, parts in found.items():
        g_all = np.concatenate([p[0] for p in parts])
        c_all = np.concatenate([p[1] for p in parts])
        order = np.argsort(g_all, kind="stable")
        g_all, c_all = g_all[order], c_all[order]
        bounds = np.searchsorted(g_all, np.arange(len(global_ids) + 1))
        for gi, gid in enumerate(global_ids):
            lo, hi = bounds[gi], bounds[gi + 1]
            if hi > lo:
                results[gid][length] = c_all[lo:hi]


def chordless_cycle_arrays(
    num_nodes: int,
    edges: Iterable[tuple[int, int]] | np.ndarray,
    *,
    length_bound: int | None = None,
    min_length: int = 3,
    max_cycles: int | None = None,
    on_exceed: str = "error",
) -> dict[int, np.ndarray]:
    """Chordless cycles of one graph grouped by length: `{L: int32 [M_L, L]}` (canonical rows)."""
    return chordless_cycles_batch(
        [(num_nodes, edges)], length_bound=length_bound, min_length=min_length,
        max_cycles=max_cycles, on_exceed=on_exceed)[0]


def chordless_cycles(
    num_nodes: int,
    edges: Iterable[tuple[int, int]] | np.ndarray,
    *,
    length_bound: int | None = None,
    min_length: int = 3,
    max_cycles: int | None = None,
    on_exceed: str = "error",
) -> list[tuple[int, ...]]:
    """All chordless cycles of a simple undirected graph with `min_length <= len <= length_bound`.

    Args:
      num_nodes: number of nodes; nodes are `0..num_nodes-1` (isolated nodes are fine).
      edges: undirected edges `(u, v)`, each once or in both directions; self-loops raise.
      length_bound: longest cycle reported (None: no bound). Must be >= 3 when given.
      min_length: shortest cycle reported (>= 3).
      max_cycles: guard against a cycle count that explodes; None disables it.
      on_exceed: "error" (raise `CycleCountExceeded`) or "warn" (truncate, shortest first).

    Returns:
      Cycles as canonical tuples (see `canonical_cycle`), shortest first.
    """
    arrays = chordless_cycle_arrays(num_nodes, edges, length_bound=length_bound,
                                    min_length=min_length, max_cycles=max_cycles,
                                    on_exceed=on_exceed)
    return [tuple(row) for length in sorted(arrays) for row in arrays[length].tolist()]
