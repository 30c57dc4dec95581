"""Generated datasets (CSL, substructure counting) and the readers of ../shared/data/gnn."""

import itertools

import networkx as nx
import numpy as np
import pytest

from jaxsys.gnn import brec_pairs, count_substructures, load_dataset, make_counting, make_csl
from jaxsys.gnn._datasets import CSL_SKIPS


def test_csl_is_exact():
    ds = make_csl(seed=0)
    assert len(ds) == 150 and ds.num_outputs == 10
    labels = ds.labels
    assert np.bincount(labels).tolist() == [15] * 10
    for cls, skip in enumerate(CSL_SKIPS):
        ref = nx.circulant_graph(41, [1, skip])
        members = [g for g in ds.graphs if g.y == cls]
        assert all(g.num_nodes == 41 and g.edges.shape == (82, 2) for g in members)
        for g in members[:3]:
            assert nx.is_isomorphic(g.to_networkx(), ref)
    # relabellings really relabel: not all graphs of a class have the same edge list
    assert len({ds.graphs[i].edges.tobytes() for i in range(15)}) > 1


def _brute_counts(g: nx.Graph):
    n = g.number_of_nodes()
    nodes = range(n)
    tri = sum(1 for a, b, c in itertools.combinations(nodes, 3)
              if g.has_edge(a, b) and g.has_edge(b, c) and g.has_edge(a, c))
    tailed = 0
    for a, b, c in itertools.combinations(nodes, 3):
        if g.has_edge(a, b) and g.has_edge(b, c) and g.has_edge(a, c):
            for v in (a, b, c):
                tailed += sum(1 for u in g[v] if u not in (a, b, c))
    stars = sum(len(list(itertools.combinations(list(g[v]), 3))) for v in nodes)

    def cycles(k):
        found = set()
        for combo in itertools.permutations(nodes, k):
            if combo[0] != min(combo) or combo[1] > combo[-1]:
                continue
            if all(g.has_edge(combo[i], combo[(i + 1) % k]) for i in range(k)):
                found.add(combo)
        return len(found)

    return [tri, tailed, stars, cycles(4), cycles(5), cycles(6)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_substructure_counts_against_brute_force(seed):
    g = nx.gnp_random_graph(8, 0.5, seed=seed)
    e = np.asarray(list(g.edges()), np.int64).reshape(-1, 2)
    assert count_substructures(8, e).tolist() == _brute_counts(g)


def test_counting_dataset_is_std_normalised():
    ds = make_counting(num_graphs=60, seed=1)
    y = np.stack([g.y for g in ds.graphs])
    assert y.shape == (60, 6) and ds.task == "regression"
    np.testing.assert_allclose(y.std(0), 1.0, rtol=1e-5)


def test_shared_data_readers(shared_data):
    exp = load_dataset("exp")
    assert len(exp) == 1200 and exp.graphs[0].x.shape[1] == 2
    assert set(exp.labels.tolist()) == {0, 1}
    assert len(load_dataset("cexp")) == 1200
    sr = load_dataset("sr25")
    assert len(sr) == 15
    assert all(sorted(d for _, d in g.to_networkx().degree()) == [12] * 25 for g in sr.graphs)
    for cat, n in (("basic", 60), ("regular", 50), ("str", 50), ("extension", 100)):
        assert len(brec_pairs(cat)) == n
    mutag, proteins = load_dataset("mutag"), load_dataset("proteins")
    assert (len(mutag), mutag.num_outputs, mutag.graphs[0].x.shape[1]) == (188, 2, 7)
    assert (len(proteins), proteins.num_outputs) == (1113, 2)
    zinc = load_dataset("micro_zinc")
    assert len(zinc) == 1002 and zinc.task == "regression"
    # benzene ring of the first molecule is there: a chordless 6-cycle
    from jaxsys.gnn import chordless_cycles

    g = zinc.graphs[0]
    assert any(len(c) == 6 for c in chordless_cycles(g.num_nodes, g.edges, length_bound=6))


def test_unknown_dataset_and_missing_files(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    monkeypatch.setenv("JAXSYS_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cannot be generated"):
        load_dataset("mutag")
