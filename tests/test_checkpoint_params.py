"""Orbax parameter checkpoints: saved from one mesh, restored bit-for-bit onto another."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxsys.models import decoder, restore_params, save_params, weights
from jaxsys.models.config import ModelConfig, RopeScaling
from jaxsys.sharding import make_mesh, tree_shardings

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                  num_kv_heads=2, head_dim=8, attention_bias=True, model_type="qwen2",
                  rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64), eos_token_ids=(2, 5), bos_token_id=1)


def _sharded_params(cfg, mesh):
    """Random parameters placed on `mesh` by the logical rules (bf16 configs get bf16 arrays)."""
    rng = np.random.default_rng(3)
    np_params = jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), decoder.param_shapes(cfg),
                             is_leaf=lambda s: isinstance(s, tuple))
    return weights.to_device(np_params, cfg, mesh)


def _assert_bitwise_equal(a_tree, b_tree):
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("src,dst", [
    ({"data": 2, "fsdp": 2, "tensor": 2}, {"tensor": 8}),
    ({"tensor": 8}, {"fsdp": 4, "tensor": 2}),
    ({"data": 8}, None),  # None: restore onto one device
])
def test_restore_onto_a_different_mesh(tmp_path, src, dst):
    params = _sharded_params(CFG, make_mesh(src))
    save_params(tmp_path / "ckpt", params, CFG)
    mesh = None if dst is None else make_mesh(dst)
    cfg, restored = restore_params(tmp_path / "ckpt", mesh)
    assert cfg == CFG  # including rope scaling, eos tuple, bias flag
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    _assert_bitwise_equal(restored, params)
    if mesh is None:
        assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(restored))
    else:
        want = tree_shardings(decoder.param_logical_axes(cfg), decoder.param_shapes(cfg), mesh)
        for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(want), strict=True):
            assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
        assert any(len(s.spec) for s in jax.tree.leaves(want))  # some parameters really are split


def test_bf16_round_trip(tmp_path):
    cfg = CFG.replace(dtype="bfloat16", rope_scaling=None)
    params = _sharded_params(cfg, make_mesh({"fsdp": 2, "tensor": 4}))
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
    save_params(tmp_path / "ckpt", params, cfg)
    cfg2, restored = restore_params(tmp_path / "ckpt", make_mesh({"data": 2, "tensor": 4}))
    assert cfg2 == cfg
    _assert_bitwise_equal(restored, params)


def test_checkpoint_errors(tmp_path):
    params = _sharded_params(CFG, make_mesh({"data": 8}))
    save_params(tmp_path / "ckpt", params, CFG)
    with pytest.raises(FileExistsError, match="exists"):
        save_params(tmp_path / "ckpt", params, CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a jaxsys parameter checkpoint"):
        restore_params(tmp_path / "empty")
