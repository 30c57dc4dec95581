"""Padded batching (vs jraph's own helpers), the model, training, expressiveness vs WL."""

import contextlib

import jax
import jax.numpy as jnp
import jraph
import networkx as nx
import numpy as np
import pytest

from jaxsys.gnn import (
    Graph,
    GraphBatcher,
    GraphNet,
    StructureConfig,
    build_relations,
    colour_refinement,
    count_distinguished,
    embed_graphs,
    load_config,
    make_csl,
    run_experiment,
)
from jaxsys.gnn._datasets import Dataset


def _graphs(k=7, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(k):
        n = int(rng.integers(4, 12))
        g = nx.gnp_random_graph(n, 0.4, seed=seed * 100 + i)
        out.append(Graph.create(n, list(g.edges()), x=rng.normal(size=(n, 3)), y=i % 2))
    return out


def test_batches_match_jraph_pad_with_graphs():
    gs = _graphs()
    rels = build_relations(gs, StructureConfig(kind="csgnn", length_bound=6))
    b = GraphBatcher(gs, rels, batch_size=4, regression=False, layout="sparse")
    for ids in b.pack(list(range(len(gs)))):
        ours = b.batch(ids)
        singles = []
        for i in ids:
            g, r = gs[i], rels[i]
            tw = np.zeros((g.num_nodes, r.num_types), np.float32)
            np.add.at(tw, (r.receivers, r.types), r.weights)
            singles.append(jraph.GraphsTuple(
                nodes={"x": np.concatenate([g.x, np.log1p(r.node_features),
                                            tw * np.asarray(b.count_scale)], 1).astype(np.float32),
                       "type_weight": tw,
                       "edge_sum_scale": (tw[:, 0] * b.count_scale[0]).astype(np.float32)},
                edges={"type": r.types, "weight": r.weights,
                       "mean_weight": r.weights / np.maximum(tw[r.receivers, r.types], 1.0)},
                senders=r.senders, receivers=r.receivers,
                n_node=np.asarray([g.num_nodes], np.int32),
                n_edge=np.asarray([r.num_relations], np.int32),
                globals={"y": np.asarray([g.y], np.int32)}))
        ref = jraph.pad_with_graphs(jraph.batch_np(singles), b.pad.n_node, b.pad.n_edge,
                                    b.pad.n_graph)
        for a, c in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_array_equal(a, c)
        assert ours.nodes["x"].shape == (b.pad.n_node, 3 + b.num_types)  # one static shape


def test_packing_respects_the_budget_and_rejects_what_cannot_fit():
    gs = _graphs(20, seed=1)
    rels = build_relations(gs, StructureConfig(kind="gin"))
    b = GraphBatcher(gs, rels, batch_size=3, regression=False)
    packed = b.pack(list(range(20)))
    assert sorted(np.concatenate(packed).tolist()) == list(range(20))
    for ids in packed:
        assert len(ids) <= 3
        assert b.n_nodes[ids].sum() <= b.pad.n_node - 1
    with pytest.raises(ValueError, match="cannot hold the largest graph"):
        from jaxsys.gnn import PadSizes

        GraphBatcher(gs, rels, batch_size=3, regression=False, pad=PadSizes(4, 8, 2))


# csgnn in CI; kpgnn and gin (58 s together on 2 cores) with the slow tests
@pytest.mark.parametrize("kind", ["csgnn", pytest.param("kpgnn", marks=pytest.mark.slow),
                                  pytest.param("gin", marks=pytest.mark.slow)])
def test_dense_layout_matches_the_sparse_one(kind):
    """Same parameters, same graphs: the dense layout (one [block * T, block] matmul per graph,
    padding nodes inside each block) computes the sparse layout's outputs and gradients. Checked
    in float64 (the same math: agreement to rounding), and in float32 at the model tolerance."""
    from jaxsys.gnn._expressiveness import enable_x64
    from jaxsys.gnn._train import Trainer

    gs = _graphs(9, seed=2)
    rels = build_relations(gs, StructureConfig(kind=kind, length_bound=6))
    ids = np.asarray([0, 3, 5])
    for dtype in (np.float64, np.float32):
        with enable_x64() if dtype == np.float64 else contextlib.nullcontext():
            sp, de = (GraphBatcher(gs, rels, batch_size=4, regression=False, layout=layout,
                                   dtype=dtype) for layout in ("sparse", "dense"))
            assert de.pad.block == max(g.num_nodes for g in gs)
            assert de.pad.n_node == 5 * de.pad.block
            gsp, gde = sp.batch(ids), de.batch(ids)
            assert gde.globals["adj"].shape == (5, de.pad.block * de.num_types, de.pad.block)
            m = GraphNet(num_types=sp.num_types, num_outputs=2, width=16, depth=3, dtype=dtype,
                         param_dtype=dtype)
            variables = jax.jit(m.init)(jax.random.key(0), gsp)
            for train in (False, True):  # train: masked BatchNorm statistics, real nodes only
                @jax.jit
                def out(params, g, train=train):
                    y, _ = m.apply({**variables, "params": params}, g, train=train,
                                   mutable=["batch_stats"])
                    return y[:3]

                @jax.jit
                def loss(params, g):
                    return jnp.sum(jnp.sin(out(params, g)))

                p = variables["params"]
                if dtype == np.float32:
                    np.testing.assert_allclose(out(p, gde), out(p, gsp), rtol=1e-4, atol=1e-4)
                    continue
                np.testing.assert_allclose(out(p, gde), out(p, gsp), rtol=1e-10, atol=1e-10)
                gd, gsp_ = jax.grad(loss)(p, gde), jax.grad(loss)(p, gsp)
                for a, b in zip(jax.tree_util.tree_leaves(gd), jax.tree_util.tree_leaves(gsp_)):
                    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    if kind != "csgnn":
        return
    # One compiled training step (ahead of time: it rejects other shapes) serves every batch.
    tr = Trainer(m, de, regression=False, loss="cross_entropy", lr_schedule=1e-3,
                 weight_decay=0.0, seed=0)
    state = tr.init_state(0)
    tr.compile(state)
    for b in de.batches(range(9)):
        state, out = tr._train(state, b)
    assert np.isfinite(np.asarray(out)).all()


def test_auto_layout_is_dense_only_where_it_pays():
    from jaxsys.gnn import PadSizes, dense_layout_pays

    csl = make_csl(seed=0, per_class=2).graphs  # 20 graphs of 41 nodes, relation-dense
    rels = build_relations(csl, StructureConfig(kind="csgnn", length_bound=8))
    dense = GraphBatcher(csl, rels, batch_size=16, regression=False)
    assert dense.pad.block == 41
    with pytest.raises(ValueError, match="6 relation types, the model num_types=2"):
        GraphNet(num_types=2, num_outputs=2, width=8, depth=1).init(
            jax.random.key(0), dense.batch(np.asarray([0])))
    gs = _graphs(12, seed=3)  # 4-11 nodes: dense blocks would add nodes
    rels = build_relations(gs, StructureConfig(kind="gin"))
    assert GraphBatcher(gs, rels, batch_size=4, regression=False).pad.block == 0
    sparse = PadSizes(n_node=400, n_edge=2000, n_graph=9)  # dense: 7.2 entries per relation
    assert dense_layout_pays(sparse=sparse, dense=PadSizes(360, 2000, 9, 40), num_types=1)
    assert not dense_layout_pays(sparse=sparse, dense=PadSizes(360, 2000, 9, 40), num_types=2)
    assert not dense_layout_pays(sparse=PadSizes(300, 4000, 9), dense=PadSizes(360, 4000, 9, 40),
                                 num_types=1)  # 20% more nodes
    with pytest.raises(ValueError, match="layout must be"):
        GraphBatcher(gs, rels, batch_size=4, regression=False, layout="blocked")
    with pytest.raises(ValueError, match="contradicts"):
        GraphBatcher(gs, rels, batch_size=4, regression=False, layout="dense",
                     pad=PadSizes(64, 128, 5))
    with pytest.raises(ValueError, match="dense layout"):
        GraphBatcher(gs, rels, batch_size=4, regression=False, pad=PadSizes(40, 128, 5, 8))


def _model_and_batch(kind="csgnn", **kw):
    gs = _graphs()
    rels = build_relations(gs, StructureConfig(kind=kind, length_bound=6))
    b = GraphBatcher(gs, rels, batch_size=8, regression=False)
    m = GraphNet(num_types=b.num_types, num_outputs=2, width=16, depth=3, **kw)
    return gs, rels, b, m


@pytest.mark.parametrize("kind", ["csgnn", "kpgnn", "gin"])
def test_forward_is_permutation_and_padding_invariant(kind):
    gs, rels, b, m = _model_and_batch(kind)
    batch = b.batch(np.arange(len(gs)))
    params = jax.jit(m.init)(jax.random.key(0), batch)
    embed = jax.jit(lambda p, g: m.apply(p, g, method=m.embed))  # one shape: compiled once
    emb = np.asarray(embed(params, batch))
    assert emb.shape == (b.pad.n_graph, 4 * 16)
    # Each graph alone (different padding, different position) embeds the same.
    for i in (0, 3, 6):
        alone = np.asarray(embed(params, b.batch(np.asarray([i]))))[0]
        np.testing.assert_allclose(alone, emb[i], rtol=1e-4, atol=1e-4)
    # A relabelled graph embeds the same.
    perm = np.random.default_rng(1).permutation(gs[2].num_nodes)
    h = gs[2].relabel(perm)
    bh = GraphBatcher([h], build_relations([h], StructureConfig(kind=kind, length_bound=6)),
                      batch_size=1, regression=False, pad=b.pad, count_scale=b.count_scale)
    eh = np.asarray(embed(params, bh.batch(np.asarray([0]))))[0]
    np.testing.assert_allclose(eh, emb[2], rtol=1e-4, atol=1e-4)


def test_float64_stays_scoped():
    gs = _graphs(3)
    e = embed_graphs(gs, StructureConfig(kind="gin"), width=8, depth=2)
    assert e.dtype == np.float64 and e.shape == (3, 24)
    assert jnp.ones(2).dtype == jnp.float32  # x64 did not leak into the rest of the process


def test_untrained_csgnn_matches_colour_refinement_on_hard_pairs():
    """CSL (4-regular, 1-WL-equivalent) and a 3x3 rook's graph vs its 1-WL twin: the network
    separates exactly what colour refinement over the same relations separates."""
    csl = make_csl(seed=0, per_class=2)
    gs = [csl.graphs[i] for i in range(0, 20, 2)]  # one graph per class
    cfg = StructureConfig(kind="csgnn", length_bound=10)
    rels = build_relations(gs, cfg)
    hist = colour_refinement([(g.num_nodes, r, g.x) for g, r in zip(gs, rels)])
    emb = embed_graphs(gs, cfg, width=32, depth=3, relations=rels)
    for i in range(10):
        for j in range(i + 1, 10):
            assert (hist[i] != hist[j]) == (np.linalg.norm(emb[i] - emb[j]) > 1e-5)
    gin = embed_graphs(gs, StructureConfig(kind="gin"), width=32, depth=3)
    assert np.abs(gin - gin[0:1]).max() <= 1e-5  # GIN cannot tell any CSL class apart


def test_expressiveness_protocol_counts(shared_data):
    from jaxsys.gnn import load_dataset

    sr = load_dataset("sr25")
    cfg = StructureConfig(kind="csgnn", length_bound=6)
    res = count_distinguished(sr.graphs, "graphs", cfg, width=16, depth=2)
    assert (res.distinguished, res.total, res.unreliable) == (15, 15, 0)
    exp = load_dataset("exp")
    sub = exp.graphs[:40]  # 20 pairs
    assert count_distinguished(sub, "pairs", StructureConfig(kind="gin"), width=16,
                               depth=2).distinguished == 0


def _tiny_dataset():
    csl = make_csl(seed=0, per_class=6)
    keep = [g for g in csl.graphs if g.y < 3]  # 3 classes x 6 graphs
    return Dataset("csl3", keep, "classification", 3)


def test_training_learns_compiles_once_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSYS_CACHE_DIR", str(tmp_path))
    cfg = load_config(None, ["data.name=csl", "structure.kind=csgnn", "structure.length_bound=8",
                             "model.width=16", "model.depth=2", "train.epochs=25",
                             "train.batch_size=6", "train.folds=3", "train.max_folds=2",
                             "train.lr=0.01", "train.patience=25"])
    out = run_experiment(cfg, dataset=_tiny_dataset(), progress=False, log=lambda s: None)
    assert out["compiles"] == 2  # one train step + one eval step for every fold and split
    assert len(out["folds"]) == 2
    assert out["summary"]["test_mean"] >= 2 / 3  # chance is 1/3; typically 1.0
    first = out["folds"][0]
    assert first["train"]["accuracy"] >= 2 / 3 and first["epochs_run"] >= first["best_epoch"] + 1
    assert (tmp_path / "gnn").is_dir() and any((tmp_path / "gnn").iterdir())  # cached


def test_test_curve_reports_xu_protocol_without_changing_the_selected_result(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("JAXSYS_CACHE_DIR", str(tmp_path))
    base = ["data.name=csl", "structure.kind=csgnn", "structure.length_bound=8",
            "model.width=8", "model.depth=1", "train.epochs=12", "train.batch_size=6",
            "train.folds=3", "train.lr=0.01", "train.patience=2"]
    plain = run_experiment(load_config(None, base), dataset=_tiny_dataset(), progress=False,
                           log=lambda s: None)
    curved = run_experiment(load_config(None, base + ["train.test_curve=true"]),
                            dataset=_tiny_dataset(), progress=False, log=lambda s: None)
    # The early-stopped, validation-selected result is the same run's; training then goes on.
    for a, b in zip(plain["folds"], curved["folds"]):
        assert (a["best_epoch"], a["epochs_run"]) == (b["best_epoch"], b["epochs_run"])
        assert a["test"]["accuracy"] == b["test"]["accuracy"]
        assert len(b["test_curve"]) == 12 and "test_curve" not in a
        # The reported test score is the test fold's at the validation-selected epoch.
        assert b["test"]["accuracy"] == b["test_curve"][b["best_epoch"]]
    assert any(f["epochs_run"] < 12 for f in plain["folds"])  # patience 2 stopped early
    best = curved["summary"]["xu_protocol"]
    curves = np.asarray([f["test_curve"] for f in curved["folds"]])
    assert best["mean"] == pytest.approx(curves.mean(0).max())
    assert curves[:, best["epoch"] - 1].mean() == pytest.approx(best["mean"])


def test_kfold_validation_fold_is_an_inner_split_of_the_training_folds():
    from jaxsys.gnn import kfold_splits

    labels = np.repeat([0, 1, 2], [40, 25, 35])
    splits = kfold_splits(labels, 100, 10, seed=3)
    tests = np.concatenate([te for _, _, te in splits])
    assert sorted(tests.tolist()) == list(range(100))  # every graph is tested exactly once
    for i, (tr, va, te) in enumerate(splits):
        assert not set(va) & set(te) and not set(tr) & set(va) and not set(tr) & set(te)
        assert sorted(np.r_[tr, va].tolist()) == sorted(set(range(100)) - set(te.tolist()))
        np.testing.assert_array_equal(va, splits[(i + 1) % 10][2])  # fold i+1
        for c, n in ((0, 40), (1, 25), (2, 35)):  # stratified: each fold holds ~1/10 per class
            assert abs((labels[va] == c).sum() - n / 10) <= 1


def test_best_mean_epoch_picks_the_best_mean_epoch():
    from jaxsys.gnn._train import best_mean_epoch

    acc = [[0.5, 0.9, 0.7], [0.5, 0.5, 0.9]]  # means 0.5, 0.7, 0.8
    assert best_mean_epoch(acc, regression=False) == {"epoch": 3, "mean": pytest.approx(0.8),
                                                      "std": pytest.approx(0.1)}
    assert best_mean_epoch(acc, regression=True)["epoch"] == 1  # MAE: lower is better
    with pytest.raises(ValueError, match="k-fold"):
        load_config(None, ["data.name=csl", "train.test_curve=true"])


def test_no_calls_into_jraph_helpers_that_need_removed_jax_apis():
    """jraph 0.0.6.dev0's zero_out_padding / get_fully_connected_graph call jax.tree_map and
    jax.tree_leaves, which jax 0.10 removed; jaxsys.gnn uses only jraph code built on
    jax.tree_util (GraphsTuple, batch_np, pad_with_graphs, padding masks)."""
    from pathlib import Path

    import jaxsys.gnn

    banned = ("zero_out_padding", "get_fully_connected_graph", "jax.tree_map", "jax.tree_leaves")
    for path in Path(jaxsys.gnn.__file__).parent.glob("*.py"):
        src = path.read_text()
        assert not any(b in src for b in banned), path
