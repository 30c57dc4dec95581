"""Relations of CSGNN / KP-GNN / GIN against literal reference constructions; bad input."""

import dataclasses
from collections import Counter

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxsys.gnn._relations as rel_mod
from jaxsys.gnn import (
    CycleCountExceeded,
    Graph,
    ReferenceMismatch,
    Relations,
    StructureConfig,
    build_relations,
    check_same_relations,
    colour_refinement,
    make_counting,
    make_csl,
    networkx_csgnn_relations,
    normalize_edges,
    num_relation_types,
    relation_set,
)


def _as_counter(r):
    return Counter({(int(s), int(v), int(t)): float(w) for s, v, t, w in
                    zip(r.senders, r.receivers, r.types, r.weights)})


@st.composite
def small_graphs(draw):
    n = draw(st.integers(1, 10))
    rnd = draw(st.randoms(use_true_random=False))
    p = draw(st.floats(0.1, 0.8))
    edges = [(u, v) for u in range(n) for v in range(u + 1, n) if rnd.random() < p]
    return Graph.create(n, np.asarray(edges, np.int64).reshape(-1, 2))


def test_networkx_reference_on_hand_computed_graphs():
    """The reference itself, against relation sets worked out by hand."""
    # A square 0-1-2-3 with the chord 0-2: two chordless triangles, (0, 1, 2) and (0, 2, 3).
    g = Graph.create(4, [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)])
    edges = {(u, v, 0, 1) for a, b in [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)]
             for u, v in [(a, b), (b, a)]}
    self_pairs = {(0, 0, 1, 2), (1, 1, 1, 1), (2, 2, 1, 2), (3, 3, 1, 1)}
    apart = {(0, 1, 2, 1), (1, 0, 2, 1), (1, 2, 2, 1), (2, 1, 2, 1), (0, 2, 2, 2), (2, 0, 2, 2),
             (2, 3, 2, 1), (3, 2, 2, 1), (0, 3, 2, 1), (3, 0, 2, 1)}
    expected = edges | self_pairs | apart
    cfg = StructureConfig(kind="csgnn", length_bound=4)
    assert relation_set(networkx_csgnn_relations(g, cfg)) == expected
    # A plain 5-cycle: nothing with length_bound 4; distances 0, 1, 2 with length_bound 5.
    c5 = Graph.create(5, [(i, (i + 1) % 5) for i in range(5)])
    c5_edges = {(u, v, 0, 1) for i in range(5) for u, v in [(i, (i + 1) % 5), ((i + 1) % 5, i)]}
    assert relation_set(networkx_csgnn_relations(c5, StructureConfig(kind="csgnn",
                                                                   length_bound=4))) == c5_edges
    ring = {(i, j, 1 + min((i - j) % 5, (j - i) % 5), 1) for i in range(5) for j in range(5)}
    assert relation_set(networkx_csgnn_relations(
        c5, StructureConfig(kind="csgnn", length_bound=5))) == c5_edges | ring
    with pytest.raises(ValueError, match="networkx reference covers"):
        networkx_csgnn_relations(g, StructureConfig(kind="csgnn", typed_by_length=True))


@settings(max_examples=60, deadline=None)
@given(g=small_graphs(), bound=st.sampled_from([4, 6, 8]),
       max_distance=st.sampled_from([None, 0, 1, 2]))
def test_our_relations_are_the_networkx_pipelines_as_sets(g, bound, max_distance):
    cfg = StructureConfig(kind="csgnn", length_bound=bound, max_distance=max_distance)
    (r,) = build_relations([g], cfg)
    assert relation_set(r) == relation_set(networkx_csgnn_relations(g, cfg))
    dmax = bound // 2 if max_distance is None else max_distance
    assert r.num_types == num_relation_types(cfg) == 1 + dmax + 1
    seg = r.receivers.astype(np.int64) * r.num_types + r.types
    assert (np.diff(seg) >= 0).all()  # sorted (receiver, type) segments: one sorted segment sum


def test_our_relations_are_the_networkx_pipelines_on_benchmark_graphs():
    """Every graph of generated benchmark sets, built as one block (as the benchmark does)."""
    cfg = StructureConfig(kind="csgnn", length_bound=10)
    graphs = make_csl(seed=0, per_class=1).graphs + make_counting(seed=0, num_graphs=40).graphs
    ours = build_relations(graphs, cfg)
    assert check_same_relations(ours, [networkx_csgnn_relations(g, cfg) for g in graphs]) > 0


def test_the_relation_check_catches_a_difference():
    g = Graph.create(4, [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)])
    cfg = StructureConfig(kind="csgnn", length_bound=4)
    (r,) = build_relations([g], cfg)
    ref = networkx_csgnn_relations(g, cfg)
    assert check_same_relations([r], [ref]) == len(ref) == 24
    heavier = dataclasses.replace(r, weights=r.weights + (np.arange(r.num_relations) == 0))
    with pytest.raises(ReferenceMismatch, match="graph 0"):
        check_same_relations([heavier], [ref])
    with pytest.raises(ReferenceMismatch, match="graph 1"):
        check_same_relations([r, r], [ref, {k: w for k, w in list(ref.items())[1:]}])
    doubled = Relations(np.r_[r.senders, r.senders[:1]], np.r_[r.receivers, r.receivers[:1]],
                        np.r_[r.types, r.types[:1]], np.r_[r.weights, np.float32(5.0)],
                        r.node_features, r.num_types)
    with pytest.raises(ValueError, match="more than once"):
        relation_set(doubled)
    with pytest.raises(ValueError, match="whole numbers"):
        relation_set({(0, 1, 0): 1.5})


def test_block_build_equals_one_by_one_and_sparse_merge(monkeypatch):
    gs = [Graph.create(12, list(nx.gnp_random_graph(12, 0.35, seed=s).edges())) for s in range(6)]
    cfg = StructureConfig(kind="csgnn", length_bound=7, complement=True,
                          complement_length_bound=4, flag_lengths=(4, 5))
    block = build_relations(gs, cfg)
    single = [build_relations([g], cfg)[0] for g in gs]
    monkeypatch.setattr(rel_mod._Accumulator, "__init__", _force_sparse(rel_mod._Accumulator))
    sparse = build_relations(gs, cfg)
    for a, b, c in zip(block, single, sparse):
        assert _as_counter(a) == _as_counter(b) == _as_counter(c)
        np.testing.assert_array_equal(a.node_features, b.node_features)
        assert a.num_cycles == b.num_cycles == c.num_cycles


def _force_sparse(cls):
    orig = cls.__init__

    def init(self, sizes, num_types):
        orig(self, sizes, num_types)
        self.dense_size = 1 << 40  # never dense: take the sort path

    return init


def test_complement_relations_and_flags():
    # Path 0-1-2-3-4: no cycles; its complement has triangles and 4-cycles.
    g = Graph.create(5, [(0, 1), (1, 2), (2, 3), (3, 4)])
    cfg = StructureConfig(kind="csgnn", length_bound=6, complement=True,
                          complement_length_bound=4, flag_lengths=(3, 4))
    (r,) = build_relations([g], cfg)
    comp = nx.complement(g.to_networkx())
    n_main = 1 + 3 + 1  # edges + d = 0..3
    ref = Counter()
    for cyc in nx.chordless_cycles(comp, 4):
        length = len(cyc)
        for i, u in enumerate(cyc):
            for j, v in enumerate(cyc):
                ref[(u, v, n_main + min(abs(i - j), length - abs(i - j)))] += 1
    got = Counter({k: v for k, v in _as_counter(r).items() if k[2] >= n_main})
    assert got == ref and ref
    assert r.num_cycles == len(list(nx.chordless_cycles(comp, 4)))
    assert not r.node_features.any()  # flags come from the graph's own cycles: none here
    tri = Graph.create(4, [(0, 1), (1, 2), (2, 0), (2, 3)])
    (rt,) = build_relations([tri], StructureConfig(kind="csgnn", length_bound=4,
                                                   flag_lengths=(3, 4)))
    np.testing.assert_array_equal(rt.node_features, [[1, 0], [1, 0], [1, 0], [0, 0]])


def test_typed_by_length():
    g = Graph.create(7, [(0, 1), (1, 2), (2, 0), (2, 3), (3, 4), (4, 5), (5, 2), (5, 6)])
    cfg = StructureConfig(kind="csgnn", length_bound=4, typed_by_length=True)
    (r,) = build_relations([g], cfg)
    # types: 0 edges; (3,0) (3,1) (4,0) (4,1) (4,2) -> 1..5
    assert num_relation_types(cfg) == 6
    c = _as_counter(r)
    assert c[(2, 2, 1)] == 1 and c[(2, 2, 3)] == 1  # node 2: one triangle, one 4-cycle
    assert c[(2, 4, 5)] == 1  # opposite corners of the 4-cycle 2-3-4-5


def test_kpgnn_relations_against_networkx():
    g = Graph.create(9, list(nx.gnp_random_graph(9, 0.3, seed=3).edges()))
    cfg = StructureConfig(kind="kpgnn", hops=3)
    (r,) = build_relations([g], cfg)
    spd = dict(nx.all_pairs_shortest_path_length(g.to_networkx()))
    ref = Counter({(u, v, d - 1): 1.0 for v in spd for u, d in spd[v].items() if 1 <= d <= 3})
    assert _as_counter(r) == ref
    for v in range(9):
        for k in range(1, 4):
            ring = {u for u, d in spd[v].items() if d == k}
            edges_in_ring = sum(1 for a, b in g.edges.tolist() if a in ring and b in ring)
            assert r.node_features[v, k - 1] == edges_in_ring


def test_gin_relations_are_the_edges():
    g = Graph.create(4, [(0, 1), (1, 2), (2, 3)])
    (r,) = build_relations([g], StructureConfig(kind="gin"))
    assert _as_counter(r) == Counter({(0, 1, 0): 1, (1, 0, 0): 1, (1, 2, 0): 1, (2, 1, 0): 1,
                                      (2, 3, 0): 1, (3, 2, 0): 1})


@pytest.mark.parametrize("kind", ["csgnn", "kpgnn", "gin"])
def test_relabelling_gives_the_same_colour_histogram(kind):
    g = Graph.create(14, list(nx.gnp_random_graph(14, 0.3, seed=7).edges()))
    h = g.relabel(np.random.default_rng(0).permutation(14))
    cfg = StructureConfig(kind=kind, length_bound=8)
    ra, rb = build_relations([g, h], cfg)
    ha, hb = colour_refinement([(14, ra, g.x), (14, rb, h.x)])
    assert ha == hb


def test_isolated_nodes_and_edgeless_graphs():
    g = Graph.create(3, np.zeros((0, 2)))
    for kind in ("csgnn", "kpgnn", "gin"):
        (r,) = build_relations([g], StructureConfig(kind=kind))
        assert r.num_relations == 0 and r.node_features.shape[0] == 3


def test_exploding_cycle_count_guard():
    # The complement of a sparse 60-node graph has tens of thousands of triangles.
    g = Graph.create(60, list(nx.cycle_graph(60).edges()))
    cfg = StructureConfig(kind="csgnn", length_bound=6, complement=True, max_cycles=5000)
    with pytest.raises(CycleCountExceeded, match="more than 5000 chordless cycles"):
        build_relations([g], cfg)
    warn_cfg = cfg.model_copy(update={"on_exceed": "warn"})
    with pytest.warns(UserWarning, match="truncated cycle set"):
        (r,) = build_relations([g], warn_cfg)
    assert r.num_cycles == 5000  # the 60-cycle itself is longer than 6: complement cycles only
    # ... and the config validates what it can.
    with pytest.raises(ValueError, match="flag_lengths"):
        StructureConfig(kind="csgnn", length_bound=6, flag_lengths=(4, 8))


def test_normalize_edges_policies():
    assert normalize_edges(3, [(1, 0), (2, 1)]).tolist() == [[0, 1], [1, 2]]
    with pytest.raises(ValueError, match="self-loop"):
        normalize_edges(3, [(0, 0), (0, 1)])
    assert normalize_edges(3, [(0, 0), (0, 1)], self_loops="drop").tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="parallel edges between \\(0, 1\\)"):
        normalize_edges(3, [(0, 1), (1, 0)])
    assert normalize_edges(3, [(0, 1), (1, 0)], multi_edges="merge").tolist() == [[0, 1]]
    assert normalize_edges(3, [(0, 1), (1, 0)], symmetric=True).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="lacks the reverse"):
        normalize_edges(3, [(0, 1), (1, 0), (1, 2)], symmetric=True)
    with pytest.raises(ValueError, match="parallel edges"):
        normalize_edges(3, [(0, 1), (1, 0), (0, 1), (1, 0)], symmetric=True)
    with pytest.raises(ValueError, match="outside 0..2"):
        normalize_edges(3, [(0, 5)])
    with pytest.raises(ValueError, match="shape"):
        normalize_edges(3, [(0, 1, 2)])
    with pytest.raises(ValueError, match="at least one node"):
        Graph.create(0, [])
