"""Chordless-cycle enumeration: identical cycle sets to networkx, guards, bad input."""

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsys.gnn import (
    CycleCountExceeded,
    canonical_cycle,
    chordless_cycle_arrays,
    chordless_cycles,
    chordless_cycles_batch,
)


def _nx_cycles(g: nx.Graph, bound):
    return sorted(canonical_cycle(c) for c in nx.chordless_cycles(g, bound))


@st.composite
def graphs(draw, max_nodes=13):
    n = draw(st.integers(0, max_nodes))
    pairs = [(u, v) for u in range(n) for v in range(u + 1, n)]
    p = draw(st.floats(0.0, 1.0))
    rnd = draw(st.randoms(use_true_random=False))
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(e for e in pairs if rnd.random() < p)
    return g


@settings(max_examples=150, deadline=None)
@given(g=graphs(), bound=st.sampled_from([None, 3, 4, 5, 6, 7, 9]))
def test_identical_cycle_sets_to_networkx(g, bound):
    ours = chordless_cycles(g.number_of_nodes(), list(g.edges()), length_bound=bound)
    assert sorted(ours) == _nx_cycles(g, bound)
    assert len(set(ours)) == len(ours)  # each cycle once
    assert all(c == canonical_cycle(c) for c in ours)


@settings(max_examples=25, deadline=None)
@given(gs=st.lists(graphs(max_nodes=10), min_size=1, max_size=6),
       bound=st.sampled_from([4, 6, None]))
def test_batch_equals_per_graph(gs, bound):
    batch = chordless_cycles_batch([(g.number_of_nodes(), list(g.edges())) for g in gs],
                                   length_bound=bound, chunk_nodes=12)
    for g, res in zip(gs, batch):
        flat = sorted(tuple(r) for length in res for r in res[length].tolist())
        assert flat == _nx_cycles(g, bound)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiword_bitsets_large_sparse_graphs(seed):
    # > 64 and > 128 nodes: several uint64 words per bitset row.
    g = nx.gnp_random_graph(150, 0.025, seed=seed)
    for bound in (5, 8):
        ours = chordless_cycles(150, list(g.edges()), length_bound=bound)
        assert sorted(ours) == _nx_cycles(g, bound)


def test_known_graphs():
    assert chordless_cycles(4, list(nx.complete_graph(4).edges())) == [
        (0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]
    c7 = list(nx.cycle_graph(7).edges())
    assert chordless_cycles(7, c7, length_bound=6) == []
    assert chordless_cycles(7, c7, length_bound=7) == [(0, 1, 2, 3, 4, 5, 6)]
    # A 6-cycle with one chord (0, 3) has exactly two chordless 4-cycles.
    g = nx.cycle_graph(6)
    g.add_edge(0, 3)
    assert sorted(chordless_cycles(6, list(g.edges()))) == [(0, 1, 2, 3), (0, 3, 4, 5)]
    assert chordless_cycles(6, list(g.edges()), min_length=5) == []


def test_arrays_grouped_by_length():
    g = nx.circulant_graph(41, [1, 5])
    arrays = chordless_cycle_arrays(41, np.asarray(list(g.edges())), length_bound=8)
    for length, rows in arrays.items():
        assert rows.dtype == np.int32 and rows.shape[1] == length
    flat = sorted(tuple(r) for length in arrays for r in arrays[length].tolist())
    assert flat == _nx_cycles(g, 8)


def test_edge_list_forms_and_isolated_nodes():
    both_directions = [(0, 1), (1, 0), (1, 2), (2, 1), (2, 0), (0, 2)]
    assert chordless_cycles(5, both_directions) == [(0, 1, 2)]  # nodes 3, 4 isolated
    assert chordless_cycles(3, []) == []
    assert chordless_cycles(1, np.zeros((0, 2), np.int64)) == []
    assert chordless_cycles_batch([(0, [])]) == [{}]


def test_bad_input_is_rejected_clearly():
    with pytest.raises(ValueError, match="self-loop on node 1"):
        chordless_cycles(3, [(0, 1), (1, 1)])
    with pytest.raises(ValueError, match="outside 0..2"):
        chordless_cycles(3, [(0, 3)])
    with pytest.raises(ValueError, match="length_bound must be >= 3"):
        chordless_cycles(3, [(0, 1)], length_bound=2)
    with pytest.raises(ValueError, match="on_exceed"):
        chordless_cycles(3, [(0, 1)], on_exceed="ignore")


def test_cycle_count_guard_error_and_warn():
    k9 = list(nx.complete_graph(9).edges())  # C(9, 3) = 84 triangles, nothing longer
    with pytest.raises(CycleCountExceeded, match="more than 50 chordless cycles"):
        chordless_cycles(9, k9, max_cycles=50)
    with pytest.warns(UserWarning, match="truncated cycle set"):
        kept = chordless_cycles(9, k9, max_cycles=50, on_exceed="warn")
    assert len(kept) == 50 and len(set(kept)) == 50
    assert set(kept) <= set(chordless_cycles(9, k9))
    # Under the cap nothing happens; the cap is per graph in a batch.
    res = chordless_cycles_batch([(9, k9), (4, [(0, 1), (1, 2), (2, 3), (3, 0)])],
                                 max_cycles=84)
    assert sum(len(v) for v in res[0].values()) == 84
    assert list(res[1]) == [4] and res[1][4].tolist() == [[0, 1, 2, 3]]


def test_small_state_slices_give_the_same_cycles():
    g = nx.circulant_graph(30, [1, 4])
    full = chordless_cycles_batch([(30, list(g.edges()))], length_bound=9)[0]
    sliced = chordless_cycles_batch([(30, list(g.edges()))], length_bound=9, max_states=7)[0]
    assert sorted(full) == sorted(sliced)
    for length in full:
        assert sorted(map(tuple, full[length].tolist())) == sorted(
            map(tuple, sliced[length].tolist()))


def test_cycle_check_compares_canonical_sets_and_catches_a_difference():
    from jaxsys.gnn import (
        Graph,
        ReferenceMismatch,
        canonical_cycles,
        check_same_cycles,
        networkx_chordless_cycles,
    )

    gs = [Graph.create(12, list(nx.gnp_random_graph(12, 0.4, seed=s).edges())) for s in range(4)]
    ours = chordless_cycles_batch([(g.num_nodes, g.edges) for g in gs], length_bound=6)
    theirs = [networkx_chordless_cycles(g, 6) for g in gs]
    assert check_same_cycles(ours, theirs) == sum(len(t) for t in theirs) > 0
    # The same cycle in another rotation and direction is the same cycle ...
    assert canonical_cycles([[3, 1, 0, 2]]) == canonical_cycles([[0, 2, 3, 1]]) == [(0, 1, 3, 2)]
    # ... but a missing or a repeated cycle is a difference, named by its graph.
    with pytest.raises(ReferenceMismatch, match="graph 2"):
        check_same_cycles(ours, theirs[:2] + [theirs[2][1:]] + theirs[3:])
    with pytest.raises(ReferenceMismatch, match="graph 0"):
        check_same_cycles(ours, [theirs[0] + theirs[0][:1]] + theirs[1:])
