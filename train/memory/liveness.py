"""Buffer liveness over a jaxpr: which buffers are alive at each point of a program, and its peak.

The program is the traced training step (forward scan, loss, backward scan, optimizer). Each
top-level equation is a program point; at a point the live set is every buffer defined at or
before it and used at or after it, plus the equation's own transient memory: the peak of a scan
body (one iteration), of a called jaxpr (`pjit`, `checkpoint`, custom derivatives), or the larger
branch of a `cond`. A scan's stacked outputs are allocated when it starts; its per-iteration
inputs and stacked outputs are slices of buffers the caller owns.

Which values become buffers is the model of XLA's fusion that makes this more than a sum of
avals: an elementwise or layout equation (`FUSIBLE`) whose every consumer is elementwise or a
reduction is fused into that consumer and never materialised; `checkpoint_name`, reshapes and
the like alias their operand (`ALIAS`), and so does a transpose read only by matmuls (XLA folds
it into their dimension numbers). Everything else (matmuls, reductions' outputs, gathers,
scan and call results, the program's outputs) is a buffer. A fused value keeps the buffers it is
computed from alive until its consumer runs.

Arguments are live for the whole program unless donated; outputs from their definition to the
end. Values in host memory (`f32<host>`, offloaded residuals) are counted separately.
`tests/test_memory_liveness.py` checks the peak against XLA's `memory_analysis()`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np
from jax.extend import core as jcore

FUSIBLE = frozenset({
    "abs", "acos", "acosh", "add", "add_any", "and", "asin", "asinh", "atan", "atan2", "atanh",
    "broadcast_in_dim", "cbrt", "ceil", "clamp", "concatenate", "convert_element_type", "cos",
    "cosh", "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt",
    "imag", "integer_pow", "iota", "is_finite", "le", "lgamma", "digamma", "log", "log1p",
    "logistic", "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pad", "pow",
    "real", "rem", "round", "rsqrt", "select_n", "shift_left", "shift_right_arithmetic",
    "shift_right_logical", "sign", "sin", "sinh", "slice", "sqrt", "square", "sub", "tan", "tanh",
    "transpose", "xor", "random_bits", "random_wrap", "random_unwrap", "random_fold_in",
    "threefry2x32",
})
ALIAS = frozenset({"name", "reshape", "squeeze", "expand_dims", "stop_gradient", "reduce_precision",
                   "copy", "copy_p", "optimization_barrier"})
REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                    "reduce_or", "argmax", "argmin"})


def aval_bytes(aval) -> int:
    shape = getattr(aval, "shape", ())
    itemsize = getattr(getattr(aval, "dtype", None), "itemsize", 0) or 0
    return int(np.prod(shape, dtype=np.int64)) * int(itemsize)


def on_host(aval) -> bool:
    return "host" in str(getattr(aval, "memory_space", "")).lower()


def _is_var(v) -> bool:
    return not isinstance(v, jcore.Literal)


@dataclasses.dataclass(frozen=True)
class Point:
    """One top-level equation and the memory alive while it runs."""

    index: int
    primitive: str
    device_bytes: int  # buffers live across the equation + its transient
    host_bytes: int
    transient_bytes: int  # the equation's own peak (scan body, called jaxpr), device
    live: frozenset  # the top-level buffers (Vars) alive here


@dataclasses.dataclass(frozen=True)
class Liveness:
    points: tuple[Point, ...]
    argument_bytes: int
    output_bytes: int

    @property
    def peak_bytes(self) -> int:
        return max((p.device_bytes for p in self.points), default=self.argument_bytes)

    @property
    def peak_host_bytes(self) -> int:
        return max((p.host_bytes for p in self.points), default=0)

    @property
    def peak_point(self) -> Point:
        return max(self.points, key=lambda p: p.device_bytes)


class _Buffers:
    """Which var is (or reads) which buffer, for one jaxpr."""

    def __init__(self, jaxpr):
        self.jaxpr = jaxpr
        consumers: dict = {}
        for eqn in jaxpr.eqns:
            for v in eqn.invars:
                if _is_var(v):
                    consumers.setdefault(v, []).append(eqn)
        outs = {v for v in jaxpr.outvars if _is_var(v)}
        needs: dict = {}

        def needs_buffer(v) -> bool:
            if v in needs:
                return needs[v]
            needs[v] = True  # cycles are impossible in a jaxpr; this only guards recursion
            ans = v in outs
            for eqn in consumers.get(v, ()):
                if ans:
                    break
                prim = eqn.primitive.name
                if prim in ALIAS:
                    ans = any(needs_buffer(o) for o in eqn.outvars)
                elif prim not in FUSIBLE and prim not in REDUCE:
                    ans = True
            needs[v] = ans
            return ans

        self.deps: dict = {}
        for v in [*jaxpr.constvars, *jaxpr.invars]:
            self.deps[v] = frozenset([v])
        for eqn in jaxpr.eqns:
            prim = eqn.primitive.name
            in_deps = frozenset().union(*(self.deps[v] for v in eqn.invars if _is_var(v)))
            for o in eqn.outvars:
                if prim in ALIAS or (prim == "transpose" and consumers.get(o) and all(
                        c.primitive.name == "dot_general" for c in consumers[o])):
                    self.deps[o] = in_deps  # a transpose into a matmul folds into its dimensions
                elif prim in FUSIBLE and not needs_buffer(o):
                    self.deps[o] = in_deps
                else:
                    self.deps[o] = frozenset([o])

    def buffers_of(self, vs: Iterable) -> set:
        out: set = set()
        for v in vs:
            if _is_var(v) and v in self.deps:
                out |= self.deps[v]
        return out


def _sub_transient(eqn) -> tuple[int, int]:
    """The device/host memory an equation needs beyond its operands and results."""
    subs = [s for s in jcore.jaxprs_in_params(eqn.params)]
    if not subs:
        return 0, 0
    dev = host = 0
    for sub in subs:
        d, h = transient(sub)
        dev, host = max(dev, d), max(host, h)
    return dev, host


def points(jaxpr) -> list[Point]:
    """The points of a nested jaxpr (a scan body, a called jaxpr), counting only the buffers it
    creates: its inputs belong to the caller, its outputs are the caller's result buffers (or a
    scan's stacked outputs)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    bufs = _Buffers(jaxpr)
    excluded = bufs.buffers_of([*jaxpr.invars, *jaxpr.constvars]) | bufs.buffers_of(jaxpr.outvars)
    return _sweep(jaxpr, bufs, excluded=excluded, pinned=set(), end_live=set())


def transient(jaxpr) -> tuple[int, int]:
    """Peak (device, host) bytes of the buffers a nested jaxpr creates (see `points`)."""
    points_ = points(jaxpr)
    dev = max((p.device_bytes for p in points_), default=0)
    host = max((p.host_bytes for p in points_), default=0)
    return dev, host


def _sweep(jaxpr, bufs: _Buffers, *, excluded: set, pinned: set, end_live: set) -> list[Point]:
    n = len(jaxpr.eqns)
    start: dict = {}
    last: dict = {}
    for v in [*jaxpr.constvars, *jaxpr.invars]:
        start[v] = -1
        last[v] = -1
    for i, eqn in enumerate(jaxpr.eqns):
        for o in eqn.outvars:
            if bufs.deps.get(o) == frozenset([o]):
                start[o], last[o] = i, i
        for b in bufs.buffers_of(eqn.invars):
            last[b] = max(last.get(b, i), i)
    for b in end_live | pinned:
        last[b] = n
    for b in pinned:
        start[b] = -1
    size = {b: aval_bytes(b.aval) for b in start}
    host = {b: on_host(b.aval) for b in start}
    # sweep: buffers enter at `start`, leave after `last`
    enter: dict[int, list] = {}
    leave: dict[int, list] = {}
    for b in start:
        if b in excluded or (isinstance(b, jcore.DropVar)):
            continue
        enter.setdefault(max(start[b], 0), []).append(b)
        leave.setdefault(max(last[b], start[b], 0), []).append(b)
    live: set = set()
    dev_bytes = host_bytes = 0
    points = []
    for i, eqn in enumerate(jaxpr.eqns):
        for b in enter.get(i, ()):
            live.add(b)
            if host[b]:
                host_bytes += size[b]
            else:
                dev_bytes += size[b]
        t_dev, t_host = _sub_transient(eqn)
        points.append(Point(i, eqn.primitive.name, dev_bytes + t_dev, host_bytes + t_host, t_dev,
                            frozenset(live)))
        for b in leave.get(i, ()):
            if b in live and last[b] <= i:
                live.discard(b)
                if host[b]:
                    host_bytes -= size[b]
                else:
                    dev_bytes -= size[b]
    return points


def analyze(closed_jaxpr, *, donated: Sequence[bool] | None = None) -> Liveness:
    """Liveness of a whole program (a `ClosedJaxpr` from `jax.make_jaxpr`).

    donated: per flat input, whether its buffer may be freed after its last use (`donate_argnums`);
    by default every input is live for the whole program, as XLA keeps non-donated arguments.
    """
    jaxpr = closed_jaxpr.jaxpr
    bufs = _Buffers(jaxpr)
    donated = list(donated) if donated is not None else [False] * len(jaxpr.invars)
    if len(donated) != len(jaxpr.invars):
        raise ValueError(f"donated has {len(donated)} entries for {len(jaxpr.invars)} inputs")
    pinned = {v for v, d in zip(jaxpr.invars, donated) if not d} | set(jaxpr.constvars)
    outs = bufs.buffers_of(jaxpr.outvars)
    points = _sweep(jaxpr, bufs, excluded=set(), pinned=pinned, end_live=outs)
    arg_bytes = sum(aval_bytes(v.aval) for v in jaxpr.invars if not on_host(v.aval))
    out_bytes = sum(aval_bytes(v.aval) for v in jaxpr.outvars if _is_var(v) and not on_host(v.aval))
    return Liveness(tuple(points), arg_bytes, out_bytes)
