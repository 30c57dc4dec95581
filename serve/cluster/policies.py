"""Dispatch and rescheduling policies over decode instances.

A policy sees the cluster's load arrays (`sim.Cluster`: running requests, KV tokens, used pages,
queued tokens, and for predictive policies the predicted future step cost per instance) and
answers two questions: where a new request goes (`dispatch`) and, every rebalance interval,
which running requests move where (`rebalance`).

- `RoundRobin`: instance i, i + 1, ... regardless of load.
- `LeastKV`: the instance holding the fewest KV tokens, queued ones included.
- `LlumnixStyle`: Llumnix's approach on current load: dispatch to the least loaded instance
  (used plus queued KV over capacity, its "virtual usage"), and migrate from the most to the least
  loaded instance when their loads differ by more than a threshold, choosing the running request
  with the least KV (the cheapest to move).
- `Predictive` (ours, ARES/STAR): the load of an instance is a blend of its current step cost
  and its *predicted* step cost over the next H steps, computed from each running request's
  predicted remaining length (re-predicted every k steps from its hidden state). Dispatch goes to
  the lowest blended load; migration moves, from the highest to the lowest, the request whose
  predicted future cost best halves the gap, among those predicted to run long enough to be worth
  the move. With no usable predictor it falls back to balancing on current load, with a warning.

Tunables (thresholds) are fields, so a benchmark gives every migrating policy the same grid.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["LeastKV", "LlumnixStyle", "POLICIES", "Predictive", "RoundRobin", "make_policy"]


class _Policy:
    name = "policy"
    migrates = False
    uses_future = False
    max_pairs_fraction = 0.25  # at most this fraction of instances start a migration per tick

    def bind(self, workload):
        """The prediction table the simulator should serve this policy (None: no predictions)."""
        return None

    def reset(self, cluster) -> None:
        pass

    def dispatch(self, cluster, rid: int) -> int:
        raise NotImplementedError

    def rebalance(self, cluster) -> list[tuple[int, int, int]]:
        return []


class RoundRobin(_Policy):
    name = "round_robin"

    def reset(self, cluster) -> None:
        self._next = 0

    def dispatch(self, cluster, rid: int) -> int:
        i = self._next % cluster.cfg.num_instances  # the count shrinks when a live instance stops
        self._next = (i + 1) % cluster.cfg.num_instances
        return i


class LeastKV(_Policy):
    name = "least_kv"

    def dispatch(self, cluster, rid: int) -> int:
        return int(np.argmin(cluster.kv_tokens + cluster.queued_tokens))


def _current_load(cluster) -> np.ndarray:
    """Llumnix's virtual usage: used plus queued KV, over capacity."""
    return (cluster.used_pages + cluster.queued_tokens / cluster.hw.page_size) / cluster.capacity_pages


def _pairs(load: np.ndarray, threshold: float, max_pairs: int) -> list[tuple[int, int]]:
    """(most loaded, least loaded) pairs, outside in, while the gap exceeds the threshold."""
    order = np.argsort(load, kind="stable")
    out = []
    for k in range(min(max_pairs, len(order) // 2)):
        lo, hi = int(order[k]), int(order[-1 - k])
        if load[hi] - load[lo] <= threshold:
            break
        out.append((hi, lo))
    return out


@dataclasses.dataclass
class LlumnixStyle(_Policy):
    threshold: float = 0.1  # migrate when virtual usages differ by more than this (fraction of capacity)
    name: str = "llumnix"
    migrates = True

    def dispatch(self, cluster, rid: int) -> int:
        return int(np.argmin(_current_load(cluster)))

    def rebalance(self, cluster) -> list[tuple[int, int, int]]:
        out = []
        max_pairs = max(1, int(self.max_pairs_fraction * cluster.cfg.num_instances))
        for hi, lo in _pairs(_current_load(cluster), self.threshold, max_pairs):
            inst = cluster.instances[hi]
            if inst.migrating_out:
                continue
            slots = np.nonzero(inst.active & ~inst.needs_prefill)[0]
            slots = slots[~cluster.migrating[inst.rid[slots]]]
            if not len(slots):
                continue
            s = slots[np.argmin(inst.ctx[slots])]
            out.append((int(inst.rid[s]), hi, lo))
        return out


@dataclasses.dataclass
class Predictive(_Policy):
    """Ours. predictor: the name of a prediction table in the workload ("oracle" = the truth).

    Load of an instance = alpha * current virtual usage (Llumnix's) + (1 - alpha) * predicted peak
    usage over the next `horizon_steps` steps, where the predicted usage at step j counts every
    running or queued request still predicted to run at j with its context grown by j tokens. A
    migration moves, from the highest to the lowest loaded instance, the request that minimises
    the larger of the two loads after the move, among requests predicted to run at least
    `min_remaining_steps` more steps (moving one about to finish only costs bandwidth).
    """

    predictor: str = "ours"
    alpha: float = 0.3
    threshold: float = 0.1  # migrate when loads differ by more than this (fraction of capacity)
    min_remaining_steps: int = 32
    name: str = "ours"
    migrates = True
    uses_future = True

    def bind(self, workload):
        from jaxsys.serve.length.predictor import warn_untrained

        self._fallback = self.predictor not in workload.tables
        self.uses_future = not self._fallback
        if self._fallback:
            warn_untrained(f"the workload has no {self.predictor!r} predictions")
            return None
        return workload.tables[self.predictor]

    def _load(self, cluster) -> np.ndarray:
        current = _current_load(cluster)
        if self._fallback:
            return current
        peak = cluster.future_profile.max(axis=1) / cluster.hw.kv_capacity_tokens
        return self.alpha * current + (1 - self.alpha) * peak

    def dispatch(self, cluster, rid: int) -> int:
        return int(np.argmin(self._load(cluster)))

    def rebalance(self, cluster) -> list[tuple[int, int, int]]:
        load = self._load(cluster)
        cap_pages, cap_tokens = cluster.capacity_pages, cluster.hw.kv_capacity_tokens
        out = []
        max_pairs = max(1, int(self.max_pairs_fraction * cluster.cfg.num_instances))
        for hi, lo in _pairs(load, self.threshold, max_pairs):
            inst = cluster.instances[hi]
            if inst.migrating_out:
                continue
            slots = np.nonzero(inst.active & ~inst.needs_prefill)[0]
            rids = inst.rid[slots]
            keep = ~cluster.migrating[rids]
            slots, rids = slots[keep], rids[keep]
            if not self._fallback and len(rids):
                worth = cluster.predicted_remaining(rids) >= self.min_remaining_steps
                slots, rids = slots[worth], rids[worth]
            if not len(rids):
                continue
            moved_pages = cluster.hw.pages(inst.ctx[slots]) / cap_pages
            new_hi = self.alpha * (_current_load(cluster)[hi] - moved_pages)
            new_lo = self.alpha * (_current_load(cluster)[lo] + moved_pages)
            if self._fallback:
                new_hi, new_lo = new_hi / self.alpha, new_lo / self.alpha
            else:
                prof = cluster.kv_profile(rids, inst.ctx[slots])
                new_hi = new_hi + (1 - self.alpha) * (cluster.future_profile[hi] - prof).max(1) / cap_tokens
                new_lo = new_lo + (1 - self.alpha) * (cluster.future_profile[lo] + prof).max(1) / cap_tokens
            worst = np.maximum(new_hi, new_lo)
            best = int(np.argmin(worst))
            if worst[best] < load[hi] - 1e-9:  # the move lowers the larger load
                out.append((int(rids[best]), hi, lo))
        return out


POLICIES = ("round_robin", "least_kv", "llumnix", "ours")


def make_policy(name: str, **kw) -> _Policy:
    """A fresh policy by name ("ours_oracle": ours on the true remaining lengths)."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_kv":
        return LeastKV()
    if name == "llumnix":
        return LlumnixStyle(**kw)
    if name == "ours":
        return Predictive(**kw)
    if name == "ours_oracle":
        return Predictive(predictor="oracle", name="ours_oracle", **kw)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES + ('ours_oracle',))}")
