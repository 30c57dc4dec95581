"""This machine's roofline parameters, measured: the `HardwareSpec` the tuner prices a plan with when
no hardware file describes the machine (`gamma="auto"` without one, the CPU benchmark).

Each parameter comes from a microbenchmark of the operation the cost model prices with it, never
from the configurations the tuner is then validated on (the accelerator is the default device):

- memory bandwidth: a [1, D] x [D, 32768] product (a weight far larger than the caches, read once
  per token as decode reads its weights); a plain reduction, recorded beside it, streams faster
  than XLA:CPU's matrix-vector kernel attains;
- the served model's compute (an MoE): one layer of its shapes and its LM head, timed through the
  offloaded runner's own compiled pieces at 1, 2, 4, 8 and 16 rows (`measure_compute`), which the
  tuner prices piecewise-linearly in rows (`tuner.MeasuredCompute`): XLA:CPU's cost per row jumps
  between one row (a matrix-vector kernel) and a few (a general matrix product), exactly where
  verify steps run, so no single FLOP rate prices both;
- FLOP/s (the roofline's, for what the measured pieces do not cover: host attention, a dense
  model): a [rows, D] x [D, 32768] product with `rows` the most tokens a priced step runs; XLA:CPU
  attains far less on such skinny shapes than on a large matmul (recorded beside it);
- link: misses of a device expert cache with the model's expert size (`LayerExpertCache.ensure`:
  the copy from host memory into a slot, with the fixed cost of each small copy), what the runner
  does per fetched expert; the bulk 64 MiB copy rate is recorded beside it;
- overlap: whether such copies run concurrently with compute (fetches dispatched, then a
  matrix-vector product, all awaited, against the two one after the other);
- per-layer and per-step overheads: the offloaded runner's host loop (dispatches, routing
  read-back, cache bookkeeping) on a tiny model of the same depth and experts, all experts
  resident, at two depths; per layer, less the tiny model's own pieces timed as `measure_compute`
  times them (the measured compute already holds their execution).

A dense model moves nothing over the link and runs one compiled step: its link is the bulk copy
rate, with no overlap and no host-loop overheads (unmeasured, taken as 0).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from jaxsys.serve.moe_offload.tuner import HardwareSpec

WIDE = 32768  # columns of the measured weights: 32768 x 576 fp32 is 72 MiB


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_machine(cfg: Any, *, rows: int = 16, context: int = 256,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """{"spec": the HardwareSpec fields, "measured": the side measurements} for a model config
    (its hidden size and expert shapes); rows: the most tokens one priced step runs; context: the
    cached tokens per request the attention piece is timed at."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsys.serve.moe_offload.policy import make_policy
    from jaxsys.serve.moe_offload.store import HostExpertStore, LayerExpertCache

    dev = jax.devices()[0]
    best = lambda fn, n: min(_time(fn) for _ in range(n))  # noqa: E731
    med = lambda fn, n: statistics.median(_time(fn) for _ in range(n))  # noqa: E731
    mm = jax.jit(lambda a, b: a @ b)
    D = cfg.hidden_size

    def matmul_s(m: int, cols: int, n: int = 20) -> float:
        a, b = jnp.ones((m, D), jnp.float32), jnp.ones((D, cols), jnp.float32)
        mm(a, b).block_until_ready()
        return med(lambda: mm(a, b).block_until_ready(), n)

    t_mv = matmul_s(1, WIDE)
    gemv_bw = D * WIDE * 4 / t_mv
    flops = 2 * rows * D * WIDE / matmul_s(rows, WIDE)
    gemm_flops = 2 * 256 * D * 4608 / matmul_s(256, 4608)
    big = jnp.ones((64 * 1024 * 1024 // 4,), jnp.float32)
    red = jax.jit(jnp.sum)
    red(big).block_until_ready()
    stream_bw = big.nbytes / best(lambda: red(big).block_until_ready(), 10)
    x, w = jnp.ones((1, D), jnp.float32), jnp.ones((D, WIDE), jnp.float32)
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    ds = jax.sharding.SingleDeviceSharding(dev)
    host = jax.device_put(np.ones(big.shape, np.float32), pinned)
    host.block_until_ready()
    bulk_link = big.nbytes / best(lambda: jax.device_put(host, ds).block_until_ready(), 10)
    if not cfg.is_moe:  # nothing crosses the link; one compiled step, no host loop per layer
        return _spec(flops, gemv_bw, bulk_link, False, 0.0, 0.0, None,
                     {"stream_bandwidth": stream_bw, "large_matmul_flops": gemm_flops,
                      "bulk_link_bandwidth": bulk_link}, rows, log)
    F, E = cfg.moe_intermediate_size, cfg.num_experts
    rng = np.random.default_rng(0)
    store = HostExpertStore(*(rng.standard_normal(s, np.float32) for s in ((1, E, D, F), (1, E, D, F), (1, E, F, D))),
                            dev)
    cache = LayerExpertCache(store, 0, max(1, E // 2), make_policy("lru")())
    order = [e % E for e in range(2 * E)]  # every expert evicted before it comes back: each ensure misses

    def fetch_all():
        for i, e in enumerate(order):
            cache.ensure([e], i)
        return cache.buf

    fetch_all().block_until_ready()
    t_fetch = med(lambda: fetch_all().block_until_ready(), 20)
    link = len(order) * store.expert_bytes / t_fetch

    def both():
        buf = fetch_all()
        y = mm(x, w)
        jax.block_until_ready((buf, y))

    both()
    t_both = med(both, 20)
    overlap_fraction = (t_fetch + t_mv - t_both) / min(t_fetch, t_mv)
    overlap = bool(overlap_fraction >= 0.5)
    per_layer, per_step = runner_overheads(cfg, prefetch=overlap)
    compute = measure_compute(cfg, context=context)
    return _spec(flops, gemv_bw, link, overlap, per_layer, per_step, compute,
                 {"stream_bandwidth": stream_bw, "large_matmul_flops": gemm_flops, "bulk_link_bandwidth": bulk_link,
                  "expert_copy_s": t_fetch / len(order), "overlap_fraction": overlap_fraction, "overlap": overlap},
                 rows, log)


def _spec(flops, bandwidth, link, overlap, per_layer, per_step, compute, measured, rows, log) -> dict[str, Any]:
    import jax

    spec = {"name": f"this machine ({jax.default_backend()}, measured)",
            "accelerator": {"flops": flops, "bandwidth": bandwidth, "memory_bytes": 1e12},
            "link": {"bandwidth": link, "overlaps_compute": overlap},
            "host": {"flops": flops, "bandwidth": bandwidth, "memory_bytes": 1e12},
            "overhead": {"per_layer_s": per_layer, "per_step_s": per_step},
            "compute": None if compute is None else compute.model_dump()}
    if log is not None and compute is not None:
        log("machine: served model's compute by rows " + ", ".join(
            f"{n}: layer {d * 1e3:.2f}/{v * 1e3:.2f} ms, FFN {f * 1e3:.2f} + {e * 1e3:.3f}/expert ms, head "
            f"{h * 1e3:.1f} ms" for n, d, v, f, e, h in zip(compute.rows, compute.layer_decode_s,
                                                             compute.layer_verify_s, compute.ffn_fixed_s,
                                                             compute.expert_s, compute.head_s)))
    if log is not None:
        log(f"machine: {flops / 1e9:.0f} GFLOP/s at {rows} rows ({measured['large_matmul_flops'] / 1e9:.0f} large), "
            f"{bandwidth / 1e9:.1f} GB/s matrix-vector ({measured['stream_bandwidth'] / 1e9:.1f} streaming), "
            f"{link / 1e9:.2f} GB/s per expert copy ({measured['bulk_link_bandwidth'] / 1e9:.1f} bulk), copy/compute "
            f"overlap {measured.get('overlap_fraction', 0.0):.2f}, runner overhead {per_layer * 1e3:.2f} ms/layer + "
            f"{per_step * 1e3:.2f} ms/step")
    return {"spec": spec, "measured": measured}


_MEASURED: dict[Any, HardwareSpec] = {}


def measure_hardware(cfg: Any, *, context: int = 256, log: Callable[[str], None] | None = None) -> HardwareSpec:
    """`measure_machine`'s `HardwareSpec` (the memory sizes are not measured: 1 TB, no limit),
    measured once per process, model config and context: every engine of that model reuses it."""
    key = (cfg, context)
    if key not in _MEASURED:
        _MEASURED[key] = HardwareSpec.model_validate(measure_machine(cfg, context=context, log=log)["spec"])
    return _MEASURED[key]


CALIBRATION_ROWS = (1, 2, 4, 8, 16)


def _piece_s(model: Any, name: str, args: tuple, reps: int) -> float:
    """Median seconds of one compiled piece of an `OffloadedMoE` on these arguments, awaited (it
    is compiled and run once first)."""
    import jax

    exe = model._compiled(name, args)
    jax.block_until_ready(exe(*args))
    return statistics.median(_time(lambda: jax.block_until_ready(exe(*args))) for _ in range(reps))


def measure_compute(cfg: Any, *, rows: tuple[int, ...] = CALIBRATION_ROWS, context: int = 256, reps: int = 7):
    """A `tuner.MeasuredCompute` of an MoE config: one layer of its shapes (random weights: the
    times do not depend on the values) and its LM head, timed through the offloaded runner's own
    compiled pieces at each row count: the attention piece for `rows` requests of one token and for
    one request of `rows` tokens, each over `context` cached tokens; the FFN over the device cache
    with 1 and with all experts active; the head. Seconds: about 35 small compilations."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsys.models import init_params
    from jaxsys.models.kv_cache import AttentionMetadata, init_cache
    from jaxsys.serve.moe_offload.runner import OffloadConfig, OffloadedMoE
    from jaxsys.serve.moe_offload.tuner import MeasuredCompute, ModelShape, measured_shape

    one = cfg.replace(num_layers=1)
    E, D, page = cfg.num_experts, cfg.hidden_size, 16
    model = OffloadedMoE(one, init_params(one, jax.random.key(0)), OffloadConfig(expert_cache=E, prefetch=False))
    p = model.layer_params[0]

    def attention_args(batch: int, tokens: int) -> tuple:
        pages = -(-(context + tokens) // page)
        table = jnp.asarray(1 + np.arange(batch * pages, dtype=np.int32).reshape(batch, pages))
        meta = AttentionMetadata(table, jnp.full((batch,), context + tokens, jnp.int32))
        positions = jnp.asarray(context + np.broadcast_to(np.arange(tokens, dtype=np.int32), (batch, tokens)))
        x = jax.random.normal(jax.random.key(1), (batch, tokens, D), jnp.dtype(cfg.dtype))
        return x, p, p, positions, init_cache(one, 1 + batch * pages, page), jnp.int32(0), meta

    out: dict[str, list[float]] = {k: [] for k in ("layer_decode_s", "layer_verify_s", "ffn_fixed_s", "expert_s",
                                                    "head_s")}
    for n in rows:
        decode = attention_args(n, 1)
        out["layer_decode_s"].append(_piece_s(model, "pre_device", decode, reps))
        out["layer_verify_s"].append(_piece_s(model, "pre_device", attention_args(1, n), reps))
        acc, h, top_i, top_v = model._call("pre_device", *decode)[:4]
        ffn = []
        for u in (1, E):
            ids = np.arange(u, dtype=np.int32)
            ffn.append(_piece_s(model, "ffn", (acc, h, top_i, top_v, model.caches[0].buf, ids, ids,
                                               np.ones(u, bool)), reps))
        per_expert = max(ffn[1] - ffn[0], 0.0) / max(E - 1, 1)
        out["expert_s"].append(per_expert)
        out["ffn_fixed_s"].append(max(ffn[0] - per_expert, 0.0))
        out["head_s"].append(_piece_s(model, "head", (model.top, decode[0]), reps))
    return MeasuredCompute(shape=measured_shape(ModelShape.from_config(cfg)), context=context, rows=tuple(rows),
                           **{k: tuple(v) for k, v in out.items()})


def runner_overheads(cfg: Any, *, prefetch: bool, steps: int = 20) -> tuple[float, float]:
    """(per-layer, per-step) seconds of the offloaded runner's host loop: decode steps of a tiny
    model with `cfg`'s depth, experts and top-k (negligible compute, every expert resident after
    the first step), at full depth and at a third of it. Per layer, the tiny model's own pieces
    (timed by `measure_compute`: one row, its top-k experts active) are taken out: a priced step
    adds the served model's measured pieces."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsys.models import init_params
    from jaxsys.models.kv_cache import AttentionMetadata, init_cache
    from jaxsys.serve.moe_offload.runner import OffloadConfig, OffloadedMoE

    def tiny_cfg(layers: int) -> Any:
        return cfg.replace(num_layers=layers, hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=32,
                           vocab_size=256, intermediate_size=64, moe_intermediate_size=16,
                           shared_expert_intermediate_size=32 if cfg.shared_expert_intermediate_size else 0)

    def step_s(layers: int) -> float:
        tiny = tiny_cfg(layers)
        model = OffloadedMoE(tiny, init_params(tiny, jax.random.key(0)),
                             OffloadConfig(expert_cache=tiny.num_experts, prefetch=prefetch))
        page, prompt = 16, 4
        pages = -(-(prompt + 2 * steps + 8) // page)
        cache = init_cache(tiny, 1 + pages, page)
        table = jnp.asarray(1 + np.arange(pages, dtype=np.int32)[None])
        n = prompt

        def run(tokens, positions):
            nonlocal cache
            meta = AttentionMetadata(table, jnp.asarray([n], jnp.int32))
            logits, cache = model.forward(tokens, positions, cache=cache, meta=meta)
            return np.asarray(logits)

        run(np.arange(1, prompt + 1, dtype=np.int32)[None], np.arange(prompt, dtype=np.int32)[None])

        def one():
            nonlocal n
            n += 1
            run(np.array([[1]], np.int32), np.array([[n - 1]], np.int32))

        for _ in range(4):
            one()
        return statistics.median(_time(one) for _ in range(steps))

    deep, shallow = cfg.num_layers, max(1, cfg.num_layers // 3)
    t_deep, t_shallow = step_s(deep), step_s(shallow)
    per_layer = max(t_deep - t_shallow, 0.0) / max(deep - shallow, 1)
    per_step = max(t_deep - deep * per_layer, 0.0)
    pieces = measure_compute(tiny_cfg(1), rows=(1,), context=16)
    k = cfg.num_experts_per_tok
    return max(per_layer - pieces.layer(1, 1) - pieces.experts(1, k, cfg.num_experts), 0.0), per_step
