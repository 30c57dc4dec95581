"""Routing statistics of an MoE on real text: what expert offloading and its tuner depend on.

From a routing trace top_i [L, B, T, k] (`moefy.routing_trace`) with a validity mask [B, T]:

- expert-use skew: per layer, the busiest expert's share of routed slots over the uniform share
  k / E (1 = perfectly balanced), and the normalized entropy of the use distribution;
- consecutive-token overlap: |S_t & S_t+1| / k, the experts the next token reuses;
- unique experts U(b, t): distinct experts per layer needed by t consecutive tokens of each of b
  sequences, the load of one verify step (t = gamma + 1) over a batch of b requests;
- LRU hit rate by cache size, replaying each sequence's decode order per layer.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np


def _valid_runs(top_LxBxTxK: np.ndarray, valid_BxT: np.ndarray) -> list[np.ndarray]:
    """Per sequence, its valid tokens' routing [L, n, k] (valid tokens form a prefix)."""
    return [top_LxBxTxK[:, b, :int(valid_BxT[b].sum())] for b in range(valid_BxT.shape[0])]


def usage_skew(top_LxBxTxK: np.ndarray, valid_BxT: np.ndarray, num_experts: int) -> dict[str, Any]:
    L, _, _, k = top_LxBxTxK.shape
    picks = top_LxBxTxK[:, valid_BxT]  # [L, N, k]
    share = np.stack([np.bincount(picks[i].ravel(), minlength=num_experts) for i in range(L)]).astype(float)
    share /= share.sum(1, keepdims=True)
    max_over_uniform = share.max(1) * num_experts
    ent = -(share * np.log(np.maximum(share, 1e-12))).sum(1) / np.log(num_experts)
    return {"max_share_over_uniform_mean": float(max_over_uniform.mean()),
            "max_share_over_uniform_max": float(max_over_uniform.max()),
            "normalized_entropy_mean": float(ent.mean()), "per_layer_max_share_over_uniform":
            [round(float(x), 3) for x in max_over_uniform]}


def consecutive_overlap(top_LxBxTxK: np.ndarray, valid_BxT: np.ndarray) -> float:
    k = top_LxBxTxK.shape[-1]
    vals = []
    for run in _valid_runs(top_LxBxTxK, valid_BxT):
        for a, b in zip(run[:, :-1].reshape(-1, k), run[:, 1:].reshape(-1, k)):
            vals.append(len(set(a.tolist()) & set(b.tolist())) / k)
    return float(np.mean(vals))


def unique_experts(top_LxBxTxK: np.ndarray, valid_BxT: np.ndarray, batches: list[int], windows: list[int],
                   samples: int = 200, seed: int = 0) -> dict[str, float]:
    """Mean distinct experts per layer for b sequences x t consecutive tokens: {"b,t": U}."""
    rng = np.random.default_rng(seed)
    runs = _valid_runs(top_LxBxTxK, valid_BxT)
    L = top_LxBxTxK.shape[0]
    out = {}
    for b in batches:
        for t in windows:
            eligible = [r for r in runs if r.shape[1] >= t]
            vals = []
            for _ in range(samples):
                pick = rng.choice(len(eligible), size=min(b, len(eligible)), replace=len(eligible) < b)
                chunks = []
                for i in pick:
                    s = rng.integers(0, eligible[i].shape[1] - t + 1)
                    chunks.append(eligible[i][:, s:s + t].reshape(L, -1))
                merged = np.concatenate(chunks, axis=1)
                vals.append(np.mean([len(np.unique(merged[layer])) for layer in range(L)]))
            out[f"{b},{t}"] = float(np.mean(vals))
    return out


def lru_hit_rate(top_LxBxTxK: np.ndarray, valid_BxT: np.ndarray, cache_sizes: list[int]) -> dict[int, float]:
    """Hit rate of a per-layer LRU cache of each size over each sequence's decode order (one token
    per step; the cache starts cold for each sequence)."""
    out = {}
    for c in cache_sizes:
        hits = total = 0
        for run in _valid_runs(top_LxBxTxK, valid_BxT):
            for layer in run:
                lru: OrderedDict[int, None] = OrderedDict()
                for experts in layer:
                    for e in experts.tolist():
                        total += 1
                        if e in lru:
                            hits += 1
                            lru.move_to_end(e)
                        else:
                            lru[e] = None
                    while len(lru) > c:
                        lru.popitem(last=False)
        out[c] = hits / max(total, 1)
    return out
