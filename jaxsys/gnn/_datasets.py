"""Graph datasets: generated (CSL, substructure counting) and read from `../shared/data/gnn/`.

Generated sets are exact functions of their seed. Files that cannot be generated are read from
the shared data folder (see its README): EXP / CEXP, SR25, BREC, MUTAG, PROTEINS and micro_ZINC.
`data_dir()` finds it next to the project root, or at `$JAXSYS_DATA_DIR`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path

import numpy as np

from jaxsys.gnn._graph import Graph

__all__ = [
    "CSL_SKIPS",
    "COUNTING_TARGETS",
    "Dataset",
    "brec_pairs",
    "count_substructures",
    "data_dir",
    "load_dataset",
    "make_counting",
    "make_csl",
]

CSL_SKIPS = (2, 3, 4, 5, 6, 9, 11, 12, 13, 16)
COUNTING_TARGETS = ("triangle", "tailed_triangle", "star3", "cycle4", "cycle5", "cycle6")
BREC_CATEGORIES = ("basic", "regular", "str", "extension")
DATASETS = ("csl", "exp", "cexp", "sr25", "counting", "mutag", "proteins", "micro_zinc",
            *(f"brec_{c}" for c in BREC_CATEGORIES))


@dataclasses.dataclass
class Dataset:
    """A list of graphs and what to predict.

    Attributes:
      name: dataset name (part of the structure-cache key).
      graphs: the graphs.
      task: "classification", "regression" or "none" (expressiveness-only sets).
      num_outputs: classes (classification) or targets (regression).
      target_names: names of the regression targets.
      groups: optional per-graph group id (CSL: class; EXP: pair index), for splitting.
    """

    name: str
    graphs: list[Graph]
    task: str
    num_outputs: int
    target_names: tuple[str, ...] = ()
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.graphs)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([g.y for g in self.graphs])

    def fingerprint(self) -> str:
        """Content hash of the graphs (nodes, edges, features), for cache keys."""
        h = hashlib.sha1(self.name.encode())
        for g in self.graphs:
            h.update(np.int64(g.num_nodes).tobytes())
            h.update(np.ascontiguousarray(g.edges).tobytes())
            h.update(np.ascontiguousarray(g.x).tobytes())
        return h.hexdigest()[:16]


def data_dir() -> Path:
    """The shared data folder: `$JAXSYS_DATA_DIR`, else `<project root>/../shared/data`."""
    env = os.environ.get("JAXSYS_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def _gnn_file(*parts: str) -> Path:
    p = data_dir().joinpath("gnn", *parts)
    if not p.exists():
        raise FileNotFoundError(
            f"{p} is missing. This dataset cannot be generated; it lives in the shared data folder "
            f"(see ../shared/data/README.md), found via $JAXSYS_DATA_DIR or <project>/../shared/data")
    return p


def _one_hot(values: np.ndarray, num: int) -> np.ndarray:
    out = np.zeros((values.shape[0], num), np.float32)
    out[np.arange(values.shape[0]), values] = 1.0
    return out


# ----------------------------------------------------------------------------------------------
# Generated sets


def make_csl(*, seed: int = 0, per_class: int = 15, num_nodes: int = 41) -> Dataset:
    """CSL: circulant graphs C_41(1, s) for the 10 skip lengths, `per_class` random relabellings."""
    import networkx as nx

    rng = np.random.default_rng(seed)
    graphs = []
    groups = []
    for cls, skip in enumerate(CSL_SKIPS):
        base = nx.circulant_graph(num_nodes, [1, skip])
        edges = np.asarray(list(base.edges()), np.int64)
        for _ in range(per_class):
            perm = rng.permutation(num_nodes)
            graphs.append(Graph.create(num_nodes, perm[edges], y=cls))
            groups.append(cls)
    return Dataset("csl", graphs, "classification", len(CSL_SKIPS), groups=np.asarray(groups))


def count_substructures(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    """Subgraph counts (not induced) in `COUNTING_TARGETS` order.

    triangle, tailed triangle (triangle + one pendant edge at a triangle node), 3-star (a node
    with 3 chosen neighbours), and simple cycles of length 4, 5, 6.
    """
    import networkx as nx

    a = np.zeros((num_nodes, num_nodes), np.int64)
    if edges.size:
        a[edges[:, 0], edges[:, 1]] = 1
        a[edges[:, 1], edges[:, 0]] = 1
    deg = a.sum(1)
    a2 = a @ a
    tri_per_node = np.diagonal(a2 @ a) // 2  # triangles through each node
    triangles = int(tri_per_node.sum()) // 3
    tailed = int(np.sum(tri_per_node * np.maximum(deg - 2, 0)))
    stars = int(sum(math.comb(int(d), 3) for d in deg))
    g = nx.Graph()
    g.add_nodes_from(range(num_nodes))
    g.add_edges_from(edges.tolist())
    cyc = {4: 0, 5: 0, 6: 0}
    for c in nx.simple_cycles(g, length_bound=6):
        if len(c) >= 4:
            cyc[len(c)] += 1
    return np.asarray([triangles, tailed, stars, cyc[4], cyc[5], cyc[6]], np.float64)


def make_counting(*, num_graphs: int = 1500, seed: int = 0, min_nodes: int = 10,
                  max_nodes: int = 20) -> Dataset:
    """Random graphs with substructure counts as regression targets (std-normalised).

    Half Erdos-Renyi G(n, p) with p in [0.1, 0.35], half random d-regular with d in {3, 4}
    (n even where needed), as in the counting benchmarks of Chen et al. (2020). Targets are
    divided by their standard deviation over the whole set (the std is stored in `y` scale;
    report MAE in these std units).
    """
    import networkx as nx

    rng = np.random.default_rng(seed)
    raw = []
    for i in range(num_graphs):
        n = int(rng.integers(min_nodes, max_nodes + 1))
        if i % 2 == 0:
            g = nx.gnp_random_graph(n, float(rng.uniform(0.1, 0.35)),
                                    seed=int(rng.integers(2**31)))
        else:
            d = int(rng.choice([3, 4]))
            if (n * d) % 2:
                n += 1
            g = nx.random_regular_graph(d, n, seed=int(rng.integers(2**31)))
        e = np.asarray(list(g.edges()), np.int64).reshape(-1, 2)
        raw.append((n, e, count_substructures(n, np.sort(e, axis=1))))
    y = np.stack([r[2] for r in raw])
    std = y.std(0)
    std[std == 0] = 1.0
    graphs = [Graph.create(n, e, y=(t / std).astype(np.float32)) for n, e, t in raw]
    return Dataset("counting", graphs, "regression", len(COUNTING_TARGETS),
                   target_names=COUNTING_TARGETS)


# ----------------------------------------------------------------------------------------------
# Shared-data sets


def _read_graphsat(path: Path, name: str, **policy) -> Dataset:
    """EXP / CEXP: first line = #graphs; per graph `n label`, then n lines `lab deg nbr...`."""
    tokens = path.read_text().split("\n")
    it = iter(tokens)
    count = int(next(it).strip())
    graphs = []
    for _ in range(count):
        n, label = (int(v) for v in next(it).split())
        labels = np.zeros(n, np.int64)
        edges = []
        for v in range(n):
            row = [int(t) for t in next(it).split()]
            labels[v] = row[0]
            for u in row[2:2 + row[1]]:
                edges.append((v, u))
        graphs.append(Graph.create(n, np.asarray(edges, np.int64).reshape(-1, 2),
                                   x=_one_hot(labels, 2), y=label, symmetric=True, **policy))
    return Dataset(name, graphs, "classification", 2,
                   groups=np.arange(count) // 2)


def _read_sr25(**policy) -> Dataset:
    import networkx as nx

    graphs = []
    for i, line in enumerate(_gnn_file("sr25", "sr251256.g6").read_bytes().splitlines()):
        if not line.strip():
            continue
        g = nx.from_graph6_bytes(line.strip())
        graphs.append(Graph.create(g.number_of_nodes(), list(g.edges()), y=i, **policy))
    return Dataset("sr25", graphs, "none", len(graphs))


def brec_pairs(category: str) -> list[tuple[Graph, Graph]]:
    """BREC pairs of one category: basic (60), regular (50), str (50), extension (100)."""
    import networkx as nx

    if category not in BREC_CATEGORIES:
        raise ValueError(f"BREC category must be one of {BREC_CATEGORIES}, got {category!r}")
    arr = np.load(_gnn_file("brec", f"{category}.npy"), allow_pickle=True).reshape(-1)
    out = []
    gs = []
    for s in arr:
        b = s if isinstance(s, bytes) else str(s).encode()
        g = nx.from_graph6_bytes(b.strip())
        gs.append(Graph.create(g.number_of_nodes(), list(g.edges())))
    for i in range(len(gs) // 2):
        out.append((gs[2 * i], gs[2 * i + 1]))
    return out


def _read_tu(name: str, **policy) -> Dataset:
    root = _gnn_file("tu", name)
    a = np.loadtxt(root / f"{name}_A.txt", delimiter=",", dtype=np.int64).reshape(-1, 2) - 1
    gid = np.loadtxt(root / f"{name}_graph_indicator.txt", dtype=np.int64).reshape(-1) - 1
    glab = np.loadtxt(root / f"{name}_graph_labels.txt", dtype=np.int64).reshape(-1)
    nlab = np.loadtxt(root / f"{name}_node_labels.txt", dtype=np.int64).reshape(-1)
    classes = np.unique(glab)
    y = np.searchsorted(classes, glab)
    n_node_labels = int(nlab.max()) + 1
    num_graphs = int(gid.max()) + 1
    starts = np.searchsorted(gid, np.arange(num_graphs))
    counts = np.bincount(gid, minlength=num_graphs)
    edge_graph = gid[a[:, 0]]
    order = np.argsort(edge_graph, kind="stable")
    a, edge_graph = a[order], edge_graph[order]
    e_starts = np.searchsorted(edge_graph, np.arange(num_graphs + 1))
    graphs = []
    for g in range(num_graphs):
        lo = starts[g]
        e = a[e_starts[g]:e_starts[g + 1]] - lo
        x = _one_hot(nlab[lo:lo + counts[g]], n_node_labels)
        graphs.append(Graph.create(int(counts[g]), e, x=x, y=int(y[g]), symmetric=True,
                                   **policy))
    return Dataset(name.lower(), graphs, "classification", len(classes))


ZINC_ATOMS = ("C", "N", "O", "F", "S", "Cl", "Br", "I", "P", "B", "Si", "Se", "other")


def _read_micro_zinc(**policy) -> Dataset:
    import csv

    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    graphs = []
    with open(_gnn_file("micro_zinc", "micro_ZINC.csv"), newline="") as f:
        for row in csv.DictReader(f):
            mol = Chem.MolFromSmiles(row["SMILES"])
            if mol is None:
                raise ValueError(f"RDKit cannot parse SMILES {row['SMILES']!r}")
            n = mol.GetNumAtoms()
            feats = np.zeros((n, len(ZINC_ATOMS) + 3), np.float32)
            for atom in mol.GetAtoms():
                sym = atom.GetSymbol()
                k = ZINC_ATOMS.index(sym) if sym in ZINC_ATOMS else len(ZINC_ATOMS) - 1
                i = atom.GetIdx()
                feats[i, k] = 1.0
                feats[i, len(ZINC_ATOMS)] = float(atom.GetIsAromatic())
                feats[i, len(ZINC_ATOMS) + 1] = float(atom.GetFormalCharge())
                feats[i, len(ZINC_ATOMS) + 2] = float(atom.GetTotalNumHs()) / 4.0
            e = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()]
            graphs.append(Graph.create(n, np.asarray(e, np.int64).reshape(-1, 2), x=feats,
                                       y=np.asarray([float(row["score"])], np.float32),
                                       **policy))
    return Dataset("micro_zinc", graphs, "regression", 1, target_names=("score",))


def load_dataset(name: str, *, seed: int = 0, self_loops: str = "error",
                 multi_edges: str = "error") -> Dataset:
    """Load or generate a dataset by name (one of `DATASETS`).

    `self_loops` ("error" | "drop") and `multi_edges` ("error" | "merge") apply to graphs read
    from files (see `normalize_edges`); generated sets are simple by construction.
    """
    policy = {"self_loops": self_loops, "multi_edges": multi_edges}
    key = name.lower()
    if key == "csl":
        return make_csl(seed=seed)
    if key == "counting":
        return make_counting(seed=seed)
    if key == "exp":
        return _read_graphsat(_gnn_file("exp", "GRAPHSAT.txt"), "exp", **policy)
    if key == "cexp":
        return _read_graphsat(_gnn_file("cexp", "GRAPHSAT.txt"), "cexp", **policy)
    if key == "sr25":
        return _read_sr25(**policy)
    if key == "mutag":
        return _read_tu("MUTAG", **policy)
    if key == "proteins":
        return _read_tu("PROTEINS", **policy)
    if key in ("micro_zinc", "zinc"):
        return _read_micro_zinc(**policy)
    if key.startswith("brec_"):
        pairs = brec_pairs(key[len("brec_"):])
        graphs = [g for p in pairs for g in p]
        return Dataset(key, graphs, "none", 0, groups=np.arange(len(graphs)) // 2)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
