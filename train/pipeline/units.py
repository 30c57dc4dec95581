"""The decoder as units, each compiled once and run as the same executable wherever it runs.

Why not `jax.value_and_grad` of a stage: XLA compiles a program as a whole, and the fusion it picks
for an op - and with it the rounding of fused reductions and of the attention backward - depends
on the ops around it. The gradient of layers 2..3 computed in a stage program of layers 2..3
differs in its last bits from the same gradient in a program of all layers (measured: most
elements differ), and even a loop of one layer compiles differently from a loop of four. A
pipeline that must keep the math whatever the partition therefore never compiles a stage: it
runs fixed units, each its own executable, compiled once for one device and retargeted to the
others (`UnitPrograms`), so a unit gives the same bits on every device, in every stage and
partition, and in the single-device run:

* embed_forward   embedding rows [V*D], tokens [b, T+1] -> x [b, T, D]
* layer_forward   layer params [1, Lsz], x, layer index, keys -> x
* layer_backward  layer params, the layer's input x, ct of its output -> (param grads [1, Lsz], ct of x)
                  (re-runs the layer's forward for its VJP)
* head_backward   head params [H], x, tokens -> (loss sum, grads [H], ct of x)
                  (final norm, lm head, next-token NLL summed; cotangent 1)
* embed_backward  tokens, ct of x -> embedding grads [V*D] (a scatter-add)

Each unit's parameters are a flat vector in the order of its own tree (`jax.tree` order of the
decoder's names: one layer's leaves, or {"final_norm", "lm_head"}); `partition.StageMap` knows
where each element lives in the train state's flat vector. The layer body mirrors the no-cache
path of `jaxsys.models.decoder.forward` op for op; a test checks the composed units against
`decoder.forward` (logits) and against `jax.grad` of the whole model (fp32, 1e-5). Dropout keys are
per example, the dropout site is the global layer index, as in the decoder.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from jaxsys.models import decoder, layers
from jaxsys.models.config import ModelConfig, rope_inv_freq
from jaxsys.train import objective
from jaxsys.train.elastic.layout import FlatSpec

Params = dict[str, Any]


def _attention_inputs(cfg: ModelConfig, B: int, T: int):
    positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
    valid = jnp.ones((B, T), bool)
    mask_BxTxT = layers.causal_mask(positions_BxT, positions_BxT, valid & (positions_BxT >= 0), cfg.sliding_window)
    return positions_BxT, mask_BxTxT, jnp.asarray(rope_inv_freq(cfg))


def layer(x_BxTxD: jax.Array, p: Params, i: jax.Array, keys_B: jax.Array | None, *, cfg: ModelConfig,
          dropout: float) -> jax.Array:
    """One decoder layer (no KV cache): `decoder.forward`'s layer body."""
    B, T, _ = x_BxTxD.shape
    positions_BxT, mask, inv_freq = _attention_inputs(cfg, B, T)
    keys = keys_B if dropout > 0 else None
    h = layers.rms_norm(x_BxTxD, p["attn_norm"], cfg.rms_norm_eps)
    q = jnp.einsum("BTD,DHK->BTHK", h, p["wq"])
    k = jnp.einsum("BTD,DHK->BTHK", h, p["wk"])
    v = jnp.einsum("BTD,DHK->BTHK", h, p["wv"])
    if cfg.attention_bias:
        q, k, v = q + p["bq"][None, None], k + p["bk"][None, None], v + p["bv"][None, None]
    q = layers.rope(q, positions_BxT, inv_freq)
    k = layers.rope(k, positions_BxT, inv_freq)
    qg = q.reshape(B, T, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim)
    o = layers.attention_core(qg, k, v, mask).reshape(B, T, cfg.num_heads, cfg.head_dim)
    attn_out = jnp.einsum("BTHK,HKD->BTD", o, p["wo"])
    x = x_BxTxD + decoder._dropout(attn_out, dropout, keys, 2 * i)
    h = layers.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    if cfg.is_moe:
        mlp_out = decoder.moe_ffn(h, p, cfg)
    else:
        mlp_out = layers.swiglu(h, p["w_gate"], p["w_up"], p["w_down"])
    return x + decoder._dropout(mlp_out, dropout, keys, 2 * i + 1)


def embed(table_VxD: jax.Array, tokens_BxT1: jax.Array, *, cfg: ModelConfig) -> jax.Array:
    """Input embeddings [b, T, D] of the inputs tokens[:, :-1] (negative ids read row 0)."""
    table = table_VxD.astype(jnp.dtype(cfg.dtype))
    return table[jnp.maximum(tokens_BxT1[:, :-1], 0)]


def head_loss(p: Params, x_BxTxD: jax.Array, tokens_BxT1: jax.Array, *, cfg: ModelConfig) -> jax.Array:
    """Sum of next-token NLL (float32) of the targets tokens[:, 1:] (targets < 0 are ignored)."""
    pc = objective.cast_params(p, cfg)
    x = layers.rms_norm(x_BxTxD, pc["final_norm"], cfg.rms_norm_eps)
    logits_BxTxV = decoder.lm_head(pc, x, cfg)
    targets_BxT = tokens_BxT1[:, 1:]
    lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    tgt_BxT = jnp.take_along_axis(logits_BxTxV, jnp.maximum(targets_BxT, 0)[:, :, None], axis=-1)[:, :, 0]
    return jnp.sum(jnp.where(targets_BxT >= 0, lse_BxT - tgt_BxT, 0.0))


# ----------------------------------------------------------------------------- unit specs
def layer_shapes(cfg: ModelConfig) -> Params:
    """One layer's parameter shapes (the decoder's stacked leaves without the layer axis)."""
    return {k: v[1:] for k, v in decoder.param_shapes(cfg)["layers"].items()}


def head_shapes(cfg: ModelConfig) -> Params:
    if cfg.tie_word_embeddings:
        raise ValueError("the pipeline does not run tied embeddings (the first and the last stage would "
                         "share the embedding and its gradient); use an untied model")
    shapes = decoder.param_shapes(cfg)
    return {"final_norm": shapes["final_norm"], "lm_head": shapes["lm_head"]}


def layer_spec(cfg: ModelConfig) -> FlatSpec:
    return FlatSpec.from_shapes(layer_shapes(cfg), stacked_layers=False)


def head_spec(cfg: ModelConfig) -> FlatSpec:
    return FlatSpec.from_shapes(head_shapes(cfg), stacked_layers=False)


# ----------------------------------------------------------------------------- the unit programs
def unit_functions(cfg: ModelConfig, *, dropout: float, seed: int) -> dict[str, Callable]:
    """The units as plain functions of arrays (see the module docstring for their signatures)."""
    lspec, hspec = layer_spec(cfg), head_spec(cfg)
    V, D = cfg.vocab_size, cfg.hidden_size

    def run_layer(p_1xL, x, i, keys_data):
        p = objective.cast_params(lspec.unflatten(p_1xL[0]), cfg)
        return layer(x, p, i, jax.random.wrap_key_data(keys_data), cfg=cfg, dropout=dropout)

    def layer_forward(p_1xL, x, i, keys):
        return run_layer(p_1xL, x, i, keys)

    def layer_backward(p_1xL, x, ct, i, keys):
        _, vjp = jax.vjp(lambda p, x_: run_layer(p, x_, i, keys), p_1xL, x)
        return vjp(ct)

    def head_backward(p_H, x, tokens):
        loss, vjp = jax.vjp(lambda p, x_: head_loss(hspec.unflatten(p), x_, tokens, cfg=cfg), p_H, x)
        g, ct = vjp(jnp.ones((), jnp.float32))
        return loss, g, ct

    def embed_forward(e_E, tokens):
        return embed(e_E.reshape(V, D), tokens, cfg=cfg)

    def embed_backward(tokens, ct):
        _, vjp = jax.vjp(lambda e: embed(e, tokens, cfg=cfg), jnp.zeros((V, D), jnp.float32))
        return vjp(ct)[0].reshape(-1)

    def keys(step, ex_b):
        return jax.random.key_data(objective.example_keys(jax.random.key(seed), step, ex_b))

    return dict(layer_forward=layer_forward, layer_backward=layer_backward, head_backward=head_backward,
                embed_forward=embed_forward, embed_backward=embed_backward, keys=keys)


_SHARED: dict[tuple, "UnitPrograms"] = {}


class UnitPrograms:
    """The unit executables for micro-batches of b sequences of T tokens: compiled once on the
    first device that needs them, retargeted to every other device (same machine code, so the
    same bits), and cached. `UnitPrograms.shared` gives one per (model, shapes, dropout, seed) per
    process, so every layout of a run (and a recovery) reuses them."""

    @classmethod
    def shared(cls, cfg: ModelConfig, *, micro_size: int, seq_len: int, dropout: float, seed: int) -> "UnitPrograms":
        key = (cfg, micro_size, seq_len, dropout, seed)
        if key not in _SHARED:
            _SHARED[key] = cls(cfg, micro_size=micro_size, seq_len=seq_len, dropout=dropout, seed=seed)
        return _SHARED[key]

    def __init__(self, cfg: ModelConfig, *, micro_size: int, seq_len: int, dropout: float, seed: int):
        self.cfg, self.b, self.T = cfg, micro_size, seq_len
        self.fns = unit_functions(cfg, dropout=dropout, seed=seed)
        self.layer_size = layer_spec(cfg).num_params
        self.head_size = head_spec(cfg).num_params
        self.embed_size = cfg.vocab_size * cfg.hidden_size
        self._exe: dict[tuple[str, int], Any] = {}
        self._first: dict[str, tuple[jax.Device, Any]] = {}
        self.compile_s = 0.0

    def _abstract(self, name: str, dev: jax.Device):
        sh = SingleDeviceSharding(dev)
        b, T, D = self.b, self.T, self.cfg.hidden_size
        xdt = jnp.dtype(self.cfg.dtype)
        sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sh)  # noqa: E731
        key_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
        x, tok = sd((b, T, D), xdt), sd((b, T + 1), jnp.int32)
        i, keys = sd((), jnp.int32), sd((b,) + key_shape, jnp.uint32)
        p_l, p_h, p_e = sd((1, self.layer_size), jnp.float32), sd((self.head_size,), jnp.float32), \
            sd((self.embed_size,), jnp.float32)
        return {"layer_forward": (p_l, x, i, keys), "layer_backward": (p_l, x, x, i, keys),
                "head_backward": (p_h, x, tok), "embed_forward": (p_e, tok), "embed_backward": (tok, x),
                "keys": (i, sd((b,), jnp.int32))}[name]

    def get(self, name: str, dev: jax.Device):
        exe = self._exe.get((name, dev.id))
        if exe is not None:
            return exe
        import time

        from jaxsys.train.elastic.compile import retarget

        t0 = time.perf_counter()
        if name in self._first:
            base_dev, base = self._first[name]
            exe = retarget(base, [base_dev], [dev])
        else:
            fn = self.fns[name]
            if name == "keys":
                inner = fn
                fn = lambda step, ex: inner(step, ex)  # noqa: E731
            exe = jax.jit(fn).lower(*self._abstract(name, dev)).compile()
            self._first[name] = (dev, exe)
        self.compile_s += time.perf_counter() - t0
        self._exe[(name, dev.id)] = exe
        return exe
