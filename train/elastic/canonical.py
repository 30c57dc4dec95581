"""The layout-invariant ("canonical") training step: the same bits on 8, 7, 6 or 1 devices.

Why XLA's usual data-parallel step is not enough: a `sum` over a batch dimension sharded on N
devices is computed as N local sums and an all-reduce, so the floating-point summation order, and
with it the last bits of every gradient, changes with N. After a device is lost the run drifts
from the run that would have happened. This step fixes the order of every reduction:

1. The global batch is M fixed micro-batches (consecutive global example indices). Each device
   computes the gradients of whole micro-batches, one at a time (`lax.scan` over its K slots),
   with the full parameters (all-gathered from the fsdp shards; gathering is exact). Every
   micro-batch is the same shapes on the same compiled body whichever device runs it, so its
   gradient has the same bits. Mesh axes: the elastic mode uses one flat device axis (the mesh's
   `fsdp` axis, data x fsdp flattened); `tensor` and `expert` must be 1, because splitting a
   contraction over devices changes its summation order with the device count.
2. Per-micro-batch gradients are exchanged with one all-to-all so that device k receives, for its
   slice of the flat vector, the gradients of all M micro-batches; it then sums them with a fixed
   binary tree over the micro-batch index (padded to a power of two with zeros). That is a
   reduce-scatter whose order does not depend on N. (Cost: M/N times the bytes of a reduce-scatter,
   and K gradients held per device.)
3. The gradient norm for clipping is a fixed tree too: fixed chunks of `chunk_size` elements of the
   flat vector are summed by a pairwise tree (after a halo exchange gives each device the chunks
   that start in its slice), then the chunk sums are all-gathered and summed by a tree.
4. Dropout keys are per example (`jaxsys.train.objective.example_keys`).
5. AdamW is elementwise on the flat shards.

The loss is the tree sum of micro-batch NLL sums over the global number of target tokens, so the
global batch and the gradient scale never change when devices come and go.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsys.models.config import ModelConfig
from jaxsys.shapes import pow2_bucket
from jaxsys.train import objective
from jaxsys.train.config import OptimConfig
from jaxsys.train.elastic.layout import FlatSpec, ceil_div
from jaxsys.train.optim import clip_by_norm, make_optimizer, opt_state_from

AXIS = "fsdp"
"""The mesh axis the elastic layout shards over (the other mesh axes have size 1)."""

_GOLDEN = np.uint32(0x9E3779B1)
_MIX = np.uint32(0x85EBCA77)


# ----------------------------------------------------------------------------- fixed-order sums
def tree_sum(x: jax.Array) -> jax.Array:
    """Sum over axis 0 by a fixed pairwise tree: pad to a power of two with zeros, then halve
    (x[:h] + x[h:]) until one row is left. Elementwise adds only, so the bits depend only on the
    values and the length of axis 0, never on the device layout."""
    n = x.shape[0]
    p2 = pow2_bucket(n)
    if p2 != n:
        x = jnp.concatenate([x, jnp.zeros((p2 - n,) + x.shape[1:], x.dtype)], axis=0)
    while x.shape[0] > 1:
        h = x.shape[0] // 2
        x = x[:h] + x[h:]
    return x[0]


def tree_sum_last(x: jax.Array) -> jax.Array:
    """`tree_sum` over the last axis (its length must be a power of two)."""
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = x[..., :h] + x[..., h:]
    return x[..., 0]


def checksum(bits_u32: jax.Array, pos_u32: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Two 32-bit lanes [2] of a position-weighted sum of the raw bits (integer arithmetic mod
    2^32, so any summation order gives the same result). A single flipped bit always changes lane
    0: it moves one term by +-2^j, multiplied by an odd weight. Terms where `valid` is False count 0."""
    w0 = pos_u32 * np.uint32(2) + np.uint32(1)
    t0 = bits_u32 * w0
    t1 = (bits_u32 ^ (pos_u32 * _GOLDEN)) * _MIX
    if valid is not None:
        t0, t1 = jnp.where(valid, t0, np.uint32(0)), jnp.where(valid, t1, np.uint32(0))
    return jnp.stack([jnp.sum(t0, dtype=jnp.uint32), jnp.sum(t1, dtype=jnp.uint32)])


def as_bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def shard_checksum(buf_3xS: jax.Array) -> jax.Array:
    """[2] checksum of one [3, S] state shard (positions are local to the shard)."""
    bits = as_bits(buf_3xS).reshape(-1)
    return checksum(bits, jnp.arange(bits.shape[0], dtype=jnp.uint32))


# ----------------------------------------------------------------------------- static tables
@dataclasses.dataclass(frozen=True)
class NormPlan:
    """Which fixed chunks of the flat vector each device sums (chunks that start in its slice)."""

    chunk: int
    num_chunks: int
    starts: tuple[int, ...]
    counts: tuple[int, ...]
    offsets: tuple[int, ...]
    rows: int
    halo: int
    ext_len: int
    gather_index: tuple[int, ...]

    @classmethod
    def make(cls, num_params: int, n: int, shard: int, chunk: int) -> "NormPlan":
        nchunks = ceil_div(num_params, chunk)
        starts, counts, offs = [], [], []
        for i in range(n):
            a = min(ceil_div(i * shard, chunk), nchunks)
            b = min(ceil_div((i + 1) * shard, chunk), nchunks)
            starts.append(a)
            counts.append(b - a)
            offs.append(a * chunk - i * shard if b > a else 0)
        rows = max(1, max(counts))
        need = max(o + c * chunk for o, c in zip(offs, counts))
        halo = max(0, ceil_div(need - shard, shard))
        ext_len = max(max(offs) + rows * chunk, shard * (1 + halo))
        gather = []
        for c in range(nchunks):
            i = max(j for j in range(n) if starts[j] <= c and counts[j] > 0 and c < starts[j] + counts[j])
            gather.append(i * rows + (c - starts[i]))
        return cls(chunk, nchunks, tuple(starts), tuple(counts), tuple(offs), rows, halo, ext_len,
                   tuple(gather))


def canonical_sumsq(x_S: jax.Array, plan: NormPlan, n: int, axis: str = AXIS) -> jax.Array:
    """Sum of squares of a flat vector sharded over `axis` (inside shard_map), in a fixed order."""
    sq = x_S * x_S
    parts = [sq]
    for j in range(1, plan.halo + 1):
        # device i receives the slice of device i + j (zeros past the end)
        perm = [(i + j, i) for i in range(n - j)]
        parts.append(jax.lax.ppermute(sq, axis, perm) if perm else jnp.zeros_like(sq))
    ext = jnp.concatenate(parts)
    if ext.shape[0] < plan.ext_len:
        ext = jnp.concatenate([ext, jnp.zeros((plan.ext_len - ext.shape[0],), ext.dtype)])
    i = jax.lax.axis_index(axis)
    off = jnp.asarray(plan.offsets, jnp.int32)[i]
    cnt = jnp.asarray(plan.counts, jnp.int32)[i]
    seg = jax.lax.dynamic_slice(ext, (off,), (plan.rows * plan.chunk,)).reshape(plan.rows, plan.chunk)
    sums_R = tree_sum_last(seg)
    sums_R = jnp.where(jnp.arange(plan.rows) < cnt, sums_R, 0.0)
    all_sums = jax.lax.all_gather(sums_R, axis, tiled=True)
    chunk_sums = all_sums[jnp.asarray(plan.gather_index, jnp.int32)]
    return tree_sum(chunk_sums)


def decay_mask_shard(flat: FlatSpec, shard: int, axis: str = AXIS) -> jax.Array:
    """[S] float32 1.0 where the element at this device's slice gets weight decay."""
    pos = jax.lax.axis_index(axis) * shard + jnp.arange(shard, dtype=jnp.int32)
    m = jnp.zeros((shard,), bool)
    for a, b in flat.decay_ranges():
        m = m | ((pos >= a) & (pos < b))
    return m.astype(jnp.float32)


# ----------------------------------------------------------------------------- the step
@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about an elastic step program except which devices run it."""

    model: ModelConfig
    flat: FlatSpec
    optim: OptimConfig
    num_devices: int
    slots: int
    num_micro: int
    micro_size: int
    seq_len: int
    dropout: float
    seed: int
    chunk: int
    snapshot: str | None
    """None: no snapshot, the state is donated. Else the memory kind of the replicas: the step then
    keeps its input (the snapshot's primary), verifies it against the reference checksums and
    emits the next snapshot (replica of shard k on device k+1, reference checksums)."""

    @property
    def num_params(self) -> int:
        return self.flat.num_params

    @property
    def shard(self) -> int:
        return ceil_div(self.num_params, self.num_devices)


def layout_mesh(devices) -> Mesh:
    """The elastic mesh: every device on the `fsdp` axis (data, tensor, expert of size 1)."""
    from jaxsys.sharding import make_mesh

    return make_mesh({"fsdp": len(devices)}, devices=list(devices))


def state_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(None, AXIS))


def make_step(spec: StepSpec, mesh: Mesh):
    """The jitted step for `mesh`:

    step(flat_3xNS, count, tokens_NxKxbxT1, example_ids_NxKxb, slot_micro_NxK, step, micro_idx_M,
         micro_active_M, n_valid, lr[, ref_Nx2]) -> (flat_3xNS, count, metrics[, replica, ref])

    slot_micro: the micro-batch of each slot, -1 for an idle slot (uneven splits); idle slots are
    skipped (`lax.cond`) and their gradients never enter the reduction.

    With `spec.snapshot`, the step takes the reference checksums of its input and returns the next
    snapshot in the same program (no extra launches): metrics["input_ok"] [N] says whether each
    input shard still matched its checksum, metrics["replica_ok"] [N] whether each new replica
    arrived intact.

    flat rows are (params, adam mu, adam nu) of the flat vector; metrics are replicated scalars:
    loss, grad_norm and param_checksum [2] (uint32, layout-independent).
    """
    N, K, M = spec.num_devices, spec.slots, spec.num_micro
    P, S = spec.num_params, spec.shard
    flat = spec.flat
    norm_plan = NormPlan.make(P, N, S, spec.chunk)
    loss_fn = jax.value_and_grad(
        lambda p, tok, keys: objective.lm_loss_sum(p, tok, keys, cfg=spec.model, dropout=spec.dropout))

    def body(flat_3xS, count, tok_1xKxbxT1, ex_1xKxb, slot_1xK, step, micro_idx_M, micro_active_M, n_valid, lr,
             ref_Nx2=None):
        params_S, mu_S, nu_S = flat_3xS[0], flat_3xS[1], flat_3xS[2]
        full_P = jax.lax.all_gather(params_S, AXIS, tiled=True)[:P]
        ptree = flat.unflatten(full_P)
        root = jax.random.key(spec.seed)

        def compute(tok_bxT1, ex_b):
            keys_b = objective.example_keys(root, step, ex_b)
            l, g = loss_fn(ptree, tok_bxT1, keys_b)
            return l, jnp.pad(flat.flatten(g), (0, N * S - P))

        def idle(tok_bxT1, ex_b):
            return jnp.zeros((), jnp.float32), jnp.zeros((N * S,), jnp.float32)

        def one(carry, xs):
            tok_bxT1, ex_b, m = xs
            return carry, jax.lax.cond(m >= 0, compute, idle, tok_bxT1, ex_b)

        _, (l_K, g_KxNS) = jax.lax.scan(one, None, (tok_1xKxbxT1[0], ex_1xKxb[0], slot_1xK[0]))
        # device k gets every slot's gradient for its slice: [N*K (source-major), 1, S]
        g_recv = jax.lax.all_to_all(g_KxNS.reshape(K, N, S), AXIS, 1, 0, tiled=True).reshape(N * K, S)
        g_MxS = jnp.where(micro_active_M[:, None], g_recv[micro_idx_M], 0.0)
        g_S = tree_sum(g_MxS) / n_valid
        l_NK = jax.lax.all_gather(l_K, AXIS, tiled=True)
        loss = tree_sum(jnp.where(micro_active_M, l_NK[micro_idx_M], 0.0)) / n_valid
        g_norm = jnp.sqrt(canonical_sumsq(g_S, norm_plan, N))
        g_S = clip_by_norm(g_S, g_norm, spec.optim.clip_norm)
        mask_S = decay_mask_shard(flat, S)
        state = opt_state_from(count, mu_S, nu_S)
        tx = make_optimizer(spec.optim, lr)
        upd_S, new_state = tx.update(g_S, state, params_S * mask_S)
        new_params_S = optax.apply_updates(params_S, upd_S)
        adam = new_state[0]
        new_flat = jnp.stack([new_params_S, adam.mu, adam.nu])
        # layout-independent checksum of the new parameters (global positions < P only)
        pos = (jax.lax.axis_index(AXIS) * S + jnp.arange(S, dtype=jnp.int32))
        ck = jax.lax.psum(checksum(as_bits(new_params_S), pos.astype(jnp.uint32), pos < P), AXIS)
        metrics = {"loss": loss, "grad_norm": g_norm, "param_checksum": ck}
        if spec.snapshot is None:
            return new_flat, adam.count, metrics
        i = jax.lax.axis_index(AXIS)
        metrics["input_ok"] = jax.lax.all_gather(jnp.all(shard_checksum(flat_3xS) == ref_Nx2[i])[None], AXIS,
                                                 tiled=True)
        replica = jax.lax.ppermute(new_flat, AXIS, [(j, (j + 1) % N) for j in range(N)]) if N > 1 else new_flat
        new_ref = jax.lax.all_gather(shard_checksum(new_flat)[None, :], AXIS, tiled=True)
        return new_flat, adam.count, metrics, replica, new_ref

    rep = PartitionSpec()
    sharded = PartitionSpec(AXIS)
    s_state = state_sharding(mesh)
    s_rep = NamedSharding(mesh, rep)
    s_batch = NamedSharding(mesh, sharded)
    in_specs = (PartitionSpec(None, AXIS), rep, sharded, sharded, sharded, rep, rep, rep, rep, rep)
    in_sh = (s_state, s_rep, s_batch, s_batch, s_batch, s_rep, s_rep, s_rep, s_rep, s_rep)
    out_specs = (PartitionSpec(None, AXIS), rep, rep)
    out_sh = (s_state, s_rep, s_rep)
    if spec.snapshot is not None:
        s_replica = s_state if spec.snapshot == "device" else s_state.with_memory_kind(spec.snapshot)
        in_specs, in_sh = in_specs + (rep,), in_sh + (s_rep,)
        out_specs, out_sh = out_specs + (PartitionSpec(None, AXIS), rep), out_sh + (s_replica, s_rep)
    fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh,
                   donate_argnums=(0,) if spec.snapshot is None else ())


def abstract_step_args(spec: StepSpec, mesh: Mesh) -> tuple:
    N, K, M, b, T = spec.num_devices, spec.slots, spec.num_micro, spec.micro_size, spec.seq_len
    s_state, s_rep = state_sharding(mesh), NamedSharding(mesh, PartitionSpec())
    s_batch = NamedSharding(mesh, PartitionSpec(AXIS))
    sd = jax.ShapeDtypeStruct
    return (sd((3, N * spec.shard), jnp.float32, sharding=s_state),
            sd((), jnp.int32, sharding=s_rep),
            sd((N, K, b, T + 1), jnp.int32, sharding=s_batch),
            sd((N, K, b), jnp.int32, sharding=s_batch),
            sd((N, K), jnp.int32, sharding=s_batch),
            sd((), jnp.int32, sharding=s_rep),
            sd((M,), jnp.int32, sharding=s_rep),
            sd((M,), jnp.bool_, sharding=s_rep),
            sd((), jnp.float32, sharding=s_rep),
            sd((), jnp.float32, sharding=s_rep)) + (
            (sd((N, 2), jnp.uint32, sharding=s_rep),) if spec.snapshot is not None else ())


# ----------------------------------------------------------------------------- state conversion
def make_to_tree(flat: FlatSpec, mesh: Mesh):
    """Jitted [3, N*S] flat state -> (params, mu, nu) trees, replicated on `mesh`.

    The flat shards are all-gathered explicitly (the same traffic as one step's parameter
    gather); callers `device_put` the trees onto their logical shardings, a local slice per device
    (asking XLA for sharded outputs directly makes it reshape sharded slices, which it can only do
    by rematerializing them)."""
    P = flat.num_params
    rep = NamedSharding(mesh, PartitionSpec())
    gather = jax.shard_map(lambda x: jax.lax.all_gather(x, AXIS, axis=1, tiled=True), mesh=mesh,
                           in_specs=PartitionSpec(None, AXIS), out_specs=PartitionSpec(), check_vma=False)

    def f(flat_3xNS):
        full = gather(flat_3xNS)
        return tuple(flat.unflatten(full[r, :P]) for r in range(3))

    return jax.jit(f, in_shardings=(state_sharding(mesh),), out_shardings=(rep, rep, rep))


def make_from_tree(flat: FlatSpec, mesh: Mesh, n: int):
    """Jitted (params, mu, nu) trees (any sharding on `mesh`) -> [3, N*S] flat state on `mesh`.

    Leaves are gathered to replicated first, so the flat shards are local slices."""
    P = flat.num_params
    S = ceil_div(P, n)
    rep = NamedSharding(mesh, PartitionSpec())

    def f(params, mu, nu):
        rows = []
        for t in (params, mu, nu):
            t = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rep), t)
            rows.append(jnp.pad(flat.flatten(t), (0, n * S - P)))
        return jnp.stack(rows)

    return jax.jit(f, out_shardings=state_sharding(mesh))
