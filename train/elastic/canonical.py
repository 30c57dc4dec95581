"""The layout-invariant ("canonical") training step: the same bits on 8, 7, 6 or 1 devices.

Why XLA's usual data-parallel step is not enough: a `sum` over a batch dimension sharded on N
devices is computed as N local sums and an all-reduce, so the floating-point summation order, and
with it the last bits of every gradient, changes with N. After a device is lost the run drifts
from the run that would have happened. This step fixes the order of every reduction:

1. The global batch is M fixed micro-batches (consecutive global example indices). Each device
   computes the gradients of whole micro-batches, one at a time (`lax.scan` over its K slots),
   with the full parameters (all-gathered from the fsdp shards; gathering is exact). Every
   micro-batch is the same shapes on the same compiled body whichever device runs it, so its
   gradient has the same bits. Mesh axes: the elastic mode puts every device on one mesh axis
   (the one the rules table of `jaxsys.sharding` gives the logical `FLAT` axis; data and fsdp
   roles merged); `tensor` and `expert` must be 1, because splitting a contraction over devices
   changes its summation order with the device count.
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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsys.models.config import ModelConfig
from jaxsys.shapes import pow2_bucket
from jaxsys.sharding import axes as ax
from jaxsys.sharding import logical_sharding, logical_to_spec, make_mesh, mesh_axes_of
from jaxsys.train import objective
from jaxsys.train.config import OptimConfig
from jaxsys.train.elastic.layout import FlatSpec, ceil_div
from jaxsys.train.optim import clip_by_norm, make_optimizer, opt_state_from

_GOLDEN = np.uint32(0x9E3779B1)
_MIX = np.uint32(0x85EBCA77)


# ----------------------------------------------------------------------------- layout vocabulary
STATE_AXES = (None, ax.FLAT)
"""Logical axes of the [3, N*S] flat state: rows (params, Adam mu, Adam nu) x the flat vector."""
TABLE_AXES = (ax.BATCH,)
"""Logical axes of the per-device micro-batch tables [N, ...] (row i is device i's work)."""
REPLICATED = ()


def layout_axis() -> str:
    """The one mesh axis of the elastic layout: where the rules table puts `FLAT`. Collectives in
    the step's `shard_map` run over it."""
    (axis,) = mesh_axes_of(ax.FLAT)
    return axis


def layout_mesh(devices) -> Mesh:
    """The elastic mesh: every device on `layout_axis()` (the other mesh axes have size 1)."""
    return make_mesh({layout_axis(): len(devices)}, devices=list(devices))


def layout_spec(mesh: Mesh, logical: tuple) -> PartitionSpec:
    """The PartitionSpec of a layout array with these logical axes (for `shard_map`)."""
    return logical_to_spec(logical, None, mesh)


def layout_sharding(mesh: Mesh, logical: tuple) -> NamedSharding:
    return logical_sharding(logical, None, mesh)


def state_sharding(mesh: Mesh) -> NamedSharding:
    return layout_sharding(mesh, STATE_AXES)


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


def canonical_sumsq(x_S: jax.Array, plan: NormPlan, n: int) -> jax.Array:
    """Sum of squares of a flat vector sharded over the layout axis (inside shard_map), in a fixed
    order."""
    axis = layout_axis()
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


def decay_mask_shard(flat: FlatSpec, shard: int) -> jax.Array:
    """[S] float32 1.0 where the element at this device's slice gets weight decay."""
    pos = jax.lax.axis_index(layout_axis()) * shard + jnp.arange(shard, dtype=jnp.int32)
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
    remat: Any = None
    """The memory plan's `jaxsys.train.memory.Remat` for the micro-batch loss (None: every
    activation kept; see `jaxsys.train.memory.training.ElasticMemory`)."""
    replica_shift: int = 1
    """Snapshot mode: the replica of shard k goes to device k + replica_shift (mod N). A
    multi-process job sets it to the devices per process, so a replica never lives in the process
    that holds its primary (`FlatLayout.replica_shift`)."""

    @property
    def num_params(self) -> int:
        return self.flat.num_params

    @property
    def shard(self) -> int:
        return ceil_div(self.num_params, self.num_devices)


class StepInputs(NamedTuple):
    """What the step reads besides the state. N devices, K slots each, micro-batches of b
    sequences of T tokens, M micro-batches; `STEP_INPUT_AXES` names each field's logical axes."""

    count: Any
    """[] int32: optimizer updates applied so far."""
    tokens_NxKxbxT1: Any
    """[N, K, b, T+1] int32: the micro-batch of each slot (zeros in an idle slot)."""
    example_ids_NxKxb: Any
    """[N, K, b] int32: global example index of every sequence (the dropout keys)."""
    slot_micro_NxK: Any
    """[N, K] int32: the micro-batch of each slot, -1 for an idle slot (uneven splits)."""
    step: Any
    """[] int32."""
    micro_slot_M: Any
    """[M] int32: the flat slot (i*K + k) holding each micro-batch."""
    micro_active_M: Any
    """[M] bool: whether each micro-batch is computed at all (False only under policy torchft)."""
    n_valid: Any
    """[] float32: target tokens of the global batch (the loss and gradient scale)."""
    lr: Any
    """[] float32."""
    ref_Nx2: Any = None
    """[N, 2] uint32 reference checksums of the input shards (snapshot mode only)."""


STEP_INPUT_AXES = StepInputs(
    count=REPLICATED, tokens_NxKxbxT1=TABLE_AXES, example_ids_NxKxb=TABLE_AXES,
    slot_micro_NxK=TABLE_AXES, step=REPLICATED, micro_slot_M=REPLICATED, micro_active_M=REPLICATED,
    n_valid=REPLICATED, lr=REPLICATED, ref_Nx2=REPLICATED)


class StepOutputs(NamedTuple):
    flat_3xNS: Any
    """The updated state (STATE_AXES)."""
    count: Any
    metrics: Any
    """Replicated: loss, grad_norm, param_checksum [2] uint32 (layout-independent); in snapshot
    mode also input_ok [N] (each input shard matched its checksum)."""
    replica_3xNS: Any = None
    """Snapshot mode: shard k of the new state on device k+1 (in the replica memory kind)."""
    ref_Nx2: Any = None
    """Snapshot mode: reference checksums of the new state's shards."""


def _fields(template: NamedTuple, f, *, present: NamedTuple) -> NamedTuple:
    """`template` with each field mapped by `f`, None where `present` has None."""
    return type(template)(*(None if p is None else f(t) for t, p in zip(template, present)))


def step_input_shardings(mesh: Mesh, *, snapshot: bool) -> StepInputs:
    present = STEP_INPUT_AXES if snapshot else STEP_INPUT_AXES._replace(ref_Nx2=None)
    return _fields(STEP_INPUT_AXES, lambda a: layout_sharding(mesh, a), present=present)


def make_step(spec: StepSpec, mesh: Mesh):
    """The jitted step for `mesh`: step(flat_3xNS, inputs: StepInputs) -> StepOutputs.

    Idle slots are skipped (`lax.cond`) and their gradients never enter the reduction. With
    `spec.snapshot`, the step checks its input against `inputs.ref_Nx2` and returns the next
    snapshot in the same program (no extra launches); without, it donates the state.
    """
    N, K = spec.num_devices, spec.slots
    P, S = spec.num_params, spec.shard
    flat = spec.flat
    axis = layout_axis()
    norm_plan = NormPlan.make(P, N, S, spec.chunk)

    def loss(p, tok, keys):
        return objective.lm_loss_sum(p, tok, keys, cfg=spec.model, dropout=spec.dropout)

    loss_fn = jax.value_and_grad(loss if spec.remat is None else spec.remat(loss))

    def body(flat_3xS, inp: StepInputs) -> StepOutputs:
        params_S, mu_S, nu_S = flat_3xS[0], flat_3xS[1], flat_3xS[2]
        full_P = jax.lax.all_gather(params_S, axis, tiled=True)[:P]
        ptree = flat.unflatten(full_P)
        root = jax.random.key(spec.seed)

        def compute(tok_bxT1, ex_b):
            keys_b = objective.example_keys(root, inp.step, ex_b)
            l, g = loss_fn(ptree, tok_bxT1, keys_b)
            return l, jnp.pad(flat.flatten(g), (0, N * S - P))

        def idle(tok_bxT1, ex_b):
            return jnp.zeros((), jnp.float32), jnp.zeros((N * S,), jnp.float32)

        def one(carry, xs):
            tok_bxT1, ex_b, m = xs
            return carry, jax.lax.cond(m >= 0, compute, idle, tok_bxT1, ex_b)

        _, (l_K, g_KxNS) = jax.lax.scan(
            one, None, (inp.tokens_NxKxbxT1[0], inp.example_ids_NxKxb[0], inp.slot_micro_NxK[0]))
        # device k gets every slot's gradient for its slice: [N*K (source-major), 1, S]
        g_recv = jax.lax.all_to_all(g_KxNS.reshape(K, N, S), axis, 1, 0, tiled=True).reshape(N * K, S)
        g_MxS = jnp.where(inp.micro_active_M[:, None], g_recv[inp.micro_slot_M], 0.0)
        g_S = tree_sum(g_MxS) / inp.n_valid
        l_NK = jax.lax.all_gather(l_K, axis, tiled=True)
        loss = tree_sum(jnp.where(inp.micro_active_M, l_NK[inp.micro_slot_M], 0.0)) / inp.n_valid
        g_norm = jnp.sqrt(canonical_sumsq(g_S, norm_plan, N))
        g_S = clip_by_norm(g_S, g_norm, spec.optim.clip_norm)
        mask_S = decay_mask_shard(flat, S)
        state = opt_state_from(inp.count, mu_S, nu_S)
        tx = make_optimizer(spec.optim, inp.lr)
        upd_S, new_state = tx.update(g_S, state, params_S * mask_S)
        new_params_S = optax.apply_updates(params_S, upd_S)
        adam = new_state[0]
        new_flat = jnp.stack([new_params_S, adam.mu, adam.nu])
        # layout-independent checksum of the new parameters (global positions < P only)
        pos = (jax.lax.axis_index(axis) * S + jnp.arange(S, dtype=jnp.int32))
        ck = jax.lax.psum(checksum(as_bits(new_params_S), pos.astype(jnp.uint32), pos < P), axis)
        metrics = {"loss": loss, "grad_norm": g_norm, "param_checksum": ck}
        if spec.snapshot is None:
            return StepOutputs(new_flat, adam.count, metrics)
        i = jax.lax.axis_index(axis)
        metrics["input_ok"] = jax.lax.all_gather(jnp.all(shard_checksum(flat_3xS) == inp.ref_Nx2[i])[None], axis,
                                                 tiled=True)
        shift = spec.replica_shift % N
        replica = jax.lax.ppermute(new_flat, axis, [(j, (j + shift) % N) for j in range(N)]) if shift else new_flat
        new_ref = jax.lax.all_gather(shard_checksum(new_flat)[None, :], axis, tiled=True)
        return StepOutputs(new_flat, adam.count, metrics, replica, new_ref)

    snap = spec.snapshot is not None
    present_in = STEP_INPUT_AXES if snap else STEP_INPUT_AXES._replace(ref_Nx2=None)
    out_axes = StepOutputs(STATE_AXES, REPLICATED, REPLICATED, STATE_AXES if snap else None,
                           REPLICATED if snap else None)
    in_specs = (layout_spec(mesh, STATE_AXES),
                _fields(STEP_INPUT_AXES, lambda a: layout_spec(mesh, a), present=present_in))
    out_specs = _fields(out_axes, lambda a: layout_spec(mesh, a), present=out_axes)
    in_sh = (state_sharding(mesh), step_input_shardings(mesh, snapshot=snap))
    out_sh = _fields(out_axes, lambda a: layout_sharding(mesh, a), present=out_axes)
    if snap and spec.snapshot != "device":
        out_sh = out_sh._replace(replica_3xNS=out_sh.replica_3xNS.with_memory_kind(spec.snapshot))
    fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=() if snap else (0,))


def abstract_step_args(spec: StepSpec, mesh: Mesh) -> tuple[jax.ShapeDtypeStruct, StepInputs]:
    """(state, inputs) as ShapeDtypeStructs with their shardings, for `.lower`."""
    N, K, M, b, T = spec.num_devices, spec.slots, spec.num_micro, spec.micro_size, spec.seq_len
    snap = spec.snapshot is not None
    shapes = StepInputs(
        count=((), jnp.int32), tokens_NxKxbxT1=((N, K, b, T + 1), jnp.int32),
        example_ids_NxKxb=((N, K, b), jnp.int32), slot_micro_NxK=((N, K), jnp.int32),
        step=((), jnp.int32), micro_slot_M=((M,), jnp.int32), micro_active_M=((M,), jnp.bool_),
        n_valid=((), jnp.float32), lr=((), jnp.float32), ref_Nx2=((N, 2), jnp.uint32) if snap else None)
    shardings = step_input_shardings(mesh, snapshot=snap)
    inputs = StepInputs(*(None if sd is None else jax.ShapeDtypeStruct(*sd, sharding=sh)
                          for sd, sh in zip(shapes, shardings)))
    state = jax.ShapeDtypeStruct((3, N * spec.shard), jnp.float32, sharding=state_sharding(mesh))
    return state, inputs


# ----------------------------------------------------------------------------- state conversion
def make_to_tree(flat: FlatSpec, mesh: Mesh):
    """Jitted [3, N*S] flat state -> (params, mu, nu) trees, replicated on `mesh`.

    The flat shards are all-gathered explicitly (the same traffic as one step's parameter
    gather); callers `device_put` the trees onto their logical shardings, a local slice per device
    (asking XLA for sharded outputs directly makes it reshape sharded slices, which it can only do
    by rematerializing them)."""
    P = flat.num_params
    rep = layout_sharding(mesh, REPLICATED)
    gather = jax.shard_map(lambda x: jax.lax.all_gather(x, layout_axis(), axis=1, tiled=True), mesh=mesh,
                           in_specs=layout_spec(mesh, STATE_AXES), out_specs=layout_spec(mesh, REPLICATED),
                           check_vma=False)

    def f(flat_3xNS):
        full = gather(flat_3xNS)
        return tuple(flat.unflatten(full[r, :P]) for r in range(3))

    return jax.jit(f, in_shardings=(state_sharding(mesh),), out_shardings=(rep, rep, rep))


def make_from_tree(flat: FlatSpec, mesh: Mesh, n: int):
    """Jitted (params, mu, nu) trees (any sharding on `mesh`) -> [3, N*S] flat state on `mesh`.

    Leaves are gathered to replicated first, so the flat shards are local slices."""
    P = flat.num_params
    S = ceil_div(P, n)
    rep = layout_sharding(mesh, REPLICATED)

    def f(params, mu, nu):
        rows = []
        for t in (params, mu, nu):
            t = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rep), t)
            rows.append(jnp.pad(flat.flatten(t), (0, n * S - P)))
        return jnp.stack(rows)

    return jax.jit(f, out_shardings=state_sharding(mesh))
