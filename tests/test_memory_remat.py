"""Remat: the per-layer checkpoint rewrite computes the same loss and gradients as the plain step
under every kind of policy, and says clearly when there is nothing to apply it to."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.models import decoder
from jaxsys.models import residuals as rn
from jaxsys.models.config import ModelConfig
from jaxsys.train import objective
from jaxsys.train.memory import Remat

P = jax.checkpoint_policies
CFG = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
NAMES = sorted(rn.LAYER_KINDS["attention"] + rn.LAYER_KINDS["mlp"])


def _loss(params, tokens):
    return objective.lm_loss_sum(params, tokens, None, cfg=CFG, dropout=0.0)


@pytest.fixture(scope="module")
def setup():
    params = decoder.init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, CFG.vocab_size)
    ref = jax.jit(jax.value_and_grad(_loss))(params, tokens)
    return params, tokens, ref


@pytest.mark.parametrize("policy", [
    P.nothing_saveable, P.save_only_these_names(rn.ATTN_Q, rn.MLP_UP),
    P.save_and_offload_only_these_names(names_which_can_be_saved=[rn.ATTN_K],
                                        names_which_can_be_offloaded=[rn.MLP_ACT, rn.ATTN_CTX],
                                        offload_src="device", offload_dst="pinned_host")])
def test_remat_matches_the_plain_gradients(setup, policy):
    params, tokens, (ref_loss, ref_grads) = setup
    loss, grads = jax.jit(jax.value_and_grad(Remat(policy)(_loss)))(params, tokens)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_remat_checkpoints_each_layer_not_the_scan(setup):
    """The rewritten backward scan recomputes one layer per iteration: nothing stacked but the
    layer inputs leaves the forward scan under nothing_saveable."""
    params, tokens, _ = setup
    closed = jax.make_jaxpr(jax.value_and_grad(Remat(P.nothing_saveable)(_loss)))(params, tokens)
    fwd = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan" and not e.params["reverse"]]
    assert len(fwd) == 1
    stacked = fwd[0].outvars[fwd[0].params["num_carry"]:]
    assert [v.aval.shape for v in stacked] == [(CFG.num_layers, 2, 16, CFG.hidden_size)]


def test_remat_reaches_a_layer_scan_nested_in_a_micro_batch_scan(setup):
    params, tokens, _ = setup
    micro = jnp.stack([tokens, tokens[::-1]])

    def accumulated(p, mb):
        return jax.lax.scan(lambda c, t: (c + _loss(p, t), None), 0.0, mb)[0]

    ref_loss, ref_g = jax.value_and_grad(accumulated)(params, micro)
    fn = jax.value_and_grad(Remat(P.nothing_saveable)(accumulated))
    loss, g = jax.jit(fn)(params, micro)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(g["embed"], ref_g["embed"], rtol=1e-4, atol=1e-6)
    text = str(jax.make_jaxpr(fn)(params, micro))
    assert "remat" in text or "checkpoint" in text


def test_remat_without_named_scan_is_a_clear_error():
    with pytest.raises(ValueError, match="no lax.scan whose body tags residuals"):
        jax.make_jaxpr(Remat(P.nothing_saveable)(lambda x: jnp.sum(x * x)))(jnp.ones(3))


def test_keep_all_is_the_identity():
    f = lambda x: x * 2  # noqa: E731
    assert Remat(None)(f) is f
