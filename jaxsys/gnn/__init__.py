"""Expressive graph learning on jraph: CSGNN (chordless-cycle relations), KP-GNN and GIN.

The host turns each graph into typed, weighted relations (`build_relations`): chordless cycles
(`chordless_cycles`, exact, vectorised, length-bounded) give CSGNN its "pairs at cyclic distance
d on a shared chordless cycle"; shortest-path hops give KP-GNN; plain edges give GIN. One
message-passing network (`GraphNet`, Flax over padded `jraph.GraphsTuple`s from `GraphBatcher`)
runs all three with one segment sum per layer. `run_experiment` trains a YAML-configured model
(`jaxsys train gnn`); `count_distinguished` runs the float64 expressiveness protocol and
`colour_refinement` gives its upper bound (`jaxsys bench gnn`). `networkx_chordless_cycles` and
`networkx_csgnn_relations` are the authors' networkx pipeline: the reference our structures are
checked against (`check_same_cycles`, `check_same_relations`) and the baseline they are timed
against.

Quick start::

    from jaxsys.gnn import load_dataset, StructureConfig, build_relations, chordless_cycles
    ds = load_dataset("csl")
    g = ds.graphs[0]
    cycles = chordless_cycles(g.num_nodes, g.edges, length_bound=10)
    rels = build_relations([g], StructureConfig(kind="csgnn", length_bound=10))[0]
"""

from jaxsys.gnn._batching import GraphBatcher as GraphBatcher
from jaxsys.gnn._batching import PadSizes as PadSizes
from jaxsys.gnn._batching import dense_layout_pays as dense_layout_pays
from jaxsys.gnn._config import GNNExperimentConfig as GNNExperimentConfig
from jaxsys.gnn._config import GNNModelConfig as GNNModelConfig
from jaxsys.gnn._config import GNNTrainConfig as GNNTrainConfig
from jaxsys.gnn._config import GraphDataConfig as GraphDataConfig
from jaxsys.gnn._config import StructureConfig as StructureConfig
from jaxsys.gnn._config import load_config as load_config
from jaxsys.gnn._cycles import CycleCountExceeded as CycleCountExceeded
from jaxsys.gnn._cycles import canonical_cycle as canonical_cycle
from jaxsys.gnn._cycles import chordless_cycle_arrays as chordless_cycle_arrays
from jaxsys.gnn._cycles import chordless_cycles as chordless_cycles
from jaxsys.gnn._cycles import chordless_cycles_batch as chordless_cycles_batch
from jaxsys.gnn._datasets import DATASETS as DATASETS
from jaxsys.gnn._datasets import Dataset as Dataset
from jaxsys.gnn._datasets import brec_pairs as brec_pairs
from jaxsys.gnn._datasets import count_substructures as count_substructures
from jaxsys.gnn._datasets import data_dir as data_dir
from jaxsys.gnn._datasets import load_dataset as load_dataset
from jaxsys.gnn._datasets import make_counting as make_counting
from jaxsys.gnn._datasets import make_csl as make_csl
from jaxsys.gnn._expressiveness import count_distinguished as count_distinguished
from jaxsys.gnn._expressiveness import embed_graphs as embed_graphs
from jaxsys.gnn._graph import Graph as Graph
from jaxsys.gnn._graph import normalize_edges as normalize_edges
from jaxsys.gnn._models import GraphNet as GraphNet
from jaxsys.gnn._reference import ReferenceMismatch as ReferenceMismatch
from jaxsys.gnn._reference import canonical_cycles as canonical_cycles
from jaxsys.gnn._reference import check_same_cycles as check_same_cycles
from jaxsys.gnn._reference import check_same_relations as check_same_relations
from jaxsys.gnn._reference import networkx_chordless_cycles as networkx_chordless_cycles
from jaxsys.gnn._reference import networkx_csgnn_relations as networkx_csgnn_relations
from jaxsys.gnn._reference import relation_set as relation_set
from jaxsys.gnn._relations import Relations as Relations
from jaxsys.gnn._relations import build_relations as build_relations
from jaxsys.gnn._relations import num_relation_types as num_relation_types
from jaxsys.gnn._structures import cache_dir as cache_dir
from jaxsys.gnn._structures import dataset_relations as dataset_relations
from jaxsys.gnn._train import kfold_splits as kfold_splits
from jaxsys.gnn._train import run_experiment as run_experiment
from jaxsys.gnn._wl import colour_refinement as colour_refinement
from jaxsys.gnn._wl import wl_distinguishes as wl_distinguishes

__all__ = [
    "DATASETS",
    "CycleCountExceeded",
    "Dataset",
    "GNNExperimentConfig",
    "GNNModelConfig",
    "GNNTrainConfig",
    "Graph",
    "GraphBatcher",
    "GraphDataConfig",
    "GraphNet",
    "PadSizes",
    "ReferenceMismatch",
    "Relations",
    "StructureConfig",
    "brec_pairs",
    "build_relations",
    "cache_dir",
    "canonical_cycle",
    "canonical_cycles",
    "check_same_cycles",
    "check_same_relations",
    "chordless_cycle_arrays",
    "chordless_cycles",
    "chordless_cycles_batch",
    "colour_refinement",
    "count_distinguished",
    "count_substructures",
    "data_dir",
    "dataset_relations",
    "dense_layout_pays",
    "embed_graphs",
    "kfold_splits",
    "load_config",
    "load_dataset",
    "make_counting",
    "make_csl",
    "networkx_chordless_cycles",
    "networkx_csgnn_relations",
    "normalize_edges",
    "num_relation_types",
    "relation_set",
    "run_experiment",
    "wl_distinguishes",
]
