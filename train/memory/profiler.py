"""The profiler: what each named residual of a training step costs to keep, recompute or offload.

    step(remat, *args)                  # the step calls remat(loss_fn) around what it differentiates
    prof = Profiler().profile(step, *args)
    prof.residuals                      # name, per-layer shape, bytes, lifetime, recompute, swap
    prof.peak_bytes(decisions)          # the modelled step peak under a keep/recompute/offload choice

One profile comes from one trace of the step under the *probe* policy (every name saved), read
three ways:

* the program's liveness (`jaxsys.train.memory.liveness`): the live bytes at every program point,
  split into the stacked named residuals (live from the forward layer scan to the backward one)
  and the rest. A plan's peak is the same timeline with the residuals it does not keep taken out,
  plus what recomputing or staging them adds inside the layer scans.
* the primal layer body (the scan body of the loss, recorded while tracing): per name its shape,
  and which equations the backward pass re-runs for any set of saved names (`_Body.recompute`,
  from which primal values each primitive's derivative reads).
* times: the body's forward and backward pass are compiled and timed on one device; the ratio of
  measured time to the hardware roofline is this program's throughput, so every recompute cone
  costs its FLOPs and bytes at that measured rate. With `measure_steps`, two whole steps are
  timed as well (every name kept, every name recomputed): the probe's step time is then measured,
  and their difference, less the modelled recomputation, is what keeping the residuals costs per
  byte (writing them to the stacked buffers and reading them back; on CPU this can exceed the
  recomputation it saves).

Fingerprints make profiling cheap online. A step called again with the same argument shapes is a
dictionary hit (no trace). A new program whose layer body was seen before reuses that body's
analysis and measurement; one whose body has the same structure at other shapes (a new
sequence-length bucket) reuses the calibration measured at the nearest size (throughput, step-time
correction, keep cost) and re-derives bytes and FLOPs from the new
trace; only a new structure is measured. `ProfileCost` records which happened and what it cost.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jaxsys.models.residuals import layer_kind
from jaxsys.train.memory import liveness
from jaxsys.train.memory.costs import Hardware, eqn_flops, jaxpr_flops, total_flops
from jaxsys.train.memory.remat import NAME_PRIMITIVE, Remat, apply_policy, body_names

KEEP, RECOMPUTE, OFFLOAD = "keep", "recompute", "offload"
DECISIONS = (KEEP, RECOMPUTE, OFFLOAD)
PHASE_OTHER, PHASE_FORWARD, PHASE_BACKWARD = 0, 1, 2
PROBE_POLICY = jax.checkpoint_policies.save_any_names_but_these()  # every named value saved

_INLINE = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                     "custom_vjp_call_jaxpr", "remat2", "checkpoint"})
_RESIDUAL_ALIAS = frozenset({"reduce_precision", "device_put", "copy", "copy_p", "convert_element_type"})

# Which primal values the derivative of a primitive reads (the rest are linear in their inputs).
_NEEDS_OPERANDS = frozenset({"dot_general", "mul", "div", "max", "min", "pow", "atan2", "rem",
                             "sort", "clamp", "conv_general_dilated", "cumprod", "cummax", "cummin"})
_NEEDS_OUTPUT = frozenset({"exp", "exp2", "logistic", "tanh", "sqrt", "rsqrt", "cbrt", "expm1"})
_NEEDS_INPUT = frozenset({"log", "log1p", "sin", "cos", "tan", "erf", "erf_inv", "lgamma", "digamma",
                          "integer_pow", "square", "abs", "sign", "asin", "acos", "atan", "sinh",
                          "cosh", "asinh", "acosh", "atanh", "logistic_grad"})
_NEEDS_BOTH = frozenset({"reduce_max", "reduce_min", "argmax", "argmin", "reduce_prod"})
_LINEAR = frozenset({"add", "add_any", "sub", "neg", "reshape", "squeeze", "expand_dims",
                     "broadcast_in_dim", "transpose", "convert_element_type", "reduce_sum",
                     "concatenate", "slice", "pad", "name", "copy", "copy_p", "reduce_precision",
                     "cumsum", "dynamic_slice", "dynamic_update_slice", "gather", "scatter-add",
                     "scatter_add", "select_n", "iota", "stop_gradient", "device_put", "real",
                     "imag", "conj", "psum", "all_gather", "reduce_scatter", "optimization_barrier"})


def _float(aval) -> bool:
    dt = getattr(aval, "dtype", None)
    return dt is not None and jnp.issubdtype(dt, jnp.inexact)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


_SHAPE = re.compile(r"\[[0-9,]*\]")
_NUMBER = re.compile(r"(?<![A-Za-z_])[0-9]+(?![0-9]*[A-Za-z_])")


def structure_digest(jaxpr) -> str:
    """A fingerprint of a jaxpr that ignores every number (shapes, sizes, literals) and the line
    breaks: equal for the same layer at another sequence length or batch size."""
    text = _NUMBER.sub("#", _SHAPE.sub("[]", str(jaxpr)))
    return _digest(" ".join(text.split()))  # the printer wraps lines by their length


# --------------------------------------------------------------------------- the layer body
@dataclasses.dataclass(frozen=True)
class _Node:
    eqn: Any
    ins: tuple
    outs: tuple
    seconds: float  # roofline
    flops: float

    @property
    def prim(self) -> str:
        return self.eqn.primitive.name

    def needs(self, tangent: set) -> list:
        """The primal values (vars) the backward pass reads for this equation, given which values
        carry a tangent (depend on the differentiated inputs): a product needs an operand only for
        the other operand's cotangent; nothing is needed where no input carries a tangent."""
        prim = self.prim
        vars_in = [v for v in self.ins if isinstance(v, jcore.Var)]
        tan = [v in tangent for v in vars_in]
        if not any(tan):
            return []
        out = [v for v in vars_in if not _float(v.aval)]  # indices, masks, predicates
        if prim in _LINEAR:
            return out
        if prim in _NEEDS_OUTPUT:
            return out + list(self.outs)
        if prim in _NEEDS_INPUT:
            return out + vars_in[:1]
        if prim in _NEEDS_BOTH:
            return out + vars_in[:1] + list(self.outs)
        if prim in ("mul", "dot_general") and len(vars_in) == 2:
            a, b = vars_in
            return out + ([b] if tan[0] else []) + ([a] if tan[1] else [])
        if prim == "div" and len(vars_in) == 2:
            return out + vars_in if tan[1] else out + vars_in[1:]
        return vars_in  # anything else: every operand


class _Body:
    """The primal layer body (one scan iteration): names, per-layer shapes and recompute cones."""

    def __init__(self, closed_body, num_consts: int, hardware: Hardware):
        self.closed = closed_body
        self.fingerprint = _digest(str(closed_body))
        self.structure = structure_digest(closed_body)
        jaxpr = closed_body.jaxpr
        self.nodes: list[_Node] = []
        self.available: set = set(jaxpr.invars) | set(jaxpr.constvars)
        self.name_var: dict[str, Any] = {}
        self._flatten(jaxpr, {}, hardware)
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.outs}
        # the step differentiates the carry and the per-layer inputs, not the scan's consts
        tangent = {v for v in jaxpr.invars[num_consts:] if _float(v.aval)}
        for n in self.nodes:
            if any(isinstance(v, jcore.Var) and v in tangent for v in n.ins):
                tangent |= {o for o in n.outs if _float(o.aval)}
        self.needed = {v for n in self.nodes for v in n.needs(tangent) if isinstance(v, jcore.Var)}
        self.forward_seconds = sum(n.seconds for n in self.nodes)
        self.forward_flops = sum(n.flops for n in self.nodes)
        self._memo: dict[frozenset, tuple[float, float, frozenset]] = {}
        self._tables: dict[tuple, np.ndarray] = {}

    def _flatten(self, jaxpr, env: dict, hw: Hardware) -> None:
        def atom(v):
            return env.get(v, v) if isinstance(v, jcore.Var) else v

        for eqn in jaxpr.eqns:
            ins = tuple(atom(v) for v in eqn.invars)
            subs = list(jcore.jaxprs_in_params(eqn.params))
            if eqn.primitive.name in _INLINE and len(subs) == 1:
                inner = subs[0]
                inner_j = getattr(inner, "jaxpr", inner)
                inner_env = dict(zip(inner_j.invars, ins))
                self.available |= set(inner_j.constvars)
                self._flatten(inner_j, inner_env, hw)
                for o, io in zip(eqn.outvars, inner_j.outvars):
                    env[o] = inner_env.get(io, io) if isinstance(io, jcore.Var) else io
                continue
            if eqn.primitive.name == NAME_PRIMITIVE:
                self.name_var[eqn.params["name"]] = eqn.outvars[0]
            self.nodes.append(_Node(eqn, ins, tuple(eqn.outvars), hw.total_seconds(eqn),
                                    total_flops(eqn)))

    def recompute_table(self, names: tuple[str, ...]) -> np.ndarray:
        """[2^n] roofline seconds of one layer's recomputation for every subset of `names` saved
        (bit i of the index: names[i] saved; names not listed are not saved). One reverse sweep
        over the body with a boolean per subset: a value is required if the backward reads it or
        a recomputed equation does; its equation is recomputed if it is required and not saved."""
        if names in self._tables:
            return self._tables[names]
        m = 1 << len(names)
        masks = np.arange(m)
        saved_of = {self.name_var[nm]: (masks >> i) & 1 == 1 for i, nm in enumerate(names)
                    if nm in self.name_var}
        required: dict = {v: np.ones(m, bool) for v in self.needed}
        cost = np.zeros(m)
        for node in reversed(self.nodes):
            need = None
            for o in node.outs:
                r = required.get(o)
                if r is None or o in self.available:
                    continue
                r = r & ~saved_of[o] if o in saved_of else r
                need = r if need is None else need | r
            if need is None or not need.any():
                continue
            cost += need * node.seconds
            for v in node.ins:
                if isinstance(v, jcore.Var):
                    prev = required.get(v)
                    required[v] = need if prev is None else prev | need
        self._tables[names] = cost
        return cost

    def recompute_nodes(self, saved: frozenset[str]) -> list[_Node]:
        """The equations the backward pass of one layer re-runs when the names in `saved` are
        saved (kept or offloaded) and nothing else is."""
        return [self.nodes[i] for i in sorted(self._cone(saved)[0])]

    def recompute(self, saved: frozenset[str]) -> tuple[float, float, frozenset[str]]:
        """(roofline seconds, FLOPs, names read) of `recompute_nodes(saved)`."""
        if saved not in self._memo:
            nodes, read = self._cone(saved)
            self._memo[saved] = (sum(self.nodes[i].seconds for i in nodes),
                                 sum(self.nodes[i].flops for i in nodes), frozenset(read))
        return self._memo[saved]

    def _cone(self, saved: frozenset[str]) -> tuple[set[int], set[str]]:
        avail = self.available | {self.name_var[n] for n in saved if n in self.name_var}
        named = {v: n for n, v in self.name_var.items()}
        seen: set = set()
        nodes: set[int] = set()
        read: set[str] = set()
        stack = [v for v in self.needed]
        while stack:
            v = stack.pop()
            if v in named and v in avail:
                read.add(named[v])
            if v in seen or v in avail or not isinstance(v, jcore.Var):
                continue
            seen.add(v)
            i = self.producer.get(v)
            if i is None:
                continue
            nodes.add(i)
            stack.extend(x for x in self.nodes[i].ins if isinstance(x, jcore.Var))
        return nodes, read


# --------------------------------------------------------------------------- the profile
@dataclasses.dataclass(frozen=True)
class Residual:
    """One named residual of the step: all its layers' copies (a name covers the whole stack)."""

    name: str
    kind: str
    shape: tuple[int, ...]  # per layer
    dtype: str
    layers: int
    layer_bytes: int
    recompute_flops: float  # per step, to recompute it (alone: every other name saved)
    recompute_s: float  # the same at the measured throughput
    swap_bytes: int  # host-link traffic per step when offloaded (out in the forward, back in the backward)
    lifetime: tuple[int, int]  # first and last program point (index into the level's points) it is live

    @property
    def stacked_bytes(self) -> int:
        return self.layers * self.layer_bytes


@dataclasses.dataclass(frozen=True)
class ProfileCost:
    """What producing a profile cost, in seconds, and what it reused (`program`: a call seen
    before, nothing done; `body`: the same layer body; `structure`: the same layer structure at other
    shapes, measured throughput reused; `none`: measured)."""

    reused: str
    trace_s: float = 0.0
    analyse_s: float = 0.0
    measure_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.trace_s + self.analyse_s + self.measure_s


@dataclasses.dataclass(frozen=True)
class Profile:
    """The memory and time model of one compiled program (see the module docstring)."""

    fingerprint: str
    body_fingerprint: str
    structure_fingerprint: str
    residuals: tuple[Residual, ...]
    unused_names: tuple[str, ...]  # tagged, but the backward pass never reads them
    layers: int
    hardware: Hardware
    # the timeline of the level that runs the layer scans (points x names)
    base_bytes: np.ndarray  # [P] live bytes without the named residuals
    live: np.ndarray  # [P, n] bool: residual n's stacked buffer is live at point p
    phase: np.ndarray  # [P] PHASE_*
    outer_peak_bytes: int  # the peak of everything outside that level
    outer_offset_bytes: int  # what the enclosing levels hold while it runs
    probe_peak_bytes: int  # liveness peak of the traced probe program (every name kept)
    # times (seconds, at the measured throughput)
    layer_forward_s: float
    layer_backward_s: float  # with every name kept (the probe)
    step_s: float  # the probe program (measured when the profiler times whole steps)
    scale: float  # measured seconds per roofline second (forward)
    keep_s_per_byte: float  # what keeping a byte of a layer's residuals costs in step time (fitted)
    cost: ProfileCost
    _body: _Body = dataclasses.field(repr=False, compare=False)
    _keep_all: Callable[[], int] = dataclasses.field(repr=False, compare=False)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.residuals)

    @functools.cached_property
    def keep_all_peak_bytes(self) -> int:
        """The liveness peak of the step without any checkpoint (traced on first use)."""
        return self._keep_all()

    def residual(self, name: str) -> Residual:
        for r in self.residuals:
            if r.name == name:
                return r
        raise KeyError(f"no residual named {name!r}; the step's residuals are {list(self.names)}")

    def recompute_table(self) -> np.ndarray:
        """[2^n] roofline seconds per layer of recomputation for each subset of `names` saved (bit
        i: names[i]), relative to the probe (every name saved)."""
        table = self._body.recompute_table(self.names)
        return table - table[-1]

    def saved(self, decisions: Mapping[str, str]) -> frozenset[str]:
        return frozenset(n for n in self.names if decisions.get(n, KEEP) != RECOMPUTE)

    def recompute_s(self, decisions: Mapping[str, str]) -> float:
        """Seconds per step of recomputation beyond the probe's (every name saved)."""
        extra = self._body.recompute(self.saved(decisions))[0] - self._body.recompute(frozenset(self.names))[0]
        return self.layers * self.scale * extra

    def recompute_flops(self, decisions: Mapping[str, str], *, contractions_only: bool = False) -> float:
        """FLOPs per step of recomputation beyond the probe's (matmuls only, if asked)."""
        def flops(saved):
            nodes = self._body.recompute_nodes(saved)
            return sum(n.flops for n in nodes if not contractions_only or n.prim == "dot_general")

        return self.layers * (flops(self.saved(decisions)) - flops(frozenset(self.names)))

    def peak_bytes(self, decisions: Mapping[str, str]) -> int:
        """Modelled device peak of the step under per-name decisions (missing names are kept)."""
        keep = np.array([decisions.get(n, KEEP) == KEEP for n in self.names], bool)
        rec = np.array([decisions.get(n, KEEP) == RECOMPUTE for n in self.names], bool)
        off = np.array([decisions.get(n, KEEP) == OFFLOAD for n in self.names], bool)
        return int(self.peak_bytes_batch(keep[None], rec[None], off[None])[0])

    def peak_bytes_batch(self, keep: np.ndarray, rec: np.ndarray, off: np.ndarray) -> np.ndarray:
        """`peak_bytes` for many plans at once: boolean [plans, names] masks."""
        stacked = np.array([r.stacked_bytes for r in self.residuals], np.float64)
        layer = np.array([r.layer_bytes for r in self.residuals], np.float64)
        base, live, phase = self._segments
        keep, rec, off = (np.asarray(a, np.float64) for a in (keep, rec, off))
        kept = keep @ (stacked[:, None] * live.T)  # [plans, segments]
        bwd = phase == PHASE_BACKWARD
        fwd = phase == PHASE_FORWARD
        extra_bwd = (rec + off) @ layer  # recomputed or reloaded: one layer's copy
        extra_fwd = off @ layer
        level = base[None] + kept + extra_bwd[:, None] * bwd[None] + extra_fwd[:, None] * fwd[None]
        return np.maximum(self.outer_peak_bytes, self.outer_offset_bytes + level.max(1))

    @functools.cached_property
    def _segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The timeline reduced to one point per (live residuals, phase) pattern, the one with the
        most other bytes: a plan's peak is the same over it."""
        best: dict[tuple, int] = {}
        for k in range(len(self.base_bytes)):
            key = (self.live[k].tobytes(), int(self.phase[k]))
            if key not in best or self.base_bytes[k] > self.base_bytes[best[key]]:
                best[key] = k
        idx = np.array(sorted(best.values()))
        return self.base_bytes[idx], self.live[idx], self.phase[idx]

    def host_bytes(self, decisions: Mapping[str, str]) -> int:
        return int(sum(r.stacked_bytes for r in self.residuals if decisions.get(r.name, KEEP) == OFFLOAD))

    def step_time_s(self, decisions: Mapping[str, str], link_bytes_per_s: float | None = None) -> float:
        """Predicted step time: the probe's, plus recomputation, minus what not keeping the
        recomputed residuals saves (`keep_s_per_byte`: writing and reading them back), plus the part
        of the host transfers that the layer's compute cannot hide (a layer's offload overlaps the
        next layer's forward, its reload the previous layer's backward)."""
        link = link_bytes_per_s or self.hardware.link_bytes_per_s
        rec = self.recompute_s(decisions)
        dropped = sum(r.layer_bytes for r in self.residuals if decisions.get(r.name, KEEP) == RECOMPUTE)
        off_layer = sum(r.layer_bytes for r in self.residuals if decisions.get(r.name, KEEP) == OFFLOAD)
        transfer = off_layer / link if off_layer else 0.0
        bwd_layer = self.layer_backward_s + rec / self.layers
        exposed = self.layers * (max(0.0, transfer - self.layer_forward_s) + max(0.0, transfer - bwd_layer))
        return self.step_s + rec - self.keep_s_per_byte * self.layers * dropped + exposed

    @property
    def keep_all_step_s(self) -> float:
        """Predicted step time without any checkpoint: the probe's, minus its own recomputation,
        plus keeping what the probe recomputes (the keep-all peak above the probe's)."""
        extra = max(0, self.keep_all_peak_bytes - self.probe_peak_bytes)
        return (self.step_s - self.layers * self.scale * self._body.recompute(frozenset(self.names))[0]
                + self.keep_s_per_byte * extra)


# --------------------------------------------------------------------------- tracing and levels
class _Recorder:
    """A `Remat` look-alike that applies a policy and records the primal jaxpr of what it wraps."""

    def __init__(self, policy: Callable, label: str):
        self.policy, self.label = policy, label
        self.primal: list = []

    def __call__(self, fn: Callable) -> Callable:
        return apply_policy(fn, self.policy, label=self.label, on_trace=self.primal.append)


def _named_scans(jaxpr) -> list:
    return [e for e in jaxpr.eqns if e.primitive.name == "scan"
            and any(q.primitive.name == NAME_PRIMITIVE for q in e.params["jaxpr"].jaxpr.eqns)]


def _find_level(jaxpr, path=()) -> tuple[tuple, Any] | None:
    """The (path, jaxpr) of the innermost jaxpr running the forward layer scan at its top level;
    path: the (jaxpr, eqn index) pairs that lead to it from the program."""
    if _named_scans(jaxpr):
        return path, jaxpr
    for i, eqn in enumerate(jaxpr.eqns):
        for sub in jcore.jaxprs_in_params(eqn.params):
            found = _find_level(getattr(sub, "jaxpr", sub), path + ((jaxpr, i),))
            if found:
                return found
    return None


def _residual_names(fwd_eqn) -> dict:
    """Stacked output var of the forward layer scan -> the name it stores (through the aliases
    JAX inserts on residuals: reduce_precision, device_put)."""
    body = fwd_eqn.params["jaxpr"].jaxpr
    nc = fwd_eqn.params["num_carry"]
    producer = {o: q for q in body.eqns for o in q.outvars}
    out = {}
    for bo, oo in zip(body.outvars[nc:], fwd_eqn.outvars[nc:]):
        q = producer.get(bo)
        while q is not None and q.primitive.name in _RESIDUAL_ALIAS and isinstance(q.invars[0], jcore.Var):
            q = producer.get(q.invars[0])
        if q is not None and q.primitive.name == NAME_PRIMITIVE:
            out[oo] = q.params["name"]
    return out


def _mesh_size(eqn) -> int:
    mesh = eqn.params.get("mesh")
    return int(np.prod(list(mesh.shape.values()))) if mesh is not None and eqn.primitive.name == "shard_map" else 1


def _level_context(path, top_points) -> tuple[int, int]:
    """(peak outside the level, bytes the enclosing levels hold while it runs), per device.
    top_points: the liveness points of the program (path[0]'s jaxpr)."""
    outer_peak = 0.0
    offset = 0.0
    divisors = [1] * len(path)
    acc = 1
    for k in range(len(path) - 1, -1, -1):  # levels above a shard_map hold global arrays
        jaxpr, i = path[k]
        acc *= _mesh_size(jaxpr.eqns[i])
        divisors[k] = acc
    for k, (jaxpr, i) in enumerate(path):
        pts = top_points if k == 0 else liveness.points(jaxpr)
        for p in pts:
            if p.index != i:
                outer_peak = max(outer_peak, offset + p.device_bytes / divisors[k])
        offset += (pts[i].device_bytes - pts[i].transient_bytes) / divisors[k]
    return int(outer_peak), int(offset)


def call_signature(step_fn, args, donate_argnums) -> tuple:
    """What identifies a call without tracing it: the step, the argument tree, shapes and dtypes."""
    leaves, tree = jax.tree.flatten(args)
    return (step_fn, tree, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves),
            tuple(donate_argnums))


def _example(aval, key):
    if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key):
        return jax.random.split(key, aval.shape) if aval.shape else key
    if jnp.issubdtype(aval.dtype, jnp.inexact):
        return (0.02 * jax.random.normal(key, aval.shape, jnp.float32)).astype(aval.dtype)
    return jnp.zeros(aval.shape, aval.dtype)


def _median_time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_body(closed_body, num_consts: int, *, repeats: int = 3,
                 device: jax.Device | None = None) -> tuple[float, float]:
    """(forward, backward) seconds of one layer body, compiled and run on one device. The backward
    is that of the body under the probe policy (every name saved), differentiated like the step's:
    with respect to the carry and the per-layer inputs (the scan's consts, such as masks and RoPE
    tables, are not differentiated)."""
    device = device or jax.devices()[0]
    keys = jax.random.split(jax.random.key(0), len(closed_body.in_avals))
    args = [jax.device_put(_example(a, k), device) for a, k in zip(closed_body.in_avals, keys)]
    fn = jcore.jaxpr_as_fun(closed_body)
    fwd = jax.jit(fn)
    body = jax.checkpoint(fn, policy=PROBE_POLICY, prevent_cse=False)
    diff = [i for i, a in enumerate(closed_body.in_avals) if i >= num_consts and _float(a)]

    def forward(*xs):
        def f(*d):
            full = list(xs)
            for i, v in zip(diff, d):
                full[i] = v
            return body(*full)

        outs, vjp = jax.vjp(f, *[xs[i] for i in diff])
        return jax.tree.map(jnp.ones_like, outs), vjp  # the vjp closure: its residuals

    cts, vjp = jax.jit(forward)(*args)
    t_fwd = _median_time(fwd, args, repeats)
    t_bwd = _median_time(jax.jit(lambda v, c: v(c)), (vjp, cts), repeats)
    return t_fwd, t_bwd


# --------------------------------------------------------------------------- the profiler
StepFn = Callable[..., Any]


class Profiler:
    """Profiles steps and remembers them by fingerprint (see the module docstring).

    hardware: the rates used for the roofline (default: `Hardware.calibrate()` on the first device).
    measure_repeats: timed runs per measurement (median).
    measure_steps: when a layer structure is measured, also compile and time two whole steps (every
      name kept, every name recomputed): the step time is then measured rather than summed from
      the layer times, and the difference fits what keeping a byte costs (on CPU, keeping can cost
      more than recomputing). Skipped when the all-kept step would not fit the device.
    """

    def __init__(self, hardware: Hardware | None = None, *, measure_repeats: int = 3,
                 measure_steps: bool = True):
        self.hardware = hardware
        self.measure_repeats = measure_repeats
        self.measure_steps = measure_steps
        self._by_signature: dict[tuple, Profile] = {}
        self._by_program: dict[str, Profile] = {}
        self._bodies: dict[str, tuple[_Body, dict]] = {}  # fingerprint -> body, its calibration
        self._calibrations: dict[str, list[dict]] = {}  # layer structure -> calibrations measured

    def _hw(self) -> Hardware:
        if self.hardware is None:
            self.hardware = Hardware.calibrate()
        return self.hardware

    def profile(self, step_fn: StepFn, *args, donate_argnums: Sequence[int] = (),
                reuse: bool = True) -> Profile:
        """Profile `step_fn(remat, *args)`. With `reuse=False` nothing cached is used (a full
        profile, what a changed program would cost without fingerprints)."""
        sig = call_signature(step_fn, args, donate_argnums)
        if reuse:
            hit = self._by_signature.get(sig)
            if hit is not None:
                return dataclasses.replace(hit, cost=ProfileCost("program"))
        hw = self._hw()
        t0 = time.perf_counter()
        recorder = _Recorder(PROBE_POLICY, "probe")
        probe = jax.make_jaxpr(functools.partial(step_fn, recorder))(*args)
        if not recorder.primal:
            raise ValueError("profile: the step never called its `remat` argument; a profiled step "
                             "is step_fn(remat, *args) and differentiates remat(loss_fn)")
        t_trace = time.perf_counter() - t0
        fingerprint = _digest(str(probe))
        if reuse and fingerprint in self._by_program:
            prof = dataclasses.replace(self._by_program[fingerprint],
                                       cost=ProfileCost("program", trace_s=t_trace))
            self._by_signature[sig] = prof
            return prof
        t1 = time.perf_counter()
        primal = recorder.primal[-1]
        level = _find_level(primal.jaxpr)
        primal_scan = _named_scans(level[1])[0]
        body_closed = primal_scan.params["jaxpr"]
        body_fp = _digest(str(body_closed))
        reused = "none"
        if reuse and body_fp in self._bodies:
            body, calib = self._bodies[body_fp]
            reused = "body"
        else:
            body = _Body(body_closed, primal_scan.params["num_consts"], hw)
        donated = [False] * len(probe.jaxpr.invars)
        flat_sizes = [len(jax.tree.leaves(a)) for a in args]
        offsets = np.cumsum([0] + flat_sizes)
        for a in donate_argnums:
            for j in range(offsets[a], offsets[a + 1]):
                donated[j] = True
        parts = self._timeline(probe, donated)
        bwd_body_seconds = parts.pop("bwd_body_seconds")
        t_analyse = time.perf_counter() - t1
        t_measure = 0.0
        if reused == "none":
            known = self._calibrations.get(body.structure) if reuse else None
            if known:  # the nearest size measured of this structure
                near = min(known, key=lambda k: abs(np.log(k["roofline_fwd"] / body.forward_seconds)))
                calib = {**near, "t_fwd": near["s_fwd"] * body.forward_seconds,
                         "t_bwd": near["s_bwd"] * bwd_body_seconds}
                reused = "structure"
            else:
                t2 = time.perf_counter()
                t_fwd, t_bwd = measure_body(body_closed, primal_scan.params["num_consts"],
                                            repeats=self.measure_repeats)
                calib = {"roofline_fwd": body.forward_seconds, "t_fwd": t_fwd, "t_bwd": t_bwd,
                         "s_fwd": t_fwd / body.forward_seconds, "s_bwd": t_bwd / bwd_body_seconds,
                         "correction": 1.0, "keep_s_per_byte": 0.0}
                if self.measure_steps:
                    calib.update(self._measure_steps(step_fn, args, donated, fingerprint, body, parts, calib))
                t_measure = time.perf_counter() - t2
                self._calibrations.setdefault(body.structure, []).append(calib)
            self._bodies[body_fp] = (body, calib)
        t3 = time.perf_counter()
        prof = self._assemble(step_fn, args, donated, fingerprint, body, parts, calib)
        t_analyse += time.perf_counter() - t3
        prof = dataclasses.replace(prof, cost=ProfileCost(reused, t_trace, t_analyse, t_measure))
        self._by_program[fingerprint] = prof
        self._by_signature[sig] = prof
        return prof

    def _measure_steps(self, step_fn, args, donated, fingerprint, body, parts, calib) -> dict:
        """Time the whole step with every name kept and with every name recomputed; fit the step
        time correction and the cost of keeping a byte (see `measure_steps`)."""
        hw = self._hw()
        if hw.device_bytes and parts["probe_peak"] > 0.9 * hw.device_bytes:
            return {}
        model = self._assemble(step_fn, args, donated, fingerprint, body, parts, calib)
        times = {}
        for label, policy in (("probe", PROBE_POLICY), ("remat", jax.checkpoint_policies.nothing_saveable)):
            compiled = jax.jit(functools.partial(step_fn, Remat(policy, label))).lower(*args).compile()
            times[label] = _median_time(compiled, args, self.measure_repeats)
        everything = {n: RECOMPUTE for n in model.names}
        dropped = model.layers * sum(r.layer_bytes for r in model.residuals)
        rho = (times["probe"] - times["remat"] + model.recompute_s(everything)) / dropped if dropped else 0.0
        return {"correction": times["probe"] / model.step_s, "keep_s_per_byte": rho,
                "t_probe_step": times["probe"], "t_remat_step": times["remat"]}

    def _timeline(self, probe, donated) -> dict:
        level = _find_level(probe.jaxpr)
        if level is None:
            raise ValueError("profile: the traced step runs no forward layer scan with named residuals")
        path, jaxpr = level
        fwd = _named_scans(jaxpr)[0]
        names_of = _residual_names(fwd)
        stacked = set(names_of)
        bwd_index = next((i for i, e in enumerate(jaxpr.eqns) if e.primitive.name == "scan"
                          and e is not fwd and stacked & set(e.invars)), None)
        if bwd_index is None:
            raise ValueError("profile: no backward layer scan reads the forward scan's residuals; "
                             "is the step differentiating remat(loss_fn)?")
        fwd_index = jaxpr.eqns.index(fwd)
        top = liveness.analyze(probe, donated=donated).points
        pts = liveness.points(jaxpr) if path else top
        outer_peak, offset = _level_context(path, top) if path else (0, 0)
        names = sorted(set(names_of.values()))
        live = np.zeros((len(pts), len(names)), bool)
        base = np.zeros(len(pts), np.float64)
        for k, p in enumerate(pts):
            named = 0
            for v in p.live:
                if v in names_of:
                    live[k, names.index(names_of[v])] = True
                    named += liveness.aval_bytes(v.aval)
            base[k] = p.device_bytes - named
        phase = np.full(len(pts), PHASE_OTHER)
        phase[fwd_index], phase[bwd_index] = PHASE_FORWARD, PHASE_BACKWARD
        stacked_bytes = {}
        for v, n in names_of.items():
            stacked_bytes[n] = stacked_bytes.get(n, 0) + liveness.aval_bytes(v.aval)
        hw = self._hw()
        bwd_eqn = jaxpr.eqns[bwd_index]
        return {"names": names, "live": live, "base": base, "phase": phase,
                "outer_peak": outer_peak, "offset": offset,
                "probe_peak": int(max(outer_peak, offset + max(p.device_bytes for p in pts))),
                "layers": int(fwd.params["length"]), "stacked_bytes": stacked_bytes,
                "other_seconds": hw.jaxpr_seconds(probe) - hw.total_seconds(fwd) - hw.total_seconds(bwd_eqn),
                "bwd_body_seconds": hw.jaxpr_seconds(bwd_eqn.params["jaxpr"])}

    def _assemble(self, step_fn, args, donated, fingerprint, body: _Body, parts, calib: dict) -> Profile:
        hw = self._hw()
        t_fwd, t_bwd = calib["t_fwd"], calib["t_bwd"]
        names = parts["names"]
        L = parts["layers"]
        scale = t_fwd / body.forward_seconds if body.forward_seconds else 0.0
        all_saved = frozenset(names)
        base_rec_s, base_rec_flops, _ = body.recompute(all_saved)
        residuals = []
        for k, n in enumerate(names):
            var = body.name_var[n]
            rs, rf, _ = body.recompute(all_saved - {n})
            lives = np.nonzero(parts["live"][:, k])[0]
            layer_bytes = parts["stacked_bytes"][n] // L
            residuals.append(Residual(
                name=n, kind=layer_kind(n), shape=tuple(var.aval.shape), dtype=str(var.aval.dtype),
                layers=L, layer_bytes=layer_bytes, recompute_flops=L * (rf - base_rec_flops),
                recompute_s=L * scale * (rs - base_rec_s), swap_bytes=2 * L * layer_bytes,
                lifetime=(int(lives[0]), int(lives[-1])) if len(lives) else (-1, -1)))
        unused = tuple(sorted(set(body.name_var) - set(names)))
        step_s = calib["correction"] * (L * (t_fwd + t_bwd) + scale * parts["other_seconds"])

        def keep_all() -> int:
            closed = jax.make_jaxpr(functools.partial(step_fn, Remat(None, "keep-all")))(*args)
            return self._peak_of(closed, donated)

        return Profile(
            fingerprint=fingerprint, body_fingerprint=body.fingerprint,
            structure_fingerprint=body.structure, residuals=tuple(residuals), unused_names=unused,
            layers=L, hardware=hw, base_bytes=parts["base"], live=parts["live"], phase=parts["phase"],
            outer_peak_bytes=parts["outer_peak"], outer_offset_bytes=parts["offset"],
            probe_peak_bytes=parts["probe_peak"], layer_forward_s=t_fwd, layer_backward_s=t_bwd,
            step_s=step_s, scale=scale, keep_s_per_byte=calib["keep_s_per_byte"],
            cost=ProfileCost("none"), _body=body, _keep_all=keep_all)

    @staticmethod
    def _peak_of(closed, donated) -> int:
        top = liveness.analyze(closed, donated=donated)
        level = _find_level(closed.jaxpr)
        if level is None or not level[0]:
            return top.peak_bytes
        outer_peak, offset = _level_context(level[0], top.points)
        return int(max(outer_peak, offset + max(p.device_bytes for p in liveness.points(level[1]))))


def traced_peak_bytes(step_fn: StepFn, remat: Remat | Callable, *args,
                      donate_argnums: Sequence[int] = ()) -> int:
    """The liveness peak of `step_fn(remat, *args)` traced under `remat` (no modelling of the
    plan: the program that policy produces, analysed as is). Host memory is not counted."""
    closed = jax.make_jaxpr(functools.partial(step_fn, remat))(*args)
    donated = [False] * len(closed.jaxpr.invars)
    sizes = np.cumsum([0] + [len(jax.tree.leaves(a)) for a in args])
    for a in donate_argnums:
        for j in range(sizes[a], sizes[a + 1]):
            donated[j] = True
    return Profiler._peak_of(closed, donated)


_DEFAULT = Profiler()


def profile(step_fn: StepFn, *args, donate_argnums: Sequence[int] = (),
            profiler: Profiler | None = None) -> Profile:
    """Profile `step_fn(remat, *args)` with the process-wide profiler (or `profiler`)."""
    return (profiler or _DEFAULT).profile(step_fn, *args, donate_argnums=donate_argnums)

