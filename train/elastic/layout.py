"""Layouts that do not depend on the device count: the flat parameter vector and the micro-batches.

`FlatSpec`   the parameter tree as one flat float32 vector of P elements (leaves in `jax.tree`
             order). The elastic trainer keeps params and both Adam moments as rows of one
             [3, N*S] array sharded over the devices (ZeRO-3 / FSDP with a flat buffer): device k
             holds elements [k*S, (k+1)*S) with S = ceil(P / N) (the tail of the last shard is
             zero padding). Elementwise work (the AdamW update) gives the same bits on any N.
`FlatLayout` that split for a concrete, ordered device set, and who holds what: shard k lives on
             device k (primary) and on device k+1 mod N (replica; k+shift across processes).
`MicroBatchPlan`  which micro-batches each device computes. The global batch is always the same
             M micro-batches of consecutive examples; a plan spreads them over N devices (uneven
             splits allowed: 16 on 6 is 3,3,3,3,2,2) in K = ceil(M/N) slots per device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class FlatSpec:
    """Flatten/unflatten a parameter tree to/from one vector (static; hashable)."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    decay: tuple[bool, ...]
    """Leaves that get weight decay: matrices and embeddings (ndim >= 2 per layer), not norms or biases."""

    @classmethod
    def from_shapes(cls, shapes_tree: Any, *, stacked_layers: bool = True) -> "FlatSpec":
        paths_leaves = jax.tree_util.tree_flatten_with_path(
            shapes_tree, is_leaf=lambda s: isinstance(s, tuple) and all(isinstance(i, int) for i in s))
        leaves = [tuple(v) for _, v in paths_leaves[0]]
        treedef = paths_leaves[1]
        decay = []
        for path, shape in paths_leaves[0]:
            key = jax.tree_util.keystr(path)
            per_layer_ndim = len(shape) - (1 if "'layers'" in key and stacked_layers else 0)
            decay.append(per_layer_ndim >= 2)
        return cls(treedef, tuple(leaves), tuple(decay))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s)) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.cumsum((0,) + self.sizes[:-1]))

    @property
    def num_params(self) -> int:
        return int(sum(self.sizes))

    def flatten(self, tree: Any) -> jax.Array:
        leaves = self.treedef.flatten_up_to(tree)
        return jnp.concatenate([jnp.reshape(x, (-1,)).astype(jnp.float32) for x in leaves])

    def unflatten(self, vec_P: jax.Array) -> Any:
        out = [jax.lax.slice(vec_P, (o,), (o + n,)).reshape(s)
               for o, n, s in zip(self.offsets, self.sizes, self.shapes)]
        return jax.tree.unflatten(self.treedef, out)

    def flatten_np(self, tree: Any) -> np.ndarray:
        leaves = self.treedef.flatten_up_to(tree)
        return np.concatenate([np.asarray(x, np.float32).reshape(-1) for x in leaves])

    def unflatten_np(self, vec: np.ndarray) -> Any:
        out = [vec[o:o + n].reshape(s) for o, n, s in zip(self.offsets, self.sizes, self.shapes)]
        return jax.tree.unflatten(self.treedef, out)

    def decay_ranges(self) -> tuple[tuple[int, int], ...]:
        """[start, stop) ranges of the flat vector that get weight decay (merged)."""
        out: list[list[int]] = []
        for o, n, d in zip(self.offsets, self.sizes, self.decay):
            if not d:
                continue
            if out and out[-1][1] == o:
                out[-1][1] = o + n
            else:
                out.append([o, o + n])
        return tuple((a, b) for a, b in out)


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """The flat vector of `num_params` elements split over an ordered device set."""

    num_params: int
    device_ids: tuple[int, ...]
    replica_shift: int = 1
    """The replica of shard k lives on device k + replica_shift (mod N): 1 in one process; the
    devices per process in a multi-process job, so that losing a process never loses both copies."""

    @property
    def n(self) -> int:
        return len(self.device_ids)

    @property
    def shard_size(self) -> int:
        return ceil_div(self.num_params, self.n)

    @property
    def padded_size(self) -> int:
        return self.shard_size * self.n

    def shard_range(self, k: int) -> tuple[int, int]:
        """Global [start, stop) of the real (non-padding) elements of shard k."""
        s = self.shard_size
        return min(k * s, self.num_params), min((k + 1) * s, self.num_params)

    def primary_holder(self, k: int) -> int:
        return self.device_ids[k]

    def replica_holder(self, k: int) -> int:
        return self.device_ids[(k + self.replica_shift) % self.n]

    def index_of(self, device_id: int) -> int:
        return self.device_ids.index(device_id)


@dataclasses.dataclass(frozen=True)
class MicroBatchPlan:
    """Assignment of micro-batches (indices into the global batch's M micro-batches) to devices."""

    num_micro: int
    assignment: tuple[tuple[int, ...], ...]
    """assignment[i]: the micro-batches device i computes, in its slot order."""

    @classmethod
    def balanced(cls, num_micro: int, num_devices: int) -> "MicroBatchPlan":
        """All M micro-batches, contiguous blocks, the first M % N devices one more."""
        base, extra = divmod(num_micro, num_devices)
        out, start = [], 0
        for i in range(num_devices):
            c = base + (1 if i < extra else 0)
            out.append(tuple(range(start, start + c)))
            start += c
        return cls(num_micro, tuple(out))

    @property
    def num_devices(self) -> int:
        return len(self.assignment)

    @property
    def slots(self) -> int:
        return max(1, max(len(a) for a in self.assignment))

    @property
    def active(self) -> tuple[int, ...]:
        return tuple(sorted(m for a in self.assignment for m in a))

    def slot_table(self) -> np.ndarray:
        """[N, K] micro-batch index per slot, -1 for an idle slot."""
        t = np.full((self.num_devices, self.slots), -1, np.int32)
        for i, a in enumerate(self.assignment):
            t[i, :len(a)] = a
        return t

    def micro_to_slot(self) -> tuple[np.ndarray, np.ndarray]:
        """[M] flat slot (i*K + k) holding each micro-batch, and [M] whether it is computed at all."""
        idx = np.zeros(self.num_micro, np.int32)
        active = np.zeros(self.num_micro, bool)
        K = self.slots
        for i, a in enumerate(self.assignment):
            for k, m in enumerate(a):
                idx[m] = i * K + k
                active[m] = True
        return idx, active

    def without_devices(self, lost: Sequence[int]) -> "MicroBatchPlan":
        """TorchFT-style: the survivors keep their own micro-batches; the lost ones' are dropped."""
        keep = [a for i, a in enumerate(self.assignment) if i not in set(lost)]
        return MicroBatchPlan(self.num_micro, tuple(keep))
