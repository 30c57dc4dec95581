"""Executing a memory plan: `jax.checkpoint` with the plan's policy, applied to each layer.

Where `jax.checkpoint` goes decides whether a policy saves memory at all. Wrapped around a loss
whose layers run under one `lax.scan`, a policy is honoured inside the scan body, but JAX then
recomputes the *whole* forward scan before the backward scan starts, and every layer's recomputed
values are stacked [L, ...] and alive together: the peak equals the keep-everything peak (on the
decoder: 186 MB of XLA temp with or without `nothing_saveable`). The policy only bounds memory when
the checkpoint wraps the scan *body*, so that the backward pass recomputes one layer at a time.

`Remat(policy)` does that without the model's cooperation: it traces the function to a jaxpr,
wraps the body of every scan that carries named residuals (`checkpoint_name`) in
`jax.checkpoint(policy=...)`, and evaluates the rewritten jaxpr. It is applied at trace time (the
rewrite is part of the traced program; nothing runs in Python per step):

    loss, grads = jax.value_and_grad(Remat(policy)(loss_fn))(params, batch)

`Remat(None)` is the identity (no checkpoint: JAX keeps every residual of the plain backward pass).
A training step takes its `Remat` as the first argument, so the planner can trace it under any
policy; see `jaxsys.train.memory.profile`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.extend import core as jcore

NAME_PRIMITIVE = "name"  # the primitive `jax.ad_checkpoint.checkpoint_name` binds
_CALL_PRIMITIVES = ("pjit", "jit", "closed_call", "core_call")


def _subjaxprs(eqn) -> list:
    return list(jcore.jaxprs_in_params(eqn.params))


def body_names(jaxpr) -> set[str]:
    """Residual names tagged directly in `jaxpr` or in calls it makes, not inside nested scans."""
    out: set[str] = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == NAME_PRIMITIVE:
            out.add(eqn.params["name"])
        elif eqn.primitive.name != "scan":
            for sub in _subjaxprs(eqn):
                out |= body_names(sub)
    return out


def _contains_named_scan(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and (body_names(eqn.params["jaxpr"].jaxpr)
                                             or _contains_named_scan(eqn.params["jaxpr"].jaxpr)):
            return True
        if eqn.primitive.name != "scan" and any(_contains_named_scan(s) for s in _subjaxprs(eqn)):
            return True
    return False


def _checkpointed_body(body: jcore.ClosedJaxpr, policy: Callable) -> jcore.ClosedJaxpr:
    fn = jcore.jaxpr_as_fun(body)
    # prevent_cse=False: a scan body is not CSE'd across iterations, so no barrier is needed.
    return jax.make_jaxpr(jax.checkpoint(fn, policy=policy, prevent_cse=False))(*body.in_avals)


def _bind(eqn, invals: list[Any]) -> list[Any]:
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older jax: (subfuns, params)
        subfuns, params = params
        invals = [*subfuns, *invals]
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _eval_rewritten(jaxpr, consts, args, policy) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        prim = eqn.primitive.name
        if prim == "scan" and body_names(eqn.params["jaxpr"].jaxpr):
            params = dict(eqn.params, jaxpr=_checkpointed_body(eqn.params["jaxpr"], policy))
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **params)
        elif prim == "scan" and _contains_named_scan(eqn.params["jaxpr"].jaxpr):
            body = eqn.params["jaxpr"]  # e.g. a scan over micro-batches around the layer scan
            inner = jax.make_jaxpr(lambda *a: _eval_rewritten(body.jaxpr, body.consts, a, policy))(
                *body.in_avals)
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **dict(eqn.params, jaxpr=inner))
        elif prim in _CALL_PRIMITIVES and _contains_named_scan(eqn.params["jaxpr"].jaxpr):
            inner = eqn.params["jaxpr"]
            outs = _eval_rewritten(inner.jaxpr, inner.consts, invals, policy)
        else:
            outs = _bind(eqn, invals)
        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def apply_policy(fn: Callable, policy: Callable, *, label: str = "custom",
                 on_trace: Callable[[jcore.ClosedJaxpr], None] | None = None) -> Callable:
    """`fn` with the body of each scan that tags residuals under `jax.checkpoint(policy=policy)`.

    on_trace: called with `fn`'s own jaxpr (before the rewrite) each time the result is traced; the
    profiler reads the layer body from it.
    """

    def rematted(*args, **kwargs):
        flat, tree = jax.tree.flatten((args, kwargs))

        def flat_fn(*leaves):
            a, k = jax.tree.unflatten(tree, leaves)
            return fn(*a, **k)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*flat)
        if not _contains_named_scan(closed.jaxpr):
            raise ValueError(
                f"remat ({label}): {getattr(fn, '__name__', fn)!r} runs no lax.scan whose body tags "
                "residuals with checkpoint_name, so there is nothing to apply the policy to")
        if on_trace is not None:
            on_trace(closed)
        outs = _eval_rewritten(closed.jaxpr, closed.consts, flat, policy)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return rematted


@dataclasses.dataclass(frozen=True)
class Remat:
    """A function transformer: `Remat(policy)(fn)` runs `fn` with each named layer scan's body under
    `jax.checkpoint(policy=policy)`; `Remat(None)(fn)` is `fn` (keep every residual).

    `label` names the policy in tables and logs. Two `Remat`s with the same policy object and label
    are equal, so a step specialised on one (`functools.partial(step, remat)`) is cached by jit.
    """

    policy: Callable | None
    label: str = "custom"

    def __call__(self, fn: Callable) -> Callable:
        if self.policy is None:
            return fn
        return apply_policy(fn, self.policy, label=self.label)


KEEP_ALL = Remat(None, "keep-all")
