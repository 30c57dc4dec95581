"""What a simulated decode instance costs: a step-time model and a hardware parameter set.

The step-time model is linear in what a decode step reads and computes,

    t_step(B, K) = a + b * B + c * K        (B running requests, K KV-cache tokens they hold)

(`a`: the weights read once per step plus launch overhead; `b`: per-request work such as sampling
and the per-request part of attention; `c`: reading the KV cache), and a prefill costs
`p0 + p1 * tokens`. The CPU-calibrated set fits both to step times measured on our own engine
(`jaxsys.serve.cluster.calibrate`); the H100-like set states its numbers from a roofline of an
8B-class model on one H100 and is labelled simulated.

Instances that share one host (`host_slowdown`). Real accelerators step independently, but the
real cluster this repository can run puts N engine instances on the virtual devices of one CPU
host, where they share its cores: a step takes longer while other instances step too. Such a
parameter set carries the measured slowdown of a step when n instances are busy at once
(`host_slowdown[n - 1]`, 1.0 for one), and `step_a..prefill_p1` are the costs of an instance
stepping alone. None (the default) means independent instances.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from pydantic import field_validator

from jaxsys.config_base import ConfigSection

__all__ = ["HardwareParams", "LinearFit", "h100_like", "fit_linear"]


@dataclasses.dataclass(frozen=True)
class LinearFit:
    """Least-squares fit y ~ X @ coef with its error on the fitted points."""

    coef: tuple[float, ...]
    mape: float  # mean |relative error|
    max_rel_error: float
    n: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fit_linear(X_NxF: np.ndarray, y_N: np.ndarray, *, relative: bool = True) -> LinearFit:
    """Non-negative least squares (coefficients of a cost are never negative), weighted by 1/y
    when `relative` so that small and large step times count alike."""
    from scipy.optimize import nnls

    X = np.asarray(X_NxF, np.float64)
    y = np.asarray(y_N, np.float64)
    if X.ndim != 2 or len(X) != len(y) or len(y) < X.shape[1]:
        raise ValueError(f"need at least {X.shape[1]} measurements with {X.shape[1]} features, got {X.shape}")
    if np.any(y <= 0):
        raise ValueError("measured times must be positive")
    w = 1.0 / y if relative else np.ones_like(y)
    coef, _ = nnls(X * w[:, None], y * w)
    rel = np.abs(X @ coef - y) / y
    return LinearFit(tuple(float(c) for c in coef), float(rel.mean()), float(rel.max()), len(y))


class HardwareParams(ConfigSection):
    """One simulated decode-instance type. Every field is stated, none is hidden in the code."""

    name: str
    calibrated_on: str  # what the numbers come from (a measurement, or a stated roofline)
    step_a: float  # seconds per decode step
    step_b: float  # seconds per running request per step
    step_c: float  # seconds per KV-cache token per step
    prefill_p0: float  # seconds per prefill
    prefill_p1: float  # seconds per prompt token
    kv_capacity_tokens: int  # KV-cache tokens one instance holds
    page_size: int = 16
    max_batch: int  # running requests per instance
    kv_bytes_per_token: int  # what a migration moves per token
    link_bytes_per_s: float  # instance-to-instance bandwidth for KV migration
    migration_latency_s: float  # fixed cost of a migration (handshake, final stop-and-copy)
    ttft_slo_s: float
    tpot_slo_s: float
    step_fit: dict | None = None  # the fit's error when calibrated from measurements
    prefill_fit: dict | None = None
    host_slowdown: list[float] | None = None  # step-time factor with n instances busy on one host, [n - 1]

    @field_validator("kv_capacity_tokens", "max_batch", "kv_bytes_per_token", "page_size")
    @classmethod
    def _positive_int(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @field_validator("step_a", "step_b", "step_c", "prefill_p0", "prefill_p1", "migration_latency_s")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"must be a finite number >= 0, got {v}")
        return v

    @field_validator("link_bytes_per_s", "ttft_slo_s", "tpot_slo_s")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"must be a finite number > 0, got {v}")
        return v

    @field_validator("host_slowdown")
    @classmethod
    def _slowdowns(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not (math.isfinite(x) and x > 0) for x in v)):
            raise ValueError(f"must be a non-empty list of finite factors > 0, got {v}")
        return v

    def step_time(self, batch, kv_tokens):
        """Seconds of one decode step (numpy-broadcasting)."""
        return self.step_a + self.step_b * np.asarray(batch) + self.step_c * np.asarray(kv_tokens)

    def prefill_time(self, tokens):
        return self.prefill_p0 + self.prefill_p1 * np.asarray(tokens)

    def sharing_factor(self, busy: int) -> float:
        """How much longer a step takes while `busy` instances (itself included) step on the same
        host (1.0 for independent instances; beyond the measured counts, the last one)."""
        if self.host_slowdown is None or busy <= 1:
            return 1.0
        return self.host_slowdown[min(busy, len(self.host_slowdown)) - 1]

    def migration_time(self, kv_tokens: int) -> float:
        return self.migration_latency_s + kv_tokens * self.kv_bytes_per_token / self.link_bytes_per_s

    def pages(self, tokens):
        return -(-np.asarray(tokens) // self.page_size)


def h100_like() -> HardwareParams:
    """An 8B-class decoder (Llama-3-8B shapes: 32 layers, 8 KV heads x 128, bf16) on one H100 SXM.

    Roofline at 80% of 3.35 TB/s HBM: the 16 GB of weights read once per step -> 6.0 ms, plus 1 ms
    of launch overhead; 128 KiB of KV per token -> 49 ns per cached token per step; 20 us per
    running request (sampling, small kernels). Prefill at ~60% of 989 TFLOP/s bf16: 16 GFLOP per
    token -> 27 us per token plus 10 ms. KV capacity: 90% of 80 GB minus the weights = 56 GB ->
    427k tokens; at most 256 running requests (vLLM's default max_num_seqs). Migration over a
    400 Gb/s RDMA NIC (50 GB/s) plus 2 ms. SLOs: TTFT 1 s, TPOT 50 ms.
    """
    kv = 2 * 32 * 8 * 128 * 2
    return HardwareParams(
        name="h100-like", calibrated_on="stated roofline of an 8B-class model on one H100 (simulated)",
        step_a=7.0e-3, step_b=20e-6, step_c=kv / (0.8 * 3.35e12), prefill_p0=10e-3, prefill_p1=27e-6,
        kv_capacity_tokens=int((0.9 * 80e9 - 16e9) // kv), max_batch=256, kv_bytes_per_token=kv,
        link_bytes_per_s=50e9, migration_latency_s=2e-3, ttft_slo_s=1.0, tpot_slo_s=0.05)


def step_features(batch: Sequence[float], kv_tokens: Sequence[float]) -> np.ndarray:
    """[N, 3] design matrix of the step-time model: (1, B, K)."""
    b = np.asarray(batch, np.float64)
    return np.stack([np.ones_like(b), b, np.asarray(kv_tokens, np.float64)], axis=1)
