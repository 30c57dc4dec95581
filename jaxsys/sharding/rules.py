"""The one logical -> mesh rules table, mesh construction, and the helpers that turn logical axis
names into `NamedSharding`s.

A logical axis maps to a tuple of mesh axes. A mesh axis is used for a dimension only when it
divides the dimension and is not already used by another dimension of the same array; otherwise
that dimension stays replicated over it (e.g. 3 KV heads on tensor=8). The resolved specs for the
models are pinned by a golden snapshot test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsys.sharding import axes as ax

LogicalAxes = tuple[str | None, ...]

LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (ax.BATCH, ("data", "fsdp", "expert")),
    (ax.SEQ, ()),
    (ax.VOCAB, ("tensor",)),
    (ax.EMBED, ("fsdp",)),
    (ax.Q_HEADS, ("tensor",)),
    (ax.KV_HEADS, ("tensor",)),
    (ax.HEAD_DIM, ()),
    (ax.MLP, ("tensor",)),
    (ax.LAYERS, ()),
    (ax.NORM, ()),
    (ax.EXPERT, ("expert",)),
    (ax.EXPERT_MLP, ("tensor",)),
    (ax.ROUTER, ()),
    (ax.CACHE_PAGES, ()),
    (ax.PAGE, ()),
    (ax.FLAT, ("fsdp",)),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; -1 on one axis means "all remaining devices"."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> "MeshConfig":
        unknown = set(d) - set(ax.MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {ax.MESH_AXES}")
        return cls(**{k: int(v) for k, v in d.items()})

    def sizes(self, num_devices: int) -> dict[str, int]:
        s = dataclasses.asdict(self)
        free = [k for k, v in s.items() if v == -1]
        if len(free) > 1:
            raise ValueError("at most one mesh axis may be -1")
        fixed = math.prod(v for v in s.values() if v != -1)
        if free:
            if num_devices % fixed:
                raise ValueError(f"{num_devices} devices are not divisible by the fixed axes {s}")
            s[free[0]] = num_devices // fixed
        if math.prod(s.values()) != num_devices:
            raise ValueError(f"mesh {s} needs {math.prod(s.values())} devices, have {num_devices}")
        return s


def make_mesh(config: MeshConfig | Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, expert) over `devices` (default: all)."""
    if config is None:
        config = MeshConfig(data=-1)
    elif not isinstance(config, MeshConfig):
        config = MeshConfig.from_dict(config)
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.sizes(len(devices))
    shape = tuple(sizes[a] for a in ax.MESH_AXES)
    return Mesh(np.array(devices, dtype=object).reshape(shape), ax.MESH_AXES)


def mesh_axes_of(logical: str, rules: Sequence[tuple[str, tuple[str, ...]]] = LOGICAL_RULES) -> tuple[str, ...]:
    """The mesh axes the rules table maps `logical` onto (e.g. the axis names that collectives
    inside a `shard_map` over that dimension run over)."""
    table = dict(rules)
    if logical not in table:
        raise KeyError(f"logical axis {logical!r} has no rule; add it to LOGICAL_RULES")
    return table[logical]


def logical_to_spec(logical: LogicalAxes, shape: Sequence[int] | None, mesh: Mesh,
                    rules: Sequence[tuple[str, tuple[str, ...]]] = LOGICAL_RULES) -> PartitionSpec:
    table = dict(rules)
    used: set[str] = set()
    out: list[Any] = []
    for i, name in enumerate(logical):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; add it to LOGICAL_RULES")
        mesh_axes = []
        size = None if shape is None else shape[i]
        for m in table.get(name, ()) if name else ():
            n = mesh.shape[m]
            if n == 1 or m in used:
                continue
            cur = math.prod(mesh.shape[a] for a in mesh_axes)
            if size is not None and size % (cur * n):
                continue
            mesh_axes.append(m)
        used.update(mesh_axes)
        out.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes)))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def logical_sharding(logical: LogicalAxes, shape: Sequence[int] | None, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh))


def tree_shardings(logical_tree: Any, shapes_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree given a matching tree of logical axes and of shapes/arrays."""
    return jax.tree.map(
        lambda names, x: logical_sharding(names, tuple(x) if isinstance(x, tuple) else np.shape(x), mesh),
        logical_tree, shapes_tree, is_leaf=lambda t: isinstance(t, tuple))


# ---------------------------------------------------------------- activation constraints
_state = threading.local()


@contextlib.contextmanager
def activate(mesh: Mesh | None) -> Iterator[None]:
    """While active (at trace time), `constrain` pins activations to `mesh` by logical names."""
    prev = getattr(_state, "mesh", None)
    _state.mesh = mesh
    try:
        yield
    finally:
        _state.mesh = prev


def active_mesh() -> Mesh | None:
    return getattr(_state, "mesh", None)


def constrain(x: jax.Array, logical: LogicalAxes) -> jax.Array:
    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(logical, x.shape, mesh))
