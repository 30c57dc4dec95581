"""The simulator's validation against the real cluster (issue 18 E), the parts that need no engine:
the compile watch, the shape buckets a replay can reach (against the scheduler's own bucketing,
enumerated), and the step-model fit on instances that share a host (synthetic step records whose
costs are known)."""

from __future__ import annotations

import dataclasses
import math
import threading
import types

import numpy as np
import pytest

from jaxsys.serve.cluster.router import StepRecord
from jaxsys.serve.cluster.validation import CompileWatch, fit_cluster_hardware, shape_buckets
from jaxsys.serve.engine.engine import EngineConfig
from jaxsys.shapes import pow2_bucket


def test_compile_watch_counts_every_compilation_in_its_window():
    import jax

    f = jax.jit(lambda x: x * 3 + 1)
    with CompileWatch() as watch:
        f(np.ones(7, np.float32))
        f(np.ones(7, np.float32))  # cached: no compilation
        t = threading.Thread(target=lambda: f(np.ones(9, np.float32)))  # on another thread: counted too
        t.start()
        t.join()
    assert watch.count == 2 and watch.seconds > 0
    start, end, _ = watch.spans[0]
    assert watch.overlaps(start, end) and not watch.overlaps(watch.spans[-1][1] + 1.0, watch.spans[-1][1] + 2.0)
    f(np.ones(11, np.float32))  # after the window
    assert watch.count == 2 and watch.summary()["compiles"] == 2


def _scheduler_shapes(cfg: EngineConfig, max_prompt: int, max_context: int):
    """Every (B, P) decode and (B, T, P) prefill shape `Scheduler` can build, by enumeration of its
    bucketing: a decode batch of n rows whose longest context is k; a prefill batch of n rows whose
    longest chunk is c and furthest end e >= c."""
    ps = cfg.page_size
    decode = {(pow2_bucket(n), pow2_bucket(math.ceil(k / ps), minimum=4))
              for n in range(1, cfg.max_decode_batch + 1) for k in range(1, max_context + 1)}
    prefill = {(pow2_bucket(n), pow2_bucket(c, minimum=16), pow2_bucket(math.ceil(e / ps), minimum=4))
               for n in range(1, min(cfg.max_prefill_batch, cfg.max_decode_batch) + 1)
               for c in range(1, min(cfg.prefill_chunk, max_prompt) + 1) for e in range(c, max_prompt + 1)}
    return decode, prefill


@pytest.mark.parametrize("max_prompt,max_context", [(12, 25), (70, 140), (300, 420)])
def test_shape_buckets_are_exactly_the_schedulers(max_prompt, max_context):
    cfg = EngineConfig(page_size=4, num_pages=256, max_decode_batch=6, max_prefill_batch=3, prefill_chunk=64)
    got = shape_buckets(cfg, max_prompt_tokens=max_prompt, max_context_tokens=max_context)
    decode, prefill = _scheduler_shapes(cfg, max_prompt, max_context)
    assert set(got["decode"]) == decode and len(got["decode"]) == len(decode)
    assert set(got["prefill"]) == prefill and len(got["prefill"]) == len(prefill)
    with pytest.raises(ValueError, match="max_prompt_tokens < max_context_tokens"):
        shape_buckets(cfg, max_prompt_tokens=30, max_context_tokens=30)


A, B_, C = 0.02, 0.004, 2e-6  # an instance's own step costs
P0, P1 = 0.03, 5e-5
SLOWDOWN = [1.0, 1.6, 2.3, 3.1]


def _records(rng, n_decode=60, n_prefill=12):
    """Step records of 4 instances whose cycles are their own cost times the slowdown of the
    instances busy at the time."""
    out, t = [], 0.0
    for i in range(n_decode + n_prefill):
        B = int(rng.integers(1, 9))
        K = B * int(rng.integers(40, 400))
        P = int(rng.integers(20, 500)) if i >= n_decode else 0
        busy = int(rng.integers(1, 5))
        own = A + B_ * B + C * K + ((P0 + P1 * P) if P else 0.0)
        cycle = own * SLOWDOWN[busy - 1]
        t += cycle
        out.append(StepRecord(i % 4, B, K, P, 0.0, 0.0, 0.9 * cycle, cycle, 0, busy, t))
    return out


def _instance():
    cfg = EngineConfig(page_size=16, num_pages=1024, max_decode_batch=16, shared_attention=False)
    return types.SimpleNamespace(engine=types.SimpleNamespace(config=cfg), devices=[0, 1])


def test_fit_on_a_shared_host_recovers_an_instances_own_costs():
    """Cycles divided by the measured slowdown fit the costs exactly (and the parameters carry the
    slowdown); fitted as measured, the same cycles leave a large error. A step that overlapped a
    compilation anywhere is left out."""
    records = _records(np.random.default_rng(0))
    hw = fit_cluster_hardware(records, _instance(), kv_bytes_per_token=100, host_slowdown=SLOWDOWN)
    np.testing.assert_allclose([hw.step_a, hw.step_b, hw.step_c], [A, B_, C], rtol=1e-6)
    np.testing.assert_allclose([hw.prefill_p0, hw.prefill_p1], [P0, P1], rtol=1e-5)
    assert hw.step_fit["mape"] < 1e-6 and hw.host_slowdown == SLOWDOWN and "slowdown" in hw.calibrated_on
    assert hw.tpot_slo_s == pytest.approx(2.0 * SLOWDOWN[-1] * (A + B_ * 8 + C * 8 * 600))
    independent = fit_cluster_hardware(records, _instance(), kv_bytes_per_token=100)
    assert independent.host_slowdown is None and independent.step_fit["mape"] > 0.1
    r = records[5]  # a compilation on another thread stalls this step by 2 s (and delays the later ones)
    stalled = (records[:5] + [dataclasses.replace(r, cycle_s=r.cycle_s + 2.0, end_s=r.end_s + 2.0)]
               + [dataclasses.replace(s, end_s=s.end_s + 2.0) for s in records[6:]])
    spans = [(r.end_s + 0.5, r.end_s + 1.5, "decode")]
    hw2 = fit_cluster_hardware(stalled, _instance(), kv_bytes_per_token=100, host_slowdown=SLOWDOWN,
                               compile_spans=spans)
    np.testing.assert_allclose([hw2.step_a, hw2.step_b, hw2.step_c], [A, B_, C], rtol=1e-6)
    assert hw2.step_fit["n"] == hw.step_fit["n"] - 1
