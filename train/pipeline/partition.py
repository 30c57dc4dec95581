"""Layers partitioned into pipeline stages, and where each stage's parameters live in the flat vector.

A `StagePartition` is the number of layers of each stage (uneven partitions allowed: 5 layers in
2 stages may be 2 + 3). The first stage also holds the embedding, the last the final norm and the
lm head. The train state stays the elastic trainer's flat vector (`jaxsys.train.elastic.layout`:
leaves in `jax.tree` order, params and both Adam moments sharded over all devices), so every
fixed-order reduction of the canonical step applies unchanged; a stage reads its parameters out of
that vector through `StageMap.positions[s]`, the global flat index of each element of the stage's
own flat vector (its tree flattened in `jax.tree` order).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxsys.models import decoder
from jaxsys.models.config import ModelConfig
from jaxsys.train.elastic.layout import FlatSpec


class PartitionError(ValueError):
    """A partition that does not fit the model (wrong layer count, empty stage, tied embeddings)."""


@dataclasses.dataclass(frozen=True)
class StagePartition:
    """Layers per stage, in order (each >= 1)."""

    layers: tuple[int, ...]

    def __post_init__(self):
        if not self.layers or any(n < 1 for n in self.layers):
            raise PartitionError(f"every stage needs at least one layer, got {list(self.layers)}")

    @classmethod
    def balanced(cls, num_layers: int, num_stages: int) -> "StagePartition":
        """Contiguous, the first `num_layers % num_stages` stages one layer more."""
        if not 1 <= num_stages <= num_layers:
            raise PartitionError(f"cannot split {num_layers} layers into {num_stages} stages")
        base, extra = divmod(num_layers, num_stages)
        return cls(tuple(base + (1 if s < extra else 0) for s in range(num_stages)))

    @classmethod
    def by_cost(cls, layer_costs: Sequence[float], num_stages: int, *, first_extra: float = 0.0,
                last_extra: float = 0.0) -> "StagePartition":
        """The contiguous partition minimising the slowest stage (linear partition by dynamic
        programming); `first_extra`/`last_extra` add the embedding's and the head's cost."""
        L = len(layer_costs)
        if not 1 <= num_stages <= L:
            raise PartitionError(f"cannot split {L} layers into {num_stages} stages")
        pre = np.concatenate([[0.0], np.cumsum(layer_costs)])
        INF = float("inf")
        # best[s][i]: min over partitions of layers[:i] into s stages of the max stage cost
        best = np.full((num_stages + 1, L + 1), INF)
        cut = np.zeros((num_stages + 1, L + 1), np.int64)
        best[0][0] = 0.0
        for s in range(1, num_stages + 1):
            for i in range(s, L - (num_stages - s) + 1):
                for j in range(s - 1, i):
                    c = pre[i] - pre[j] + (first_extra if s == 1 else 0.0) + (last_extra if s == num_stages else 0.0)
                    v = max(best[s - 1][j], c)
                    if v < best[s][i] - 1e-15:
                        best[s][i], cut[s][i] = v, j
        sizes, i = [], L
        for s in range(num_stages, 0, -1):
            j = int(cut[s][i])
            sizes.append(i - j)
            i = j
        return cls(tuple(reversed(sizes)))

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    @property
    def num_layers(self) -> int:
        return sum(self.layers)

    def first_layer(self, s: int) -> int:
        return sum(self.layers[:s])

    def layer_range(self, s: int) -> tuple[int, int]:
        a = self.first_layer(s)
        return a, a + self.layers[s]

    def __str__(self) -> str:
        return "+".join(map(str, self.layers))


@dataclasses.dataclass(frozen=True)
class StageMap:
    """Where every unit's parameters live in the train state's flat vector (`FlatSpec` of the whole
    model, leaves in `jax.tree` order), and each stage's "pack": the flat vector of all parameters
    a stage holds, in unit order - [embedding (first stage)] + its layers in order (each in the
    layer's own tree order) + [final norm and lm head (last stage)]."""

    partition: StagePartition
    flat: FlatSpec
    layer_positions: np.ndarray
    """[L, Lsz] global flat index of each element of each layer's parameter vector."""
    embed_positions: np.ndarray
    """[V*D]"""
    head_positions: np.ndarray
    """[H] final norm then lm head."""

    @classmethod
    def make(cls, cfg: ModelConfig, part: StagePartition) -> "StageMap":
        from jaxsys.train.pipeline import units

        if part.num_layers != cfg.num_layers:
            raise PartitionError(f"partition {part} has {part.num_layers} layers, the model {cfg.num_layers}")
        try:
            hspec = units.head_spec(cfg)
        except ValueError as e:
            raise PartitionError(str(e)) from None
        flat = FlatSpec.from_shapes(decoder.param_shapes(cfg))
        index = flat.unflatten_np(np.arange(flat.num_params, dtype=np.int64))
        lspec = units.layer_spec(cfg)
        layer_pos = np.stack([lspec.flatten_np({k: v[l] for k, v in index["layers"].items()}).astype(np.int64)
                              for l in range(cfg.num_layers)])
        head_pos = hspec.flatten_np({"final_norm": index["final_norm"], "lm_head": index["lm_head"]}).astype(np.int64)
        return cls(part, flat, layer_pos, np.asarray(index["embed"]).reshape(-1), head_pos)

    @property
    def num_stages(self) -> int:
        return self.partition.num_stages

    def positions(self, s: int) -> np.ndarray:
        """Global flat index of each element of stage s's pack."""
        a, b = self.partition.layer_range(s)
        parts = ([self.embed_positions] if s == 0 else []) + [self.layer_positions[l] for l in range(a, b)]
        if s == self.num_stages - 1:
            parts.append(self.head_positions)
        return np.concatenate(parts)

    @property
    def stage_sizes(self) -> tuple[int, ...]:
        return tuple(len(self.positions(s)) for s in range(self.num_stages))

    @property
    def max_stage_size(self) -> int:
        return max(self.stage_sizes)

    def stage_of_position(self) -> np.ndarray:
        """[P] int32: the stage that owns each global flat element."""
        out = np.full(self.flat.num_params, -1, np.int32)
        for s in range(self.num_stages):
            out[self.positions(s)] = s
        return out
