"""The pipelined training step: units dispatched per device in schedule order, then the canonical
reduction.

A step is three parts:

1. `gather` (one SPMD program over the flat mesh): all-gather the train state's parameter shards
   and give every device the parameters of the units it runs: [Lh, Lsz] layer rows (the layers of
   its stages, in order) and the embedding and head vectors (exact gathers).
2. The schedule, driven from the host: for each round of `ScheduleTables`, each device's op is a
   short series of unit executables (`units.UnitPrograms`) dispatched to that device: a forward
   runs the embedding (first stage) and its layers, keeping each layer's input; a backward runs
   (on the last stage, the forward of its layers and) the head's VJP, then each layer's VJP in
   reverse, then (first stage) the embedding's; an output goes to the device of the next op with
   `jax.device_put`. Dispatch is asynchronous, so devices run concurrently and wait only for their
   inputs: the rounds fix the order of each device's ops, not a lockstep.
3. `update` (one SPMD program over the flat mesh): every (micro-batch, stage) gradient as a stage
   pack [G, S_max] per device is scattered to its global flat positions and exchanged with one
   all-to-all, so device k holds its shard of every one; it takes, for each element, the row of
   each micro-batch at the element's stage, and from there on it is the canonical step: a fixed
   binary tree over the M micro-batches, the fixed-chunk gradient norm, clipping and AdamW on the
   flat shards, the layout-independent parameter checksum. The elementwise tail runs on shards
   zero-padded to a multiple of `LANES` elements: XLA vectorizes an elementwise loop and finishes
   the last (length mod vector width) elements in a scalar epilogue that may contract a
   multiply-add differently, so an element's bits would depend on where the shard ends (measured
   on CPU: Adam moments of the last 8 elements of a 10312-element shard).

Units are the same executables on every device, so a micro-batch's gradient is the same bits
whichever device, stage, partition or schedule computed it, and part 3 fixes every reduction
order: losses and parameters are bitwise those of the one-device run (tests/test_pipeline.py).
They are not bitwise those of `canonical.make_step`, which differentiates the whole model in one
program; the two differ by float32 rounding (`units` says why).

Mesh: the elastic layout's one flat axis (`canonical.layout_mesh`). The stage and data axes are
logical (in the work plan and the tables): after a failure the survivors no longer form a
dp x pp rectangle, and the same code runs on them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import SingleDeviceSharding

from jaxsys.models.config import ModelConfig
from jaxsys.train.config import OptimConfig
from jaxsys.train.elastic import canonical
from jaxsys.train.elastic.layout import ceil_div
from jaxsys.train.optim import clip_by_norm, make_optimizer, opt_state_from
from jaxsys.train.pipeline.partition import StageMap, StagePartition
from jaxsys.train.pipeline.schedule import FWD, ScheduleTables
from jaxsys.train.pipeline.units import UnitPrograms


@dataclasses.dataclass(frozen=True)
class ReduceSpec:
    """What the gather and update programs depend on (hashable: the executable cache key)."""

    model: ModelConfig
    partition: StagePartition
    optim: OptimConfig
    num_devices: int
    num_micro: int
    grad_slots: int
    held_layers: int
    chunk: int
    donate: bool = True
    """The update consumes its input state; False keeps it (the per-step snapshot's primary copy)."""


def held_layer_table(tables: ScheduleTables, partition: StagePartition) -> np.ndarray:
    """[N, Lh] the layers whose parameters each device holds, in order (-1 pads)."""
    rows = []
    for d in range(tables.num_devices):
        layers: list[int] = []
        for s in tables.param_stages[d]:
            if s >= 0:
                a, b = partition.layer_range(int(s))
                layers += range(a, b)
        rows.append(layers)
    Lh = max(1, max(len(r) for r in rows))
    out = np.full((tables.num_devices, Lh), -1, np.int32)
    for d, r in enumerate(rows):
        out[d, :len(r)] = r
    return out


def make_gather(spec: ReduceSpec, mesh):
    """flat_3xNS, held_NxLh -> (layers_NxLhxLsz, embed_NxE, head_NxH): each device's unit parameters."""
    smap = StageMap.make(spec.model, spec.partition)
    P, N = smap.flat.num_params, spec.num_devices
    axis = canonical.layout_axis()
    layer_pos = jnp.asarray(smap.layer_positions.astype(np.int32))
    embed_pos = jnp.asarray(smap.embed_positions.astype(np.int32))
    head_pos = jnp.asarray(smap.head_positions.astype(np.int32))

    def body(flat_3xS, held_1xLh):
        full = jax.lax.all_gather(flat_3xS[0], axis, tiled=True)[:P]
        rows = full[layer_pos[jnp.maximum(held_1xLh[0], 0)]]
        return rows[None], full[embed_pos][None], full[head_pos][None]

    dev = canonical.layout_spec(mesh, canonical.TABLE_AXES)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(canonical.layout_spec(mesh, canonical.STATE_AXES), dev),
                       out_specs=(dev, dev, dev), check_vma=False)
    s_dev = canonical.layout_sharding(mesh, canonical.TABLE_AXES)
    return jax.jit(fn, in_shardings=(canonical.state_sharding(mesh), s_dev), out_shardings=(s_dev, s_dev, s_dev))


LANES = 1024
"""Shard length multiple of the elementwise update (see the module docstring, part 3)."""


def make_update(spec: ReduceSpec, mesh):
    """The canonical reduction and AdamW:

        update(flat_3xNS, grads_NxGxSmax, losses_NxG, grad_stage_NxG, grad_row_Mxpp, count, n_valid, lr)
            -> (flat_3xNS, count, metrics)

    metrics (replicated): loss, grad_norm, param_checksum [2] (uint32, layout-independent)."""
    smap = StageMap.make(spec.model, spec.partition)
    pp, N, M, G = smap.num_stages, spec.num_devices, spec.num_micro, spec.grad_slots
    P = smap.flat.num_params
    S = ceil_div(P, N)
    Smax = smap.max_stage_size
    axis = canonical.layout_axis()
    norm_plan = canonical.NormPlan.make(P, N, S, spec.chunk)
    pos_dst = np.full((pp + 1, Smax), N * S, np.int32)
    for s in range(pp):
        pos = smap.positions(s)
        pos_dst[s, :len(pos)] = pos
    stage_of = np.zeros(N * S, np.int32)
    stage_of[:P] = smap.stage_of_position()
    last = pp - 1

    def body(flat_3xS, g_1xGxSmax, l_1xG, gst_1xG, grad_row_Mxpp, count, n_valid, lr):
        params_S, mu_S, nu_S = flat_3xS[0], flat_3xS[1], flat_3xS[2]
        me = jax.lax.axis_index(axis)
        gst = gst_1xG[0]
        dst = jnp.asarray(pos_dst)[jnp.where(gst >= 0, gst, pp)]
        g_GxNS = jax.vmap(lambda row, idx: jnp.zeros((N * S + 1,), jnp.float32).at[idx].set(row)[:N * S])(
            g_1xGxSmax[0], dst)
        g_recv = jax.lax.all_to_all(g_GxNS.reshape(G, N, S), axis, 1, 0, tiled=True).reshape(N * G, S)
        mine = jax.lax.dynamic_slice(jnp.asarray(stage_of), (me * S,), (S,))
        g_MxS = jnp.take_along_axis(g_recv, grad_row_Mxpp[:, mine], axis=0)
        Sp = ceil_div(S, LANES) * LANES
        pad = lambda v: jnp.pad(v, (0, Sp - S))  # noqa: E731
        g_S = pad(canonical.tree_sum(g_MxS)) / n_valid
        l_all = jax.lax.all_gather(l_1xG[0], axis, tiled=True)
        loss = canonical.tree_sum(l_all[grad_row_Mxpp[:, last]]) / n_valid
        g_norm = jnp.sqrt(canonical.canonical_sumsq(g_S[:S], norm_plan, N))
        g_S = clip_by_norm(g_S, g_norm, spec.optim.clip_norm)
        mask_S = pad(canonical.decay_mask_shard(smap.flat, S))
        params_S, mu_S, nu_S = pad(params_S), pad(mu_S), pad(nu_S)
        state = opt_state_from(count, mu_S, nu_S)
        upd_S, new_state = make_optimizer(spec.optim, lr).update(g_S, state, params_S * mask_S)
        new_params_S = optax.apply_updates(params_S, upd_S)[:S]
        adam = new_state[0]
        pos = me * S + jnp.arange(S, dtype=jnp.int32)
        ck = jax.lax.psum(canonical.checksum(canonical.as_bits(new_params_S), pos.astype(jnp.uint32), pos < P), axis)
        return (jnp.stack([new_params_S, adam.mu[:S], adam.nu[:S]]), adam.count,
                {"loss": loss, "grad_norm": g_norm, "param_checksum": ck})

    st = canonical.layout_spec(mesh, canonical.STATE_AXES)
    dev = canonical.layout_spec(mesh, canonical.TABLE_AXES)
    rep = canonical.layout_spec(mesh, canonical.REPLICATED)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(st, dev, dev, dev, rep, rep, rep, rep),
                       out_specs=(st, rep, rep), check_vma=False)
    s_st = canonical.state_sharding(mesh)
    s_dev = canonical.layout_sharding(mesh, canonical.TABLE_AXES)
    s_rep = canonical.layout_sharding(mesh, canonical.REPLICATED)
    return jax.jit(fn, in_shardings=(s_st, s_dev, s_dev, s_dev, s_rep, s_rep, s_rep, s_rep),
                   out_shardings=(s_st, s_rep, s_rep), donate_argnums=(0,) if spec.donate else ())


def abstract_gather_args(spec: ReduceSpec, mesh):
    P = StageMap.make(spec.model, spec.partition).flat.num_params
    N = spec.num_devices
    return (jax.ShapeDtypeStruct((3, N * ceil_div(P, N)), jnp.float32, sharding=canonical.state_sharding(mesh)),
            jax.ShapeDtypeStruct((N, spec.held_layers), jnp.int32,
                                 sharding=canonical.layout_sharding(mesh, canonical.TABLE_AXES)))


def abstract_update_args(spec: ReduceSpec, mesh):
    smap = StageMap.make(spec.model, spec.partition)
    N, G, M, pp = spec.num_devices, spec.grad_slots, spec.num_micro, smap.num_stages
    P = smap.flat.num_params
    s_dev = canonical.layout_sharding(mesh, canonical.TABLE_AXES)
    s_rep = canonical.layout_sharding(mesh, canonical.REPLICATED)
    sd = jax.ShapeDtypeStruct
    return (sd((3, N * ceil_div(P, N)), jnp.float32, sharding=canonical.state_sharding(mesh)),
            sd((N, G, smap.max_stage_size), jnp.float32, sharding=s_dev), sd((N, G), jnp.float32, sharding=s_dev),
            sd((N, G), jnp.int32, sharding=s_dev), sd((M, pp), jnp.int32, sharding=s_rep),
            sd((), jnp.int32, sharding=s_rep), sd((), jnp.float32, sharding=s_rep),
            sd((), jnp.float32, sharding=s_rep))


# ----------------------------------------------------------------------------- the host schedule
def _shards(arr: jax.Array, devices: Sequence[jax.Device]) -> list[jax.Array]:
    by_dev = {s.device.id: s.data for s in arr.addressable_shards}
    return [by_dev[d.id] for d in devices]


def run_schedule(units: UnitPrograms, tables: ScheduleTables, partition: StagePartition,
                 devices: Sequence[jax.Device], held_NxLh: np.ndarray, layers_NxLhxLsz: jax.Array,
                 embed_NxE: jax.Array, head_NxH: jax.Array, tokens_MxbxT1: np.ndarray, example_ids_Mxb: np.ndarray,
                 step: int) -> tuple[list[list[list[jax.Array]]], list[list[jax.Array]], dict[str, int]]:
    """Dispatch every op of the schedule. Returns, per device and gradient slot, the slot's pieces
    (stage pack order) and the slot's loss (a scalar; zero off the last stage), and counters."""
    N, pp = len(devices), partition.num_stages
    last = pp - 1
    layer_rows = _shards(layers_NxLhxLsz, devices)
    embed_v = [x[0] for x in _shards(embed_NxE, devices)]
    head_v = [x[0] for x in _shards(head_NxH, devices)]
    row_of = [{int(l): j for j, l in enumerate(held_NxLh[d]) if l >= 0} for d in range(N)]
    layer_param: dict[tuple[int, int], jax.Array] = {}

    def params_of(d: int, l: int) -> jax.Array:
        key = (d, l)
        if key not in layer_param:
            j = row_of[d][l]
            layer_param[key] = layer_rows[d][0, j:j + 1]
        return layer_param[key]

    cache_tok: dict[tuple[int, int], Any] = {}

    def tokens(d: int, m: int):
        key = (d, m)
        if key not in cache_tok:
            dev = devices[d]
            tok = jax.device_put(tokens_MxbxT1[m], dev)
            keys = units.get("keys", dev)(jax.device_put(np.int32(step), dev), jax.device_put(example_ids_Mxb[m], dev))
            cache_tok[key] = (tok, keys)
        return cache_tok[key]

    inbox: dict[tuple[int, int, str], jax.Array] = {}
    kept: dict[tuple[int, int], list[jax.Array]] = {}
    G = tables.num_grad_slots
    pieces: list[list[list[jax.Array]]] = [[[] for _ in range(G)] for _ in range(N)]
    losses: list[list[jax.Array | None]] = [[None] * G for _ in range(N)]
    sends = 0

    def layers_forward(d: int, m: int, s: int, x):
        dev = devices[d]
        tok, keys = tokens(d, m)
        a, b = partition.layer_range(s)
        saved = []
        for l in range(a, b):
            saved.append(x)
            x = units.get("layer_forward", dev)(params_of(d, l), x, jax.device_put(np.int32(l), dev), keys)
        kept[(m, s)] = saved
        return x

    def stage_input(d: int, m: int, s: int):
        if s == 0:
            tok, _ = tokens(d, m)
            return units.get("embed_forward", devices[d])(embed_v[d], tok)
        return inbox.pop((m, s, "x"))

    def send(x, m: int, s: int, kind: str) -> None:
        nonlocal sends
        dst = tables.plan.device_of[m][s]
        if x.devices() != {devices[dst]}:
            x = jax.device_put(x, SingleDeviceSharding(devices[dst]))
            sends += 1
        inbox[(m, s, kind)] = x

    for r in range(tables.num_rounds):
        for d in range(N):
            op = int(tables.op[d, r])
            if op == 0:
                continue
            m, s, dev = int(tables.micro[d, r]), int(tables.stage[d, r]), devices[d]
            if op == FWD:
                y = layers_forward(d, m, s, stage_input(d, m, s))
                send(y, m, s + 1, "x")
                continue
            tok, keys = tokens(d, m)
            gslot = int(tables.grad_slot[d, r])
            if s == last:
                y = layers_forward(d, m, s, stage_input(d, m, s))
                loss, g_head, ct = units.get("head_backward", dev)(head_v[d], y, tok)
            else:
                ct = inbox.pop((m, s, "ct"))
                loss, g_head = None, None
            a, b = partition.layer_range(s)
            saved = kept.pop((m, s))
            g_layers = []
            for l in reversed(range(a, b)):
                g, ct = units.get("layer_backward", dev)(params_of(d, l), saved[l - a], ct,
                                                         jax.device_put(np.int32(l), dev), keys)
                g_layers.append(g[0])
            out = []
            if s == 0:
                out.append(units.get("embed_backward", dev)(tok, ct))
            else:
                send(ct, m, s - 1, "ct")
            out += reversed(g_layers)
            if g_head is not None:
                out.append(g_head)
            pieces[d][gslot] = out
            losses[d][gslot] = loss
    return pieces, losses, {"sends": sends}


def _pack_program(shapes: tuple[tuple[int, ...], ...], Smax: int, dev: jax.Device):
    """slot pieces -> [1, G, Smax] (each slot's pieces concatenated and zero-padded)."""
    def pack(*flat_pieces):
        rows, i = [], 0
        for n in shapes:
            parts = list(flat_pieces[i:i + n])
            i += n
            row = jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)
            rows.append(jnp.pad(row, (0, Smax - row.shape[0])))
        return jnp.stack(rows)[None]

    return jax.jit(pack, out_shardings=SingleDeviceSharding(dev))


def pack_gradients(pieces, losses, devices: Sequence[jax.Device], Smax: int, mesh, cache: dict):
    """Per-device slot pieces -> ([N, G, Smax] gradients, [N, G] losses) sharded on the flat mesh."""
    N, G = len(devices), len(pieces[0])
    g_rows, l_rows = [], []
    for d, dev in enumerate(devices):
        counts = tuple(len(p) for p in pieces[d])
        sizes = tuple(tuple(int(x.shape[0]) for x in p) for p in pieces[d])
        key = (sizes, Smax, dev.id)
        if key not in cache:
            cache[key] = _pack_program(counts, Smax, dev)
        g_rows.append(cache[key](*[x for p in pieces[d] for x in p]))
        zero = jax.device_put(np.float32(0), dev)
        l_rows.append(jnp.stack([zero if x is None else x for x in losses[d]])[None])
    s_dev = canonical.layout_sharding(mesh, canonical.TABLE_AXES)
    g = jax.make_array_from_single_device_arrays((N, G, Smax), s_dev, g_rows)
    l = jax.make_array_from_single_device_arrays((N, G), s_dev, l_rows)
    return g, l
