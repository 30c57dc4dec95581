"""The attention benchmark's measuring phases: the configurations, the calibration of the
balancer's cost model, and the host plan at engine shapes (the tuning phases are `sweeps.py`)."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.pallas_kernels import shared_prefix_attention as spa
from jaxsys.pallas_kernels.shapes import pow2_bucket
from jaxsys.pallas_kernels.shared_prefix_attention import calibration
from jaxsys.pallas_kernels.shared_prefix_attention.kernel import item_rows, launches

from . import baselines
from .configs import ENGINE_SHAPES, HEAD_DIM, HKV, HQ, PAGE, Config, EngineShape, byte_ratio, engine_tree, page_tables
from .harness import GIB, Runner, kv_bytes, median, mem_available, peak_bandwidth, time_round_robin


def plan_record(plan: spa.StepPlan) -> dict:
    return {"use_sharing": plan.use_sharing, "shared_nodes": len(plan.shared_nodes),
            "step_shape": dataclasses.asdict(plan.shape), "kv_tokens_read": plan.kv_tokens_read,
            "predicted_cost_plain": plan.cost_plain, "predicted_cost_chosen": plan.cost_chosen}


# -- the configurations ----------------------------------------------------------------------------


def run_config(runner: Runner, cfg: Config, repeats: int, seed: int, *, with_launches: bool = False) -> list[dict]:
    """Every variant on one configuration: ours and split-KV at each precision, naive, and on a GPU
    JAX's kernels with their tuned parameters. Each variant's output is checked against ours (at
    the first precision) as `max_abs_diff_vs_ours`. One record per variant (and precision)."""
    rng = np.random.default_rng(seed)
    tree, total_pages = runner.tree(cfg, rng)
    ratio = byte_ratio(tree)
    b = tree.num_requests
    k_pages, v_pages = runner.pools(total_pages, seed)
    plans = {p: spa.plan_step(tree, block_sizes=o.block_sizes, cost_model=o.cost_model)
             for p, o in runner.ours.items()}
    bp = max(plan.shape.num_requests for plan in plans.values())
    q = runner.queries(bp, seed)
    steps = {p: jax.device_put(plan.step) for p, plan in plans.items()}
    table_p, lengths_p = page_tables(tree, bp)
    lengths = lengths_p[:b]
    table, lengths_j = jnp.asarray(table_p), jnp.asarray(lengths_p)
    fns, notes, variant = {}, {}, {}
    for p in runner.precisions:
        ours, splitkv = runner.ours_fn(p), runner.splitkv_fn(p)
        fns[("ours", p)] = functools.partial(ours, q, k_pages, v_pages, steps[p])
        fns[("splitkv", p)] = functools.partial(splitkv, q, k_pages, v_pages, table, lengths_j)
    itemsize = runner.dtype.itemsize
    kv_naive = 2.0 * b * int(lengths.max()) * HKV * HEAD_DIM * itemsize  # [B, Hkv, L, D] K and V
    avail = mem_available()
    k_c = v_c = None
    if runner.gpu or avail is None or 2.0 * kv_naive + 2 * GIB < avail:
        k_c = runner.contiguous(k_pages, table_p, int(lengths.max()))
        v_c = runner.contiguous(v_pages, table_p, int(lengths.max()))
        fns[("naive", None)] = functools.partial(runner.naive, q, k_c, v_c, lengths_j)
    else:
        notes[("naive", None)] = (f"skipped: duplicated KV needs {kv_naive / GIB:.1f} GiB (x2 with temporaries), "
                                  f"{avail / GIB:.1f} GiB available")
    if runner.gpu:
        inputs = {"q": q, "k_pages": k_pages, "v_pages": v_pages, "k_c": k_c, "v_c": v_c, "table": table,
                  "lengths": lengths_j}
        for name in baselines.BASELINES:
            params = runner.baseline_params.get(name) or baselines.default_params(name, itemsize)
            variant[name] = params
            try:
                fns[(name, None)] = baselines.baseline_fn(name, runner, inputs, params)
            except Exception as e:  # noqa: BLE001 - recorded: the configuration still has the others
                notes[(name, None)] = f"did not run with {params}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    # warm up (compile) and check every variant against ours
    outs = {k: np.asarray(jax.block_until_ready(f()), np.float32)[0, :b] for k, f in fns.items()}
    truth = outs[("ours", runner.precisions[0])]
    times = runner.per_call(time_round_robin(fns, repeats))
    med = {k: median(t) for k, t in times.items()}
    every_token = kv_bytes(float(lengths.sum()), itemsize)  # what a variant that shares nothing reads
    records = []
    for key in list(fns) + [k for k in notes if k not in fns]:
        name, p = key
        rec = {"config": cfg.name, "label": cfg.label, "variant": name, "precision": p, "byte_ratio": round(ratio, 4),
               "params": cfg.params(), "num_requests": b}
        if name in variant:
            rec["kernel_params"] = variant[name]
        if key in notes:
            records.append({**rec, "median_s": None, "note": notes[key]})
            continue
        rec.update(median_s=med[key], min_s=min(times[key]), times_s=[round(t, 7) for t in times[key]],
                   max_abs_diff_vs_ours=float(np.max(np.abs(outs[key] - truth))))
        if runner.gpu:
            read = kv_bytes(plans[p].kv_tokens_read, itemsize) if name == "ours" else every_token
            peak = peak_bandwidth()
            rec.update(bytes_read=read, achieved_bandwidth_Bps=read / med[key],
                       fraction_of_peak_bandwidth=None if peak is None else read / med[key] / peak)
        if name == "ours":
            others = {"naive": ("naive", None), "splitkv": ("splitkv", p),
                      **{b_: (b_, None) for b_ in baselines.BASELINES}}
            for other, k in others.items():
                rec[f"speedup_vs_{other}"] = med[k] / med[key] if k in med else None
            jax_times = [med[(b_, None)] for b_ in baselines.BASELINES if (b_, None) in med]
            rec["speedup_vs_jax_best"] = min(jax_times) / med[key] if jax_times else None
            rec["plan"] = plan_record(plans[p])
            rec["block_sizes"] = runner.ours[p].block_sizes.to_dict()
            if with_launches and runner.gpu:
                rec["launches"] = launch_times(runner, p, q, k_pages, v_pages, steps[p], repeats)
        records.append(rec)
    del k_c, v_c
    return records


def launch_times(runner: Runner, precision: str, q, k_pages, v_pages, step, repeats: int) -> dict:
    """GPU: each launch of ours (`kernel.launches`) timed alone, where a step's time goes: the
    median per call and, for the two KV launches, the KV bytes and bandwidth; for the items,
    `query_row_tokens` (`kernel.item_rows`: the rows x KV tokens that hold a query, that the
    kernel multiplies, and that it would multiply untiered). Their sum falls short of ours' time
    by the launches' gaps and XLA's reshapes."""
    bs = runner.ours[precision].block_sizes
    run = launches(block_sizes=bs, group=HQ // HKV, sm_scale=runner.scale, precision=precision,
                   interpret=runner.interpret)
    sharing = step.item_pages.shape[0] > 0 and step.merge_rows.shape[1] > 0
    parts = {"private_pages": runner.layered(run.private_pages)}
    if sharing:
        parts["items"] = runner.layered(run.items)
    partials = {n: jax.block_until_ready(f(q, k_pages, v_pages, step)) for n, f in parts.items()}
    merge = runner.layered(lambda ps, st: run.merge(ps[0], ps[1], st, out_dtype=q.dtype))
    merge_in = ((partials["private_pages"], partials.get("items")), step)
    jax.block_until_ready(merge(*merge_in))
    fns = {n: functools.partial(f, q, k_pages, v_pages, step) for n, f in parts.items()}
    fns["merge"] = functools.partial(merge, *merge_in)
    times = runner.per_call(time_round_robin(fns, repeats))
    read = {"private_pages": kv_bytes(float(jnp.sum(step.private_page_lens)), runner.dtype.itemsize),
            "items": kv_bytes(float(jnp.sum(step.item_page_lens)), runner.dtype.itemsize)}
    out = {}
    for n, ts in times.items():
        out[n] = {"median_s": median(ts)}
        if n in read:
            out[n].update(kv_bytes_read=read[n], achieved_bandwidth_Bps=read[n] / median(ts))
    if sharing:
        out["items"]["query_row_tokens"] = item_rows(jax.device_get(step), HQ // HKV, bs)
    return out


# -- calibration ------------------------------------------------------------------------------------


def calibrate(runner: Runner, precision: str, repeats: int, seed: int, quick: bool) -> tuple[dict, spa.CostModel]:
    """Times the calibration trees (`calibration` module: stars of s requests below P shared
    tokens) plain and shared with ours' tiles at `precision`, and fits the cost model. Ratios come
    from the same tree timed round-robin; the fit uses the fastest repeat. Returns (the JSON
    record: the points and the fit, the fitted `CostModel`)."""
    bs = runner.ours[precision].block_sizes
    rng = np.random.default_rng(seed)
    chunk = bs.items.chunk_pages * PAGE
    # --quick and --interpret (shrunk trees): the smallest lengths that still give the shared fit
    # two distinct chunk counts
    lengths = ([n * runner.shrink for n in (chunk // 2, chunk, 2 * chunk)] if quick or runner.interpret
               else list(calibration.LENGTHS))
    fn = runner.ours_fn(precision)
    points, fns = [], {}
    for s in calibration.item_sizes(bs.items.query_block):
        for length in lengths:
            tree, total = runner.tree(Config("cal", f"{s} x {length}", "star", B=s, P=length, S=16 if quick else 64), rng)
            k_pages, v_pages = runner.pools(total, seed)
            q = runner.queries(pow2_bucket(s), seed)
            for mode in ("plain", "share"):
                st = spa.forced_plan(tree, share=mode == "share", block_sizes=bs).step
                chunk_tokens = int((st.item_page_lens.sum(axis=1) > 0).sum()) * chunk
                fns[(mode, s, length)] = functools.partial(fn, q, k_pages, v_pages, jax.device_put(st))
                jax.block_until_ready(fns[(mode, s, length)]())
                points.append({"mode": mode, "s": s, "P": length, "request_tokens": s * length,
                               "chunk_tokens": chunk_tokens})
    times = runner.per_call(time_round_robin(fns, repeats))
    for p in points:
        ts = times[(p["mode"], p["s"], p["P"])]
        p.update(median_s=median(ts), min_s=min(ts))
    record, fitted = calibration.fit_cost_model(points)
    return {"precision": precision, "block_sizes": bs.to_dict(), "points": points, **record,
            "derived_cost_model": fitted.to_dict(), "cost_model_in_use": runner.ours[precision].cost_model.to_dict()}, fitted


# -- the host plan at engine shapes ---------------------------------------------------------------


def time_plan(runner: Runner, precision: str, repeats: int, shapes: tuple[EngineShape, ...] = ENGINE_SHAPES) -> list[dict]:
    """Per engine shape: the host's work per decode step (the scheduler's `PrefixTree` of the batch
    and `plan_step`, once for all layers; numpy on this machine's CPU, not shrunk) next to ours'
    device time for the step's attention (one layer's call x layers). Medians (and minima) over
    `repeats` x 20 plans."""
    out = []
    for shape in shapes:
        tuned = spa.get_default(runner.device_kind, runner.dtype.name, precision,
                                q_per_kv=shape.num_q_heads // shape.num_kv_heads, head_dim=shape.head_dim,
                                page_size=PAGE)
        tree, total = engine_tree(shape)
        args = dict(page_size=tree.page_size, node_parent=tree.node_parent, node_pages=tree.node_pages,
                    node_lens=tree.node_lens, request_nodes=tree.request_nodes)
        tree_s, plan_s = [], []
        for _ in range(max(repeats, 3) * 20):
            t0 = time.perf_counter()
            t = spa.PrefixTree(**args)
            t1 = time.perf_counter()
            plan = spa.plan_step(t, block_sizes=tuned.block_sizes, cost_model=tuned.cost_model,
                                 min_requests=shape.requests)
            t2 = time.perf_counter()
            tree_s.append(t1 - t0)
            plan_s.append(t2 - t1)
        host = [a + b for a, b in zip(tree_s, plan_s)]
        attention_s = _attention_per_layer(runner, shape, tuned, precision, repeats)
        rec = {"shape": dataclasses.asdict(shape), "precision": precision, "tables": tuned.source,
               "use_sharing": plan.use_sharing, "step_shape": dataclasses.asdict(plan.shape),
               "tree_median_s": median(tree_s), "plan_median_s": median(plan_s), "host_median_s": median(host),
               "host_min_s": min(host), "attention_per_layer_s": attention_s,
               "attention_per_step_s": attention_s * shape.layers,
               "host_fraction_of_attention": median(host) / (attention_s * shape.layers)}
        print(f"plan: {shape.label}: host {rec['host_median_s'] * 1e3:.3f} ms per step (tree "
              f"{rec['tree_median_s'] * 1e3:.3f} + plan {rec['plan_median_s'] * 1e3:.3f}), attention "
              f"{rec['attention_per_step_s'] * 1e3:.3f} ms per step ({shape.layers} layers), sharing={plan.use_sharing}",
              flush=True)
        out.append(rec)
    return out


def _attention_per_layer(runner: Runner, shape: EngineShape, tuned: spa.Defaults, precision: str, repeats: int) -> float:
    """Median device time of ours on the engine shape's step, one layer (the shape shrunk under --interpret)."""
    tree, total = engine_tree(shape, shrink=runner.shrink)
    plan = spa.plan_step(tree, block_sizes=tuned.block_sizes, cost_model=tuned.cost_model, min_requests=shape.requests)
    kk, kv = jax.random.split(jax.random.PRNGKey(0))
    kv_shape = (shape.num_kv_heads, total, PAGE, shape.head_dim)
    k_pages, v_pages = jax.random.normal(kk, kv_shape, runner.dtype), jax.random.normal(kv, kv_shape, runner.dtype)
    q = jax.random.normal(jax.random.PRNGKey(1), (runner.layers, plan.shape.num_requests, shape.num_q_heads,
                                                  shape.head_dim), runner.dtype)
    fn = runner.ours_fn(precision, tuned.block_sizes)
    step = jax.device_put(plan.step)
    jax.block_until_ready(fn(q, k_pages, v_pages, step))
    return median(runner.per_call(time_round_robin({"ours": lambda: fn(q, k_pages, v_pages, step)}, repeats))["ours"])
