"""JAX's own Pallas GPU decode kernels as baselines, with the parameters a sweep may tune.

  jax_decode_attention  `jax.experimental.pallas.ops.gpu.decode_attention` on per-request
                        contiguous KV (what it takes: a paged cache does not have that layout)
  jax_paged_attention   `jax.experimental.pallas.ops.gpu.paged_attention` on the same page pool and
                        page tables as our split-KV kernel: JAX's paged decode, no sharing

Both compute fp32 dots at Triton's default precision (TF32) and bf16 ones in bf16. Their
parameters start at JAX's defaults and are swept (`sweeps.BASELINE_SWEEPS`) on the same tuning
trees, with the same time budget, as ours.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .harness import Runner

BASELINES = ("jax_decode_attention", "jax_paged_attention")

# JAX's defaults (decode_attention.gqa, paged_attention.paged_attention), the sweeps' start. fp32
# paged tiles of 8 pages x 2 stages overflow shared memory: its start is 4 pages for fp32.
DEFAULTS = {
    "jax_decode_attention": {"block_k": 128, "k_splits": 16, "num_warps": None, "num_stages": 2},
    "jax_paged_attention": {"pages_per_compute_block": 8, "k_splits": 16, "num_warps": 8, "num_stages": 2},
}


def default_params(name: str, itemsize: int) -> dict:
    params = dict(DEFAULTS[name])
    if name == "jax_paged_attention" and itemsize > 2:
        params["pages_per_compute_block"] = 4
    return params


def decode_attention_fn(runner: Runner, q, k_c, v_c, lengths, params: dict):
    """JAX's decode attention on [B, Hkv, L, D] contiguous KV: its per-head kernel
    (`decode_attn_unbatched`, vmapped over batch and KV heads exactly as its `gqa` does), so the
    [B, L, Hkv, D] -> [B, Hkv, L, D] transpose `gqa` does on every call is not timed. The KV is
    padded (outside the timing) to the multiple of k_splits * block_k its kernel needs. Returns a
    zero-arg callable (compiled and run once)."""
    from jax.experimental.pallas.ops.gpu import decode_attention

    block_k, k_splits = params["block_k"], params["k_splits"]
    b, hkv, length, d = k_c.shape
    padded = -(-length // (k_splits * block_k)) * (k_splits * block_k)
    pad = ((0, 0), (0, 0), (0, padded - length), (0, 0))
    k_p, v_p = jax.block_until_ready((jnp.pad(k_c, pad), jnp.pad(v_c, pad)))
    inner = functools.partial(
        decode_attention.decode_attn_unbatched, sm_scale=runner.scale, block_h=16, block_k=block_k,
        k_splits=k_splits, num_warps=params["num_warps"], num_stages=params["num_stages"], grid=None,
        interpret=runner.interpret, debug=False, return_residuals=False, normalize_output=True)
    per_head = jax.vmap(jax.vmap(inner, in_axes=(0, 0, 0, None, None)), in_axes=(0, 0, 0, None, 0))

    def one(q1, k, v, ln):
        return per_head(q1.reshape(b, hkv, q1.shape[1] // hkv, d), k, v, None, ln).reshape(q1.shape)

    fn = runner.layered(one)
    jax.block_until_ready(fn(q, k_p, v_p, lengths))
    return lambda: fn(q, k_p, v_p, lengths)


def paged_attention_fn(runner: Runner, q, k_pages, v_pages, table, lengths, params: dict):
    """JAX's paged attention on our page pool and tables (padded to a multiple of k_splits pages).
    Its kernel takes no softmax scale: the queries are scaled outside the timing. Returns a
    zero-arg callable (compiled and run once); raises what Triton raises for a tile it rejects."""
    from jax.experimental.pallas.ops.gpu import paged_attention as jpa

    k_splits = params["k_splits"]
    width = -(-table.shape[1] // k_splits) * k_splits
    table = jnp.pad(table, ((0, 0), (0, width - table.shape[1])))
    q = jax.block_until_ready(q * jnp.asarray(runner.scale, q.dtype))
    fn = runner.layered(functools.partial(jpa.paged_attention, interpret=runner.interpret, **params))
    jax.block_until_ready(fn(q, k_pages, v_pages, table, lengths))
    return lambda: fn(q, k_pages, v_pages, table, lengths)


def baseline_fn(name: str, runner: Runner, inputs: dict, params: dict):
    """The callable of baseline `name` on a configuration's `inputs` (q, k/v pages, contiguous
    k/v, table, lengths)."""
    if name == "jax_decode_attention":
        return decode_attention_fn(runner, inputs["q"], inputs["k_c"], inputs["v_c"], inputs["lengths"], params)
    return paged_attention_fn(runner, inputs["q"], inputs["k_pages"], inputs["v_pages"], inputs["table"],
                              inputs["lengths"], params)
