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
        i = self._next
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
    """Ours. predictor: the name of a prediction table in the workload ("oracle" = the truth)."""

    predictor: str = "ours"
    alpha: float = 0.5  # weight of the current load in the blend (1 - alpha: predicted future load)
    threshold: float = 0.1  # migrate when blended loads differ by more than this (relative to the mean)
    min_remaining_steps: int = 32  # do not move requests predicted to finish sooner
    name: str = "ours"
    migrates = True
    uses_future = True

    def bind(self, workload):
        from jaxsys.serve.length.predictor import warn_untrained

        self._fallback = self.predictor not in workload.tables
        if self._fallback:
            warn_untrained(f"the workload has no {self.predictor!r} predictions")
            self.uses_future = False
            return None
        self.uses_future = True
        return workload.tables[self.predictor]

    def _load(self, cluster) -> np.ndarray:
        hw = cluster.hw
        current = hw.step_b * (cluster.batch + cluster.queue_len) + hw.step_c * (cluster.kv_tokens +
                                                                                  cluster.queued_tokens)
        if self._fallback:
            return current
        return self.alpha * current + (1 - self.alpha) * cluster.future_cost

    def dispatch(self, cluster, rid: int) -> int:
        return int(np.argmin(self._load(cluster) + 1e-9 * np.arange(cluster.cfg.num_instances)))

    def rebalance(self, cluster) -> list[tuple[int, int, int]]:
        load = self._load(cluster)
        scale = max(float(load.mean()), 1e-12)
        out = []
        max_pairs = max(1, int(self.max_pairs_fraction * cluster.cfg.num_instances))
        for hi, lo in _pairs(load / scale, self.threshold, max_pairs):
            inst = cluster.instances[hi]
            if inst.migrating_out:
                continue
            slots = np.nonzero(inst.active & ~inst.needs_prefill)[0]
            rids = inst.rid[slots]
            keep = ~cluster.migrating[rids]
            slots, rids = slots[keep], rids[keep]
            if not len(slots):
                continue
            rem = cluster.predicted_remaining(rids) if not self._fallback else np.full(len(rids), np.inf)
            worth = rem >= self.min_remaining_steps
            if not worth.any():
                continue
            slots, rids, rem = slots[worth], rids[worth], rem[worth]
            ctx = inst.ctx[slots]
            if self._fallback:
                contrib = cluster.hw.step_b + cluster.hw.step_c * ctx
            else:
                H = cluster.cfg.horizon_steps
                run = np.minimum(rem, H)
                contrib = self.alpha * (cluster.hw.step_b + cluster.hw.step_c * ctx) + (1 - self.alpha) * (
                    run / H) * (cluster.hw.step_b + cluster.hw.step_c * (ctx + run / 2))
            gap = load[hi] - load[lo]
            best = int(np.argmin(np.abs(gap - 2 * contrib)))
            if 2 * contrib[best] >= 2 * gap:  # moving it would make the imbalance worse
                continue
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
