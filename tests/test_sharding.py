"""Sharding on 8 virtual CPU devices: the logical rules, meshes, sharded init and forward.

Sharded init runs under jit with explicit out_shardings from the logical rules; the sharded forward
runs under jit with explicit in/out shardings inside `jaxsys.sharding.activate(mesh)`. Its logits
must equal the single-device forward (fp32, atol 1e-5). Tiny configs are chosen so head counts,
widths and expert counts divide the mesh axes: the sharding is real, and asserted to be.

Expected partition specs: every parameter's PartitionSpec, for a fixed set of (config, mesh) pairs,
is derived in this file from hand-written tables (which mesh axes each dimension of each parameter
may use, and each parameter's shape written out from the config), with the rule stated in
`jaxsys/sharding/rules.py` applied by a separate small function here. The code under test never
writes the expectation. `tests/golden/param_specs.json` is that expectation, checked in so a change
shows up as a reviewable diff; regenerate it (from the hand tables, not from the code) with

    JAXSYS_UPDATE_GOLDEN=1 pytest tests/test_sharding.py -k golden
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsys.models import decoder
from jaxsys.models.config import ModelConfig
from jaxsys.sharding import (LOGICAL_RULES, MeshConfig, activate, active_mesh, axes, constrain, logical_sharding,
                             logical_to_spec, make_mesh, tree_shardings)

SHARD_ATOL = 1e-5  # fp32 (fixed; never loosen)
# The tolerance is absolute, so the weights are drawn at a scale that keeps |logits| ~ 3 (as in the
# HF parity tests). Different partitionings reorder fp32 sums; at this scale that moves logits by
# ~2e-6 (unsharded batch 1 vs batch 8 already differs by that much).
INIT_STD = 0.1
GOLDEN = Path(__file__).parent / "golden" / "param_specs.json"

# Tiny configs sized for the meshes: D=64 (fsdp 2), Hq=8 (tensor 2/8), Hkv=2 or 8, F=128, V=128.
DENSE = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                    num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6)
DENSE_BIAS_KV8 = DENSE.replace(num_kv_heads=8, attention_bias=True, model_type="qwen2")
MIXTRAL = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=0, num_layers=2, num_heads=8,
                      num_kv_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      model_type="mixtral", rms_norm_eps=1e-6)
QWEN2_MOE = MIXTRAL.replace(num_experts=4, shared_expert_intermediate_size=48, norm_topk_prob=False,
                            attention_bias=True, model_type="qwen2_moe")
# The real SmolLM2-135M shapes: 9 query / 3 KV heads divide none of the tensor axes here.
SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0)

MESHES = {
    "data8": {"data": 8},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
    "tensor8": {"tensor": 8},
    "expert4_data2": {"expert": 4, "data": 2},
}

FORWARD_CASES = [
    ("data8", DENSE),
    ("data2_fsdp2_tensor2", DENSE),
    ("tensor8", DENSE),  # query heads split 8 ways, the 2 KV heads replicated
    ("tensor8", DENSE_BIAS_KV8),  # KV heads and their biases split too
    ("expert4_data2", MIXTRAL),
]

GOLDEN_CONFIGS = {"dense": DENSE, "dense_bias_kv8": DENSE_BIAS_KV8, "mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE,
                  "smollm2_135m": SMOLLM2}


def _param_shardings(cfg, mesh):
    return tree_shardings(decoder.param_logical_axes(cfg), decoder.param_shapes(cfg), mesh)


def spec_str(spec: P) -> str:
    """A PartitionSpec as a string that does not depend on the jax version's repr."""
    def entry(e):
        if isinstance(e, tuple):
            return "(" + ", ".join(repr(a) for a in e) + ")"
        return repr(e)
    return "P(" + ", ".join(entry(e) for e in spec) + ")"


def _specs(cfg, mesh) -> dict[str, str]:
    flat = jax.tree_util.tree_flatten_with_path(_param_shardings(cfg, mesh))[0]
    return {jax.tree_util.keystr(path): spec_str(s.spec) for path, s in flat}


# ---------------------------------------------------------------------- sharded init + forward

_single_device_forward = jax.jit(decoder.forward, static_argnames="cfg")


def _tokens(cfg):
    return jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (8, 16)), jnp.int32)


@pytest.mark.parametrize("mesh_name,cfg", FORWARD_CASES,
                         ids=[f"{m}-{c.model_type}-kv{c.num_kv_heads}" for m, c in FORWARD_CASES])
def test_sharded_init_and_forward_match_single_device(mesh_name, cfg):
    mesh = make_mesh(MESHES[mesh_name])
    shardings = _param_shardings(cfg, mesh)
    init = jax.jit(decoder.init_params, static_argnums=(0, 2), out_shardings=shardings)
    params = init(cfg, jax.random.key(0), INIT_STD)

    # the shardings are the requested ones, and real
    for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    partitioned = [k for k, s in _specs(cfg, mesh).items() if s != "P()"]
    if mesh_name == "data8":
        assert partitioned == []  # data parallelism replicates every parameter
    else:
        assert partitioned, "no parameter is partitioned on this mesh"

    # single-device reference: the same values gathered onto one device
    dev0 = jax.devices()[0]
    tokens = _tokens(cfg)
    ref_logits = np.asarray(_single_device_forward(jax.device_put(params, dev0), tokens, cfg=cfg)[0])

    batch = logical_sharding((axes.BATCH, axes.SEQ), tokens.shape, mesh)
    out = logical_sharding((axes.BATCH, axes.SEQ, axes.VOCAB), ref_logits.shape, mesh)
    if any(mesh.shape[a] > 1 for a in ("data", "fsdp", "expert")):
        assert len(batch.spec) and batch.spec[0] is not None  # the batch really is split

    def fwd(p, t):
        return decoder.forward(p, t, cfg=cfg)[0]

    with activate(mesh):
        sharded_fwd = jax.jit(fwd, in_shardings=(shardings, batch), out_shardings=out)
        logits = sharded_fwd(params, jax.device_put(tokens, batch))
    assert logits.sharding.is_equivalent_to(out, 3)
    assert len(logits.sharding.device_set) == 8
    err = float(np.max(np.abs(np.asarray(logits) - ref_logits)))
    assert err <= SHARD_ATOL, f"sharded vs single-device logits differ by {err:.3g}"


def test_sharded_init_draws_the_single_device_numbers():
    """Partitioned random init produces bit-identical parameters to the unpartitioned one."""
    mesh = make_mesh(MESHES["data2_fsdp2_tensor2"])
    sharded = jax.jit(decoder.init_params, static_argnums=(0, 2), out_shardings=_param_shardings(DENSE, mesh))(
        DENSE, jax.random.key(0), INIT_STD)
    single = jax.jit(decoder.init_params, static_argnums=(0, 2))(DENSE, jax.random.key(0), INIT_STD)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_expert_parallel_mesh_partitions_experts():
    mesh = make_mesh(MESHES["expert4_data2"])
    s = _param_shardings(MIXTRAL, mesh)["layers"]
    for k in ("we_gate", "we_up", "we_down"):
        assert s[k].spec[1] == "expert"
        assert s[k].shard_shape((2, 8, 64, 32) if k != "we_down" else (2, 8, 32, 64))[1] == 2  # 8 experts / 4
    assert s["router"].spec == P()


def test_tree_shardings_accepts_shapes_arrays_and_abstract():
    mesh = make_mesh(MESHES["data2_fsdp2_tensor2"])
    logical = decoder.param_logical_axes(DENSE)
    from_shapes = tree_shardings(logical, decoder.param_shapes(DENSE), mesh)
    from_abstract = tree_shardings(logical, decoder.abstract_params(DENSE), mesh)
    from_numpy = tree_shardings(logical, jax.tree.map(np.zeros, decoder.param_shapes(DENSE),
                                                      is_leaf=lambda t: isinstance(t, tuple)), mesh)
    assert from_shapes == from_abstract == from_numpy
    assert from_shapes["layers"]["wq"].spec == P(None, "fsdp", "tensor")


# ---------------------------------------------------------------------- expected specs, by hand

# Which mesh axes each dimension of each parameter may use, in order of preference, written out by
# hand from the design (vocab and heads and MLP widths on `tensor`, the model width on `fsdp`,
# experts on `expert`, the stacked-layers axis, head_dim and norms never split).
HAND_DIMS: dict[str, tuple[tuple[str, ...], ...]] = {
    "embed": (("tensor",), ("fsdp",)),                      # [V, D]
    "final_norm": ((),),                                     # [D]
    "lm_head": (("fsdp",), ("tensor",)),                    # [D, V]
    "attn_norm": ((), ()), "mlp_norm": ((), ()),            # [L, D]
    "wq": ((), ("fsdp",), ("tensor",), ()),                 # [L, D, Hq, Dh]
    "wk": ((), ("fsdp",), ("tensor",), ()), "wv": ((), ("fsdp",), ("tensor",), ()),
    "wo": ((), ("tensor",), (), ("fsdp",)),                 # [L, Hq, Dh, D]
    "bq": ((), ("tensor",), ()), "bk": ((), ("tensor",), ()), "bv": ((), ("tensor",), ()),
    "w_gate": ((), ("fsdp",), ("tensor",)), "w_up": ((), ("fsdp",), ("tensor",)),   # [L, D, F]
    "w_down": ((), ("tensor",), ("fsdp",)),                 # [L, F, D]
    "router": ((), ("fsdp",), ()),                          # [L, D, E]
    "we_gate": ((), ("expert",), ("fsdp",), ("tensor",)),   # [L, E, D, Fe]
    "we_up": ((), ("expert",), ("fsdp",), ("tensor",)),
    "we_down": ((), ("expert",), ("tensor",), ("fsdp",)),   # [L, E, Fe, D]
    "ws_gate": ((), ("fsdp",), ("tensor",)), "ws_up": ((), ("fsdp",), ("tensor",)),
    "ws_down": ((), ("tensor",), ("fsdp",)), "ws_router": ((), ("fsdp",)),
}


def _hand_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, written out from the config fields (not from `decoder`)."""
    L, D, V, Hq, Hkv, Dh = (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.num_heads,
                            cfg.num_kv_heads, cfg.head_dim)
    s = {"embed": (V, D), "final_norm": (D,), "attn_norm": (L, D), "mlp_norm": (L, D),
         "wq": (L, D, Hq, Dh), "wk": (L, D, Hkv, Dh), "wv": (L, D, Hkv, Dh), "wo": (L, Hq, Dh, D)}
    if not cfg.tie_word_embeddings:
        s["lm_head"] = (D, V)
    if cfg.attention_bias:
        s.update(bq=(L, Hq, Dh), bk=(L, Hkv, Dh), bv=(L, Hkv, Dh))
    if cfg.num_experts:
        E, Fe = cfg.num_experts, cfg.moe_intermediate_size
        s.update(router=(L, D, E), we_gate=(L, E, D, Fe), we_up=(L, E, D, Fe), we_down=(L, E, Fe, D))
        if cfg.shared_expert_intermediate_size:
            Fs = cfg.shared_expert_intermediate_size
            s.update(ws_gate=(L, D, Fs), ws_up=(L, D, Fs), ws_down=(L, Fs, D), ws_router=(L, D))
    else:
        F = cfg.intermediate_size
        s.update(w_gate=(L, D, F), w_up=(L, D, F), w_down=(L, F, D))
    return s


def _hand_spec(dims: tuple[tuple[str, ...], ...], shape: tuple[int, ...], mesh_sizes: dict[str, int]) -> str:
    """The stated rule: a dimension takes a candidate mesh axis when that axis has more than one
    device, no earlier dimension of the array took it, and it divides the dimension (together with
    the axes this dimension already took); trailing unsplit dimensions are dropped."""
    used: set[str] = set()
    entries: list[str] = []
    for cands, size in zip(dims, shape, strict=True):
        took: list[str] = []
        for a in cands:
            n = mesh_sizes.get(a, 1)
            if n > 1 and a not in used and size % (math.prod(mesh_sizes[t] for t in took) * n) == 0:
                took.append(a)
        used.update(took)
        entries.append("None" if not took else repr(took[0]) if len(took) == 1
                       else "(" + ", ".join(repr(t) for t in took) + ")")
    while entries and entries[-1] == "None":
        entries.pop()
    return "P(" + ", ".join(entries) + ")"


def _hand_expected() -> dict[str, dict[str, str]]:
    out = {}
    for cname, cfg in GOLDEN_CONFIGS.items():
        for mname, mesh_sizes in MESHES.items():
            specs = {}
            for name, shape in _hand_shapes(cfg).items():
                key = f"['{name}']" if name in ("embed", "final_norm", "lm_head") else f"['layers']['{name}']"
                specs[key] = _hand_spec(HAND_DIMS[name], shape, mesh_sizes)
            out[f"{cname}@{mname}"] = specs
    return out


def _code_now() -> dict[str, dict[str, str]]:
    return {f"{c}@{m}": _specs(cfg, make_mesh(mesh_cfg))
            for c, cfg in GOLDEN_CONFIGS.items() for m, mesh_cfg in MESHES.items()}


def test_golden_param_specs():
    """The rules table, applied by the code, gives the specs derived by hand."""
    expected = _hand_expected()
    if os.environ.get("JAXSYS_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    assert json.loads(GOLDEN.read_text()) == expected, (
        "the checked-in snapshot differs from the hand tables (JAXSYS_UPDATE_GOLDEN=1 after review)")
    now = _code_now()
    assert sorted(now) == sorted(expected)
    diffs = [f"{pair} {param}: expected {expected[pair].get(param)} code {spec}"
             for pair in now for param, spec in now[pair].items() if expected[pair].get(param) != spec]
    diffs += [f"{pair} {param}: expected, but the code has no such parameter" for pair in expected
              for param in expected[pair] if param not in now[pair]]
    assert not diffs, "param specs differ from the hand-derived expectation:\n" + "\n".join(diffs)


def test_golden_snapshot_spot_checks():
    """A few entries read by hand, so the snapshot itself is known to be right."""
    g = json.loads(GOLDEN.read_text())
    assert g["dense@data2_fsdp2_tensor2"]["['layers']['wq']"] == "P(None, 'fsdp', 'tensor')"
    assert g["dense@data2_fsdp2_tensor2"]["['embed']"] == "P('tensor', 'fsdp')"
    assert g["dense@tensor8"]["['layers']['wk']"] == "P()"  # 2 KV heads on tensor=8: replicated
    assert g["dense_bias_kv8@tensor8"]["['layers']['wk']"] == "P(None, None, 'tensor')"
    assert g["mixtral@expert4_data2"]["['layers']['we_down']"] == "P(None, 'expert')"
    assert g["smollm2_135m@tensor8"]["['layers']['wq']"] == "P()"  # 9 heads
    assert "['lm_head']" not in g["smollm2_135m@tensor8"]
    assert all(s == "P()" for s in g["dense@data8"].values())


# ---------------------------------------------------------------------- logical_to_spec

def test_logical_to_spec_basics():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert logical_to_spec((axes.BATCH, axes.SEQ, axes.EMBED), (8, 5, 64), mesh) == P(("data", "fsdp"))
    assert logical_to_spec((axes.LAYERS, axes.EMBED, axes.MLP), (2, 64, 128), mesh) == P(None, "fsdp", "tensor")
    assert logical_to_spec((None, axes.MLP), (3, 128), mesh) == P(None, "tensor")
    assert logical_to_spec((axes.EMBED,), None, mesh) == P("fsdp")  # no shape: no divisibility check
    with pytest.raises(KeyError, match="no_such_axis"):
        logical_to_spec(("no_such_axis",), (4,), mesh)


def test_logical_to_spec_non_divisible_dims_replicate():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert logical_to_spec((axes.Q_HEADS, axes.HEAD_DIM), (9, 64), mesh) == P()  # 9 heads on tensor=2
    assert logical_to_spec((axes.BATCH,), (2,), mesh) == P("data")  # 2 % (2*2): fsdp dropped
    assert logical_to_spec((axes.BATCH,), (1,), mesh) == P()
    assert logical_to_spec((axes.BATCH,), (6,), mesh) == P("data")


def test_logical_to_spec_never_reuses_a_mesh_axis():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    # mlp and expert_mlp both want `tensor`; embed wants `fsdp`, already taken by batch
    assert logical_to_spec((axes.MLP, axes.EXPERT_MLP), (8, 8), mesh) == P("tensor")
    assert logical_to_spec((axes.BATCH, axes.EMBED), (8, 64), mesh) == P(("data", "fsdp"))
    # ...but a dimension that cannot take `tensor` leaves it free for the next one
    assert logical_to_spec((axes.MLP, axes.EXPERT_MLP), (3, 8), mesh) == P(None, "tensor")


_LOGICAL_NAMES = [name for name, _ in LOGICAL_RULES] + [None]
_MESH_SHAPES = [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"tensor": 8}, {"expert": 4, "data": 2},
                {"fsdp": 4, "tensor": 2}, {"data": 2, "expert": 2, "tensor": 2}]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.sampled_from(range(len(_MESH_SHAPES))),
       st.lists(st.tuples(st.sampled_from(_LOGICAL_NAMES), st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16])),
                min_size=1, max_size=5))
def test_logical_to_spec_properties(mesh_idx, dims):
    mesh = make_mesh(_MESH_SHAPES[mesh_idx])
    logical = tuple(n for n, _ in dims)
    shape = tuple(s for _, s in dims)
    spec = logical_to_spec(logical, shape, mesh)
    assert len(spec) <= len(shape)
    used = []
    for i, entry in enumerate(spec):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        used += names
        rule = dict(LOGICAL_RULES).get(logical[i], ()) if logical[i] else ()
        assert set(names) <= set(rule)  # only axes the rule allows
        assert shape[i] % math.prod(mesh.shape[n] for n in names) == 0  # divisible
        assert all(mesh.shape[n] > 1 for n in names)
    assert len(used) == len(set(used)), f"mesh axis used twice in {spec}"
    NamedSharding(mesh, spec).shard_shape(shape)  # jax accepts it


# ---------------------------------------------------------------------- meshes

def test_make_mesh_shapes():
    assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}
    m = make_mesh(MeshConfig(fsdp=-1, tensor=2))
    assert dict(m.shape) == {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
    assert m.axis_names == axes.MESH_AXES
    m4 = make_mesh({"tensor": 4}, devices=jax.devices()[:4])
    assert m4.size == 4 and set(m4.devices.flat) == set(jax.devices()[:4])


def test_mesh_config_errors():
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        MeshConfig(data=-1, fsdp=-1).sizes(8)
    with pytest.raises(ValueError, match="needs 4 devices, have 8"):
        MeshConfig(data=2, tensor=2).sizes(8)
    with pytest.raises(ValueError, match="not divisible"):
        MeshConfig(data=3, fsdp=-1).sizes(8)
    with pytest.raises(ValueError, match="unknown mesh axes.*'pipeline'"):
        MeshConfig.from_dict({"data": 4, "pipeline": 2})
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh({"data": 16})
    assert MeshConfig(tensor=-1).sizes(8) == {"data": 1, "fsdp": 1, "tensor": 8, "expert": 1}


def test_activate_scopes_constrain():
    mesh = make_mesh({"data": 8})
    x = jnp.ones((8, 4))
    assert active_mesh() is None
    assert constrain(x, (axes.BATCH, axes.EMBED)) is x  # no mesh: identity
    with activate(mesh):
        assert active_mesh() is mesh
        with activate(None):
            assert active_mesh() is None
        assert active_mesh() is mesh
        y = jax.jit(lambda a: constrain(a * 2, (axes.BATCH, axes.EMBED)))(x)
        assert y.sharding.spec == P("data")
    assert active_mesh() is None
