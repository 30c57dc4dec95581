"""What the simulator replays: requests (prompt and output lengths from our own generations) with
the remaining-length predictions each predictor made for them, and arrival traces.

A `Workload` is a pool of generations. For every predictor it holds a prediction *table*: the
predicted remaining length on a regular grid g = 0, k, 2k, ... of tokens generated (the predictor
re-predicts every k decode steps). Between grid points the simulator lets the prediction count
down one per token. The table of a learned predictor comes from running it on the hidden states
captured for that very generation (`jaxsys.serve.length.data`); at grid point g = j k it uses the
latest capture at or before g and counts down from there. The `oracle` table is the truth.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

__all__ = ["PredictionTable", "Trace", "Workload", "poisson_trace"]


@dataclasses.dataclass(frozen=True)
class PredictionTable:
    """Predicted remaining tokens of entry e at g = j * k: values[offsets[e] + min(j, counts[e] - 1)],
    counted down by (g - j * k) and clipped at 0."""

    offsets: np.ndarray  # [E] int64
    counts: np.ndarray  # [E] int64 (>= 1)
    values: np.ndarray  # [sum(counts)] float32
    k: int

    def lookup(self, entries: np.ndarray, generated: np.ndarray) -> np.ndarray:
        j = np.minimum(generated // self.k, self.counts[entries] - 1)
        base = self.values[self.offsets[entries] + j]
        return np.maximum(base - (generated - j * self.k), 0.0)

    @classmethod
    def from_grid(cls, grids: list[np.ndarray], k: int) -> "PredictionTable":
        counts = np.array([len(g) for g in grids], np.int64)
        if np.any(counts < 1):
            raise ValueError("every entry needs at least one prediction (at g = 0)")
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return cls(offsets, counts, np.concatenate(grids).astype(np.float32), k)


@dataclasses.dataclass(frozen=True)
class Workload:
    """A pool of E generations to replay: lengths, source, and prediction tables by name."""

    prompt_len: np.ndarray  # [E] int
    output_len: np.ndarray  # [E] int (tokens after the prompt, EOS not counted)
    source: np.ndarray  # [E] int (index into jaxsys.serve.length.data.SOURCES)
    tables: Mapping[str, PredictionTable]
    max_new_tokens: int
    description: str = ""

    def __post_init__(self):
        E = len(self.prompt_len)
        if len(self.output_len) != E or len(self.source) != E:
            raise ValueError("prompt_len, output_len and source must have one entry per generation")
        for name, t in self.tables.items():
            if len(t.counts) != E:
                raise ValueError(f"prediction table {name!r} has {len(t.counts)} entries, the pool {E}")

    @property
    def size(self) -> int:
        return len(self.prompt_len)

    @classmethod
    def from_length_data(cls, data, predictors: Mapping[str, object], *, split: str = "test", k: int = 8
                         ) -> "Workload":
        """The generations of `split` with a table per predictor (`LengthPredictor`s; the prompt-only
        ones read the prompt features) plus `oracle`."""
        from jaxsys.serve.length.data import SPLITS

        gens = np.nonzero(data.prompt_split[data.gen_prompt] == SPLITS.index(split))[0]
        if not len(gens):
            raise ValueError(f"the length data has no {split!r} generations")
        order = np.argsort(data.gen, kind="stable")
        starts = np.searchsorted(data.gen[order], gens, side="left")
        ends = np.searchsorted(data.gen[order], gens, side="right")
        per_name: dict[str, list[np.ndarray]] = {name: [] for name in predictors}
        per_name["oracle"] = []
        predicted = {}
        for name, p in predictors.items():
            predicted[name] = p.predict_data(data)
        for gi, s, e in zip(gens, starts, ends):
            rows = order[s:e]
            g = data.g[rows]
            n = int(data.gen_len[gi])
            grid = np.arange(0, n + 1, k)
            latest = np.searchsorted(g, grid, side="right") - 1  # latest capture at or before each grid point
            for name in predictors:
                per_name[name].append(np.maximum(predicted[name][rows][latest] - (grid - g[latest]), 0))
            per_name["oracle"].append((n - grid).astype(np.float32))
        tables = {name: PredictionTable.from_grid(v, k) for name, v in per_name.items()}
        prompt_len = data.prompt_len[data.gen_prompt[gens]]
        return cls(prompt_len=prompt_len.astype(np.int64), output_len=data.gen_len[gens].astype(np.int64),
                   source=data.prompt_source[data.gen_prompt[gens]].astype(np.int64), tables=tables,
                   max_new_tokens=data.max_new_tokens,
                   description=f"{len(gens)} {split}-split generations of {data.manifest.get('config', {}).get('model')}")


@dataclasses.dataclass(frozen=True)
class Trace:
    """Arrival times (seconds, ascending) and which pool entry each request replays."""

    arrival_s: np.ndarray
    entry: np.ndarray

    def __len__(self) -> int:
        return len(self.arrival_s)


def poisson_trace(pool_size: int, rate_per_s: float, num_requests: int, *, seed: int = 0) -> Trace:
    """Poisson arrivals at `rate_per_s`, entries drawn uniformly (with replacement) from the pool."""
    if rate_per_s <= 0 or num_requests < 1 or pool_size < 1:
        raise ValueError("need rate > 0, at least one request and a non-empty pool")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_per_s, num_requests)
    return Trace(np.cumsum(gaps) - gaps[0], rng.integers(0, pool_size, num_requests))
