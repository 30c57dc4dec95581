"""The performance model's inputs for a running pipeline, measured on its own devices.

`unit_costs` times the pipeline's unit executables (the same ones every step runs) for one
micro-batch on one device and derives the sizes the memory model needs from the model's shapes;
`local_hardware` states the link and memory figures of the machine (bandwidth is an assumption
the config names, `recovery.link_gbps`; memory is what the device reports, or the host's memory
split over its devices on a CPU). The pipelined trainer measures these at its first failure, so
the choice of strategy rests on this run's own unit times.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.train.pipeline.runtime import PipelineSetup
from jaxsys.train.pipeline.units import UnitPrograms
from jaxsys.train.recovery import model as pm

LINK_LATENCY_S = 50e-6
"""Assumed per-transfer latency between devices."""


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(fn())  # warm (and compile or retarget) once
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def unit_costs(units: UnitPrograms, setup: PipelineSetup, device: jax.Device, *, repeats: int = 5,
               snapshot: bool = True) -> pm.Costs:
    """Median seconds of each unit for one micro-batch on `device` and the byte sizes of the model.

    The backward units re-run their layer's forward (and the head's includes its forward), so the
    model's head forward is 0 and a stage's time is its forwards plus its backwards, as the
    executor runs them. State per parameter: float32 params and two Adam moments (12 bytes), twice
    with the per-step snapshot's replica."""
    cfg = setup.model
    b, T, D = setup.micro_size, setup.seq_len, cfg.hidden_size
    put = lambda x: jax.device_put(x, device)  # noqa: E731
    x = put(jnp.zeros((b, T, D), jnp.dtype(cfg.dtype)))
    tok = put(np.zeros((b, T + 1), np.int32))
    i = put(np.int32(0))
    keys = units.get("keys", device)(i, put(np.arange(b, dtype=np.int32)))
    p_l = put(np.zeros((1, units.layer_size), np.float32))
    p_h = put(np.zeros((units.head_size,), np.float32))
    p_e = put(np.zeros((units.embed_size,), np.float32))
    run = lambda name, *args: (lambda: units.get(name, device)(*args))  # noqa: E731
    itemsize = jnp.dtype(cfg.dtype).itemsize
    act = b * T * D * itemsize
    work = b * T * (6 * D + 3 * cfg.intermediate_size) * itemsize + b * cfg.num_heads * T * T * 4
    return pm.Costs(
        layer_fwd=_median_s(run("layer_forward", p_l, x, i, keys), repeats),
        layer_bwd=_median_s(run("layer_backward", p_l, x, x, i, keys), repeats),
        head_fwd=0.0,
        head_bwd=_median_s(run("head_backward", p_h, x, tok), repeats),
        embed_fwd=_median_s(run("embed_forward", p_e, tok), repeats),
        embed_bwd=_median_s(run("embed_backward", tok, x), repeats),
        act_bytes=float(act), layer_work_bytes=float(work), layer_params=float(units.layer_size),
        edge_params=float(units.embed_size + units.head_size), param_bytes=4.0,
        state_bytes_per_param=24.0 if snapshot else 12.0)


def device_memory_bytes(devices: Sequence[jax.Device]) -> float:
    """What the first device reports as its memory limit; on a backend that reports none (CPU),
    the host's physical memory divided by the device count."""
    try:
        stats = devices[0].memory_stats()
    except Exception:
        stats = None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / len(devices)


def local_hardware(devices: Sequence[jax.Device], *, link_gbps: float, memory_gib: float | None) -> pm.Hardware:
    """The machine as the model sees it: one node of `devices`, links of `link_gbps` GB/s."""
    memory = memory_gib * 2**30 if memory_gib is not None else device_memory_bytes(devices)
    bw = link_gbps * pm.GB
    return pm.Hardware(devices_per_node=len(devices), intra_bw=bw, inter_bw=bw, latency=LINK_LATENCY_S,
                       memory=memory)
