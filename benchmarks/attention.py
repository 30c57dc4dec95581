"""Shared-prefix decode attention: ours vs naive (duplicated KV) vs split-KV paged decode, per prefix-tree config.

Every variant runs in the same process on the same inputs, jitted and warmed up; repeats are
timed round-robin across the variants of a configuration (so load from other processes on a
shared machine hits all of them alike), each with block_until_ready, and the record keeps the
median. Variants:

  naive    decode over per-request duplicated contiguous KV ([B, Hkv, L, D] per request)
  splitkv  FlashDecoding-style split-KV paged decode: streams the shared pages once per request
  ours     shared-prefix attention: each shared KV chunk read once for all requests below it,
           partials merged by LSE; the balancer falls back to splitkv when sharing does not pay
  jax_decode_attention  (GPU only) jax.experimental.pallas.ops.gpu.decode_attention.gqa on
           contiguous KV, another baseline; GPU records also report achieved bandwidth.
  jax_paged_attention   (GPU only) jax.experimental.pallas.ops.gpu.paged_attention on the same
           page pool and tables as splitkv: JAX's own paged decode, no sharing.

On a GPU the "ours" record also has `launches`: each of its launches (split-KV pages, shared
items, merge) timed alone, with the KV bandwidth of the first two (`launch_times`).

On CPU "ours"/"splitkv" are the XLA paths; on a GPU they are the Pallas (Triton) kernels.
Configurations (Hq=32, Hkv=8, head_dim=128, fp32, page_size=16; P shared prefix, S suffix,
B requests): C1 B=32 P=8192 S=128; C2 B=8 P=16384 S=512/2048/8192; C3 B=4/16/64 P=S=2048;
C4 binary trees of depth 2/4/6 with 1024 tokens per node, and 16 chains of 7 nodes (no
sharing); C5 B=16 P=16384 S=512. byte_ratio = sum_i(P + S_i) / (P + sum_i S_i).

Two more sections back the tuned tables in pallas_kernels/shared_prefix_attention/
tuned_block_sizes.py: "tuning" (split and chunk sizes) and "calibration" (the balancer's cost
model: a least-squares fit of step time against plain tokens and shared chunk tokens, from which
the sharing threshold is derived; see `calibrate`).

Writes benchmarks/results/attention.json and attention.png (--quick: attention_quick.*).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HQ, HKV, HEAD_DIM, PAGE = 32, 8, 128, 16
GIB = 2.0**30
# GPU: attention calls per timed sample (see Runner).
GPU_LAYERS = 16
INTERPRET_SHRINK = 64

# HBM peak bandwidth (bytes/s) by device kind substring, for the GPU records.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12,
                  "L40S": 0.864e12, "L4": 0.3e12}


@dataclasses.dataclass(frozen=True)
class Config:
    name: str  # C1, C2, ...
    label: str
    kind: str  # "star" | "binary" | "chains"
    B: int = 0
    P: int = 0
    S: int = 0
    depth: int = 0
    node_tokens: int = 1024
    vs_naive: float | None = None  # target: None -> 0.5 * byte_ratio
    vs_splitkv: float | None = None


def configs(quick: bool) -> list[Config]:
    if quick:  # smoke run: same shapes of tree, 1/8 of the tokens
        return [
            Config("C1", "C1 B=8 P=1024 S=16", "star", B=8, P=1024, S=16, vs_naive=5.0, vs_splitkv=1.5),
            Config("C3", "C3 B=4 P=S=256", "star", B=4, P=256, S=256, vs_splitkv=0.9),
            Config("C4", "C4 binary depth 2", "binary", depth=2, node_tokens=128),
            Config("C4", "C4 chain", "chains", B=4, depth=2, node_tokens=128, vs_splitkv=0.9),
        ]
    return [
        Config("C1", "C1 B=32 P=8192 S=128", "star", B=32, P=8192, S=128, vs_naive=5.0, vs_splitkv=1.5),
        Config("C2", "C2 B=8 P=16384 S=512", "star", B=8, P=16384, S=512, vs_splitkv=1.5),
        Config("C2", "C2 B=8 P=16384 S=2048", "star", B=8, P=16384, S=2048),
        Config("C2", "C2 B=8 P=16384 S=8192", "star", B=8, P=16384, S=8192),
        Config("C3", "C3 B=4 P=S=2048", "star", B=4, P=2048, S=2048, vs_splitkv=0.9),
        Config("C3", "C3 B=16 P=S=2048", "star", B=16, P=2048, S=2048),
        Config("C3", "C3 B=64 P=S=2048", "star", B=64, P=2048, S=2048),
        Config("C4", "C4 binary depth 2", "binary", depth=2),
        Config("C4", "C4 binary depth 4", "binary", depth=4),
        Config("C4", "C4 binary depth 6", "binary", depth=6),
        Config("C4", "C4 chain (16 x 7 nodes, no sharing)", "chains", B=16, depth=6, vs_splitkv=0.9),
        Config("C5", "C5 B=16 P=16384 S=512", "star", B=16, P=16384, S=512, vs_naive=5.0, vs_splitkv=1.5),
    ]


# -- trees -----------------------------------------------------------------------------------------


def build_tree(cfg: Config, rng):
    """(PrefixTree, total pages). Pages are a random permutation of the pool (a used cache)."""
    import numpy as np

    from jaxsys.pallas_kernels.shared_prefix_attention import PrefixTree

    parent, lens, requests = [], [], []
    if cfg.kind == "star":
        parent.append(-1)
        lens.append(cfg.P)
        for _ in range(cfg.B):
            parent.append(0)
            lens.append(cfg.S)
            requests.append(len(parent) - 1)
    elif cfg.kind == "binary":
        parent.append(-1)
        lens.append(cfg.node_tokens)
        frontier = [0]
        for _ in range(cfg.depth):
            nxt = []
            for p in frontier:
                for _ in range(2):
                    parent.append(p)
                    lens.append(cfg.node_tokens)
                    nxt.append(len(parent) - 1)
            frontier = nxt
        requests = frontier
    elif cfg.kind == "chains":
        for _ in range(cfg.B):
            prev = -1
            for _ in range(cfg.depth + 1):
                parent.append(prev)
                lens.append(cfg.node_tokens)
                prev = len(parent) - 1
            requests.append(prev)
    else:
        raise ValueError(cfg.kind)
    n_pages = [-(-n // PAGE) for n in lens]
    pool = rng.permutation(sum(n_pages)).astype(np.int32)
    off = np.cumsum([0] + n_pages)
    tree = PrefixTree(page_size=PAGE, node_parent=np.array(parent),
                      node_pages=tuple(pool[off[i]:off[i + 1]] for i in range(len(lens))),
                      node_lens=np.array(lens), request_nodes=np.array(requests))
    return tree, int(pool.shape[0])


def byte_ratio(tree) -> float:
    used = {n for r in range(tree.num_requests) for n in tree.path(r)}
    return float(tree.request_lengths().sum()) / float(sum(int(tree.node_lens[n]) for n in used))


def page_tables(tree, num_rows: int | None = None):
    """Classic per-request page tables (the nodes here are page aligned) and lengths (i32),
    with `num_rows` rows (default: one per request; padding rows have no pages, length 0)."""
    import numpy as np

    from jaxsys.pallas_kernels.shared_prefix_attention import bucket

    tables = [np.concatenate([tree.node_pages[n] for n in tree.path(r)]) for r in range(tree.num_requests)]
    rows = len(tables) if num_rows is None else num_rows
    out = np.zeros((rows, bucket(max(t.shape[0] for t in tables))), np.int32)
    for r, t in enumerate(tables):
        out[r, :t.shape[0]] = t
    lengths = np.zeros((rows,), np.int32)
    lengths[:len(tables)] = tree.request_lengths()
    return out, lengths


# -- helpers ---------------------------------------------------------------------------------------


def mem_available() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def time_round_robin(fns: dict, repeats: int) -> dict[str, list[float]]:
    """fns: name -> zero-arg callable returning jax arrays. Rotates the order every repeat."""
    import jax

    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[n]())
            times[n].append(time.perf_counter() - t0)
    return times


def median(xs):
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def naive_decode(q, k, v, lengths, *, sm_scale):
    """Plain jnp decode attention over contiguous per-request KV.

    q: [B, Hq, D]; k, v: [B, Hkv, L, D]; lengths: i32[B]."""
    import jax
    import jax.numpy as jnp

    b, hq, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    qq = q.reshape(b, hkv, hq // hkv, d)
    s = jnp.einsum("bhgd,bhld->bhgl", qq, k, precision=jax.lax.Precision.HIGHEST) * sm_scale
    mask = jnp.arange(length)[None, :] < lengths[:, None]
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgl,bhld->bhgd", p, v, precision=jax.lax.Precision.HIGHEST)
    return o.reshape(b, hq, d)


class Runner:
    """Builds inputs and the jitted variants for one platform.

    On a GPU one timed call runs a variant `layers` times inside one jit, on `layers` different
    query batches against the same KV (like the layers of one decode step, which share the
    step's plan), and the per-call time is the sample over `layers`: it is the device time of
    one attention call, not Python dispatch (~tens of microseconds, as much as the whole kernel
    for the smallest configurations). The KV one call reads in the configurations and the
    tuning trees (>= 100 MB) is larger than a GPU's L2, so later layers do not find it cached.
    On CPU, `layers` is 1.
    """

    def __init__(self, gpu: bool, dtype: str = "float32", fp32_dot: str = "auto", interpret: bool = False,
                 unrolled: bool = False):
        import jax
        import jax.numpy as jnp

        from jaxsys.pallas_kernels import shared_prefix_attention as spa

        self.jax, self.jnp, self.spa = jax, jnp, spa
        self.gpu = gpu
        # --interpret: the GPU path (kernels, sweeps, JAX's kernels) in the Pallas interpreter on
        # CPU, every tree 1/INTERPRET_SHRINK of its tokens and 2 layers: checks the script, times nothing.
        self.interpret = interpret
        self.shrink = INTERPRET_SHRINK if interpret else 1
        self.dtype = jnp.dtype(dtype)
        self.fp32_dot = fp32_dot
        self.layers = (2 if interpret else GPU_LAYERS) if gpu else 1
        self.unrolled = unrolled
        self.platform = "gpu" if gpu else "cpu"
        self.cost_model = spa.get_cost_model(self.platform, self.dtype.name, fp32_dot)
        if self.shrink > 1:  # overheads are in tokens: shrunk with the trees, so they share as on a GPU
            cm = self.cost_model
            self.cost_model = dataclasses.replace(
                cm, step_overhead=cm.step_overhead / self.shrink, item_overhead=cm.item_overhead / self.shrink,
                step_overhead_by_size=tuple((n, o / self.shrink) for n, o in cm.step_overhead_by_size))
        self.scale = 1.0 / math.sqrt(HEAD_DIM)
        from jaxsys.pallas_kernels.shared_prefix_attention import tuned_block_sizes

        key = (self.platform, HQ // HKV, HEAD_DIM, PAGE, self.dtype.name)
        table = tuned_block_sizes.TUNED_BLOCK_SIZES.get(self.platform, {})
        self.block_sizes_from = next((f"tuned_block_sizes.py {k}" for k in (key + (fp32_dot,), key) if k in table),
                                     "platform default (untuned)")
        self.set_block_sizes(spa.get_block_sizes(*key, fp32_dot=fp32_dot))
        self.naive = self.layered(lambda q, k, v, ln: naive_decode(q, k, v, ln, sm_scale=self.scale))

    def tree(self, cfg: Config, rng):
        """`build_tree` of the configuration, shrunk under --interpret."""
        if self.shrink > 1:
            cfg = dataclasses.replace(cfg, P=-(-cfg.P // self.shrink), S=-(-cfg.S // self.shrink),
                                      node_tokens=-(-cfg.node_tokens // self.shrink))
        return build_tree(cfg, rng)

    def set_block_sizes(self, bs) -> None:
        self.block_sizes = bs
        self.ours = self.layered(self.ours_single(bs))
        if self.gpu:
            paged = functools.partial(self.spa.paged_attention, fp32_dot=self.fp32_dot, interpret=self.interpret)
        else:
            paged = self.spa.paged_attention_xla
        self.splitkv = self.layered(lambda q, k, v, pt, ln: paged(q, k, v, pt, ln, block_sizes=bs))

    def ours_single(self, bs, fp32_dot: str | None = None):
        spa = self.spa
        fp32_dot = fp32_dot or self.fp32_dot
        if self.gpu:
            return lambda q, k, v, s: spa.shared_prefix_attention(q, k, v, s, block_sizes=bs, fp32_dot=fp32_dot,
                                                                  interpret=self.interpret)
        return lambda q, k, v, s: spa.shared_prefix_attention_xla(q, k, v, s, block_sizes=bs)

    def layered(self, f, unrolled: bool | None = None):
        """jit of (xs, *rest) -> f(xs[i], *rest) per layer, stacked; xs and f's output are
        arrays or pytrees of them with a leading [layers] axis (qs [layers, B, Hq, D] -> [layers,
        B, Hq, D] for the attention variants).

        A loop (`lax.map`): one compilation of each kernel however many layers; or, with
        `unrolled` (default: --unrolled), the layers one after another, no device loop between
        them."""
        jax = self.jax
        if self.layers == 1 or (self.unrolled if unrolled is None else unrolled):
            def run(xs, *rest):
                outs = [f(jax.tree.map(lambda x: x[i], xs), *rest) for i in range(self.layers)]
                return jax.tree.map(lambda *ys: self.jnp.stack(ys), *outs)
            return jax.jit(run)
        return jax.jit(lambda xs, *rest: jax.lax.map(lambda x: f(x, *rest), xs))

    def pools(self, total_pages, seed):
        jax, jnp = self.jax, self.jnp
        kk, kv = jax.random.split(jax.random.PRNGKey(seed))
        shape = (HKV, total_pages, PAGE, HEAD_DIM)
        return jax.random.normal(kk, shape, self.dtype), jax.random.normal(kv, shape, self.dtype)

    def queries(self, b, seed):
        """[layers, b, Hq, D]: one query batch per layer."""
        return self.jax.random.normal(self.jax.random.PRNGKey(seed + 7), (self.layers, b, HQ, HEAD_DIM),
                                      self.dtype)

    def contiguous(self, pages, table, length):
        """[B, Hkv, L, D] per-request copy of the paged KV (built outside any timing)."""
        jnp = self.jnp
        n = -(-length // PAGE)
        out = jnp.transpose(pages[:, table[:, :n]], (1, 0, 2, 3, 4)).reshape(table.shape[0], HKV, n * PAGE, HEAD_DIM)
        return self.jax.block_until_ready(out)

    def per_call(self, times: dict[str, list[float]]) -> dict[str, list[float]]:
        return {n: [t / self.layers for t in ts] for n, ts in times.items()}


def kv_bytes(tokens: float, itemsize: int) -> float:
    """Bytes of K and V for `tokens` tokens of every KV head."""
    return 2.0 * tokens * HKV * HEAD_DIM * itemsize


def cost_model_dict(cm) -> dict:
    """A `CostModel` as JSON (its fields, and the sharing threshold they imply)."""
    return {**dataclasses.asdict(cm), "sharing_threshold": cm.sharing_threshold()}


def cost_model_from_dict(d: dict, spa, **replace):
    """The `CostModel` of a `cost_model_dict` (JSON lists back to tuples), fields in `replace`
    replaced."""
    fields = {f.name for f in dataclasses.fields(spa.CostModel)}
    kw = {k: tuple(map(tuple, v)) if isinstance(v, list) else v for k, v in d.items() if k in fields}
    return spa.CostModel(**{**kw, **replace})


def plan_info(plan) -> dict:
    return {"use_sharing": plan.use_sharing, "shared_nodes": len(plan.shared_nodes),
            "step_shape": dataclasses.asdict(plan.shape), "kv_tokens_read": plan.kv_tokens_read,
            "predicted_cost_plain": plan.cost_plain, "predicted_cost_chosen": plan.cost_chosen}


# -- the configurations -----------------------------------------------------------------------------


def run_config(runner: Runner, cfg: Config, repeats: int, seed: int) -> list[dict]:
    import numpy as np

    jax, jnp, spa = runner.jax, runner.jnp, runner.spa
    rng = np.random.default_rng(seed)
    tree, total_pages = runner.tree(cfg, rng)
    ratio = byte_ratio(tree)
    b = tree.num_requests
    k_pages, v_pages = runner.pools(total_pages, seed)
    plan = spa.plan_step(tree, block_sizes=runner.block_sizes, cost_model=runner.cost_model)
    bp = plan.shape.num_requests
    q = runner.queries(bp, seed)
    step = jax.device_put(plan.step)
    table_p, lengths_p = page_tables(tree, bp)
    lengths = lengths_p[:b]
    table_j, lengths_j = jnp.asarray(table_p), jnp.asarray(lengths_p)
    fns = {
        "ours": lambda: runner.ours(q, k_pages, v_pages, step),
        "splitkv": lambda: runner.splitkv(q, k_pages, v_pages, table_j, lengths_j),
    }
    itemsize = runner.dtype.itemsize
    kv_bytes_naive = 2.0 * b * int(lengths.max()) * HKV * HEAD_DIM * itemsize
    avail = mem_available()
    notes = {}
    k_c = v_c = None
    naive_fits = runner.gpu or avail is None or 2.0 * kv_bytes_naive + 2 * GIB < avail
    if naive_fits:
        k_c = runner.contiguous(k_pages, table_p, int(lengths.max()))
        v_c = runner.contiguous(v_pages, table_p, int(lengths.max()))
        fns["naive"] = lambda: runner.naive(q, k_c, v_c, lengths_j)
        if runner.gpu:
            fns["jax_decode_attention"] = jax_decode_attention_fn(runner, q, k_c, v_c, lengths_j)
    else:
        notes["naive"] = (f"skipped: duplicated KV needs {kv_bytes_naive / GIB:.1f} GiB (x2 with "
                          f"temporaries), {avail / GIB:.1f} GiB available")
    if runner.gpu:
        paged, note = jax_paged_attention_fn(runner, q, k_pages, v_pages, table_j, lengths_j)
        if paged is None:
            notes["jax_paged_attention"] = note
        else:
            fns["jax_paged_attention"] = paged
    # Warm up (compile) and check every variant against ours.
    outs = {n: np.asarray(jax.block_until_ready(f()), np.float32)[0, :b] for n, f in fns.items()}
    max_diff = {n: float(np.max(np.abs(o - outs["ours"]))) for n, o in outs.items()}
    times = runner.per_call(time_round_robin(fns, repeats))
    med = {n: median(t) for n, t in times.items()}
    every_token = kv_bytes(float(lengths.sum()), itemsize)  # what a variant that shares nothing reads
    bytes_read = {"ours": kv_bytes(plan.kv_tokens_read, itemsize), "splitkv": every_token, "naive": every_token,
                  "jax_decode_attention": every_token, "jax_paged_attention": every_token}
    records = []
    for n in list(fns) + [n for n in notes if n not in fns]:
        rec = {"config": cfg.name, "label": cfg.label, "variant": n, "byte_ratio": round(ratio, 4),
               "params": {k: v for k, v in dataclasses.asdict(cfg).items()
                          if k not in ("vs_naive", "vs_splitkv", "name", "label") and v},
               "num_requests": b}
        if n in notes:
            rec.update(median_s=None, speedup_vs_naive=None, speedup_vs_splitkv=None, note=notes[n])
            records.append(rec)
            continue
        rec["median_s"] = med[n]
        rec["min_s"] = min(times[n])
        rec["times_s"] = [round(t, 6) for t in times[n]]
        rec["speedup_vs_naive"] = med["naive"] / med[n] if "naive" in med else None
        rec["speedup_vs_splitkv"] = med["splitkv"] / med[n]
        rec["max_abs_diff_vs_ours"] = max_diff[n]
        if runner.gpu:
            rec["bytes_read"] = bytes_read[n]
            rec["achieved_bandwidth_Bps"] = bytes_read[n] / med[n]
            peak = peak_bandwidth()
            rec["fraction_of_peak_bandwidth"] = None if peak is None else bytes_read[n] / med[n] / peak
        if n == "ours":
            rec["plan"] = plan_info(plan)
            if runner.gpu:
                rec["launches"] = launch_times(runner, q, k_pages, v_pages, step, repeats)
            t_naive = cfg.vs_naive if cfg.vs_naive is not None else 0.5 * ratio
            rec["targets"] = {"speedup_vs_naive": round(t_naive, 3), "speedup_vs_splitkv": cfg.vs_splitkv}
            rec["meets_targets"] = {
                "vs_naive": None if rec["speedup_vs_naive"] is None else bool(rec["speedup_vs_naive"] >= t_naive),
                "vs_splitkv": None if cfg.vs_splitkv is None else bool(rec["speedup_vs_splitkv"] >= cfg.vs_splitkv),
            }
        records.append(rec)
    del k_c, v_c
    return records


def launch_times(runner: Runner, q, k_pages, v_pages, step, repeats: int) -> dict:
    """GPU: each launch of ours timed alone, where the time of a step goes.

    The launches are the kernel module's own (`_private_partials`, `_shared_partials`,
    `_merge`), called as `shared_prefix_attention` calls them, each in its own jit over the
    layers (the merge over each layer's partials, computed outside the timing). Per launch: the
    median per call and, for the two KV launches, the KV bytes it reads and the bandwidth that
    gives; for the items, `query_row_tokens` (`kernel.item_rows`: query rows x KV tokens that
    hold a query, that the kernel multiplies, and that it would multiply untiered). Their sum
    falls short of ours' time by the launches' gaps and XLA's reshapes.
    """
    from jaxsys.pallas_kernels.shared_prefix_attention import kernel as spk

    jax, jnp = runner.jax, runner.jnp
    bs, interpret = runner.block_sizes, runner.interpret
    precision = spk._dot_precision(runner.fp32_dot, k_pages.dtype, interpret)
    kw = dict(block_sizes=bs, sm_scale=runner.scale, interpret=interpret, precision=precision)
    g = HQ // HKV

    def private(q1, k, v, st):
        return spk._private_partials(spk._queries(q1, k)[0], k, v, st.private_pages, st.private_page_lens, **kw)

    def items(q1, k, v, st):
        return spk._shared_partials(spk._queries(q1, k)[0], k, v, st, g=g, **kw)

    sharing = step.item_pages.shape[0] > 0 and step.merge_rows.shape[1] > 0
    parts = {"private_pages": runner.layered(private)}
    if sharing:
        parts["items"] = runner.layered(items)
    partials = {n: jax.block_until_ready(f(q, k_pages, v_pages, step)) for n, f in parts.items()}
    merge_kw = dict(gm=spk._pow2_at_least(g, 1), out_dtype=q.dtype, block_sizes=bs, interpret=interpret)
    if sharing:
        merge = runner.layered(lambda ps, st: spk._merge(st.merge_rows, *ps[2:], *ps[:2],
                                                         query_block=st.item_queries.shape[1], group=g, **merge_kw))
        merge_in = (partials["private_pages"] + partials["items"], step)
    else:
        merge = runner.layered(lambda ps: spk._merge(None, None, None, *ps, **merge_kw))
        merge_in = (partials["private_pages"],)
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
    if sharing:  # what the items multiply: rows that hold a query, rows run (row_tiers), all rows
        out["items"]["query_row_tokens"] = spk.item_rows(step, g, bs)
    return out


def peak_bandwidth() -> float | None:
    import jax

    kind = jax.devices()[0].device_kind
    for key, bw in PEAK_BANDWIDTH.items():  # most specific first
        if key in kind:
            return bw
    return None


def jax_decode_attention_fn(runner: Runner, q, k_c, v_c, lengths):
    """JAX's own Pallas GPU decode attention on the same (contiguous) KV, as a baseline.

    `decode_attention.gqa` takes K/V as [B, L, Hkv, D] and transposes them to [B, Hkv, L, D]
    inside, a full copy of the KV on every call; we call its per-head kernel
    (`decode_attn_unbatched`, vmapped over batch and KV heads exactly as `gqa` does) on the
    [B, Hkv, L, D] copy directly, so the baseline pays for attention only. The KV is padded
    (outside the timing) to the multiple of k_splits * block_k its kernel needs; its dots use
    Triton's default fp32 precision (TF32, ~1e-3 relative), ours `--fp32-dot` (default
    fp32-accurate 3xTF32; `tf32` for the like-for-like comparison).
    """
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu import decode_attention

    k_splits, block_k = 16, 128
    b, hkv, length, d = k_c.shape
    padded = -(-length // (k_splits * block_k)) * (k_splits * block_k)
    pad = ((0, 0), (0, 0), (0, padded - length), (0, 0))
    k_p, v_p = jnp.pad(k_c, pad), jnp.pad(v_c, pad)  # [B, Hkv, L', D]
    inner = functools.partial(
        decode_attention.decode_attn_unbatched, sm_scale=runner.scale, block_h=16, block_k=block_k,
        k_splits=k_splits, num_warps=None, num_stages=2, grid=None, interpret=runner.interpret, debug=False,
        return_residuals=False, normalize_output=True)
    per_head = jax.vmap(jax.vmap(inner, in_axes=(0, 0, 0, None, None)), in_axes=(0, 0, 0, None, 0))

    def one(q, k, v, ln):
        qq = q.reshape(b, hkv, q.shape[1] // hkv, d)
        return per_head(qq, k, v, None, ln).reshape(q.shape)

    fn = runner.layered(one)
    jax.block_until_ready((k_p, v_p))
    return lambda: fn(q, k_p, v_p, lengths)


def jax_paged_attention_fn(runner: Runner, q, k_pages, v_pages, table, lengths):
    """JAX's own Pallas GPU paged attention (`jax.experimental.pallas.ops.gpu.paged_attention`)
    on the same page pool and page tables as our split-KV kernel: the like-for-like baseline of
    paged decode without sharing (JAX's decode_attention reads contiguous KV, which a paged
    cache does not have). Its defaults (16 splits, 8 warps, 2 stages; TF32 dots on fp32) but
    for the tile: 8 pages (its default) for 16-bit KV, 4 for fp32 (8 fp32 pages x 2 stages
    overflow shared memory), halved while Triton cannot compile it. Its kernel takes no softmax
    scale: the queries are scaled outside the timing. Returns (callable, None) or (None, why)."""
    import jax
    import jax.numpy as jnp

    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as jpa
    except ImportError as e:
        return None, f"not in this jax: {e}"
    k_splits = 16
    width = -(-table.shape[1] // k_splits) * k_splits
    table = jnp.pad(table, ((0, 0), (0, width - table.shape[1])))
    q = jax.block_until_ready(q * jnp.asarray(runner.scale, q.dtype))  # its kernel does not scale
    errors = []
    # its default tile is 8 pages; start at the largest that fits before (fp32: 4), and remember
    # what compiled for the next configuration
    start = getattr(runner, "jax_paged_tile", 8 if runner.dtype.itemsize <= 2 else 4)
    for ppcb in (n for n in (8, 4, 2) if n <= start):
        fn = runner.layered(functools.partial(jpa.paged_attention, pages_per_compute_block=ppcb,
                                              k_splits=k_splits, interpret=runner.interpret))
        try:
            jax.block_until_ready(fn(q, k_pages, v_pages, table, lengths))
        except Exception as e:  # noqa: BLE001 - a tile Triton rejects: try a smaller one
            errors.append(f"pages_per_compute_block={ppcb}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        runner.jax_paged_tile = ppcb
        return (lambda: fn(q, k_pages, v_pages, table, lengths)), None
    return None, "did not compile: " + " | ".join(errors)


# -- tuning and calibration -------------------------------------------------------------------------


def tune(runner: Runner, repeats: int, seed: int, budget_s: float | None = None, progress=None) -> dict:
    """Sweeps split_pages (plain path), on a GPU the split-KV launch's own tile (pages per step,
    warps, stages, 3D or flat KV tiles) and min_split_programs (small batches: the split-KV
    launch's smallest width), chunk_pages x query_block (shared path) and, on a GPU,
    pages_per_compute_block x num_warps x num_stages x flat_kv (the kernels' inner tile, launch
    width, pipelining depth and tile shape), prefetch (the next KV tile loaded before the current
    one is used), row_tiers (items with few requests on fewer rows), min_shared_items (shorter
    shared items where a step has few) and merge_block (partials the merge folds per step), then
    times the best setting with 3xTF32, one TF32 and IEEE fp32 dots.

    Each sweep starts from the best of the one before; a setting that does not compile (e.g.
    Triton out of shared memory) is recorded with its error and skipped. Returns the records
    and `best`, the tuned `BlockSizes` as a dict, and `elapsed_s` per sweep.

    budget_s: once the sweeps have taken this long, the ones left are not run (listed in
    `skipped`) and `best` is the best so far: a device call has a hard time limit, and the
    configurations still need their share of it. progress(out), when given, is called after
    every sweep with the results so far (`best` included), so a run cut short keeps them.
    """
    import numpy as np

    jax, spa = runner.jax, runner.spa
    out = {}
    rng = np.random.default_rng(seed)
    base = runner.block_sizes
    t_start = time.perf_counter()
    out["elapsed_s"], out["skipped"] = {}, []

    def timed(name: str, variants: dict, trees, names, fp32_dot=None):
        """Runs one sweep as out[name] (the next sweeps start from the key it returns) unless
        the budget is spent: then it is listed in out["skipped"] and returns None."""
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            out["skipped"].append(name)
            print(f"tuning: {name} skipped (the {budget_s:.0f}s tuning budget is spent)", flush=True)
            return None
        t0 = time.perf_counter()
        out[name], best = sweep(variants, trees, names, fp32_dot)
        out["elapsed_s"][name] = round(time.perf_counter() - t0, 1)
        print(f"tuning: {name} best {best} [{out['elapsed_s'][name]:.0f}s]", flush=True)
        return best

    def checkpoint(bs):
        out["best"] = dataclasses.asdict(bs)
        if progress is not None:
            progress(out)

    def choose(name: str, variants: dict, trees, names) -> None:
        """One sweep (`timed`); the next ones start from its fastest variant (from the sizes so
        far when it was skipped or nothing ran), recorded as `best`."""
        nonlocal base
        base = variants.get(timed(name, variants, trees, names), base)
        checkpoint(base)

    def sweep(variants: dict, trees, names, fp32_dot=None):
        """Times `variants` (key -> BlockSizes) on each (label, tree, k, v, q, force) of `trees`.
        Returns the records (a key's parts named by `names`) and the key fastest summed over the
        trees (None when none ran)."""
        records, total = [], {key: 0.0 for key in variants}
        for label, tr, kp, vp, qq, force in trees:
            fns, errors = {}, {}
            for key, bs in variants.items():
                try:
                    plan = spa.plan_step(tr, block_sizes=bs, cost_model=runner.cost_model, force=force)
                    fns[key] = _ours_fn(runner, bs, qq, kp, vp, jax.device_put(plan.step),
                                        fp32_dot=(fp32_dot or {}).get(key))
                except Exception as e:  # noqa: BLE001 - a setting the compiler rejects is a result
                    errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            times = runner.per_call(time_round_robin(fns, repeats)) if fns else {}
            med = {key: median(times[key]) for key in fns}
            for key in variants:
                records.append({**dict(zip(names, key if isinstance(key, tuple) else (key,))), "config": label,
                                "median_s": med.get(key), **({"error": errors[key]} if key in errors else {})})
            total = {key: t + med[key] for key, t in total.items() if key in med}
        return records, (min(total, key=total.get) if total else None)

    def tree_set(cfg, seed_offset):
        tr, n_pages = runner.tree(cfg, rng)
        kp, vp = runner.pools(n_pages, seed + seed_offset)
        return cfg.label, tr, kp, vp, runner.queries(spa.bucket(tr.num_requests), seed)

    plain = tree_set(Config("tune", "plain B=8 L=8192", "chains", B=8, depth=0, node_tokens=8192), 0) + ("plain",)
    variants = {}
    for sp in (8, 16, 32, 64, 128):
        variants[sp] = dataclasses.replace(base, split_pages=sp,
                                           pages_per_compute_block=min(base.pages_per_compute_block, sp),
                                           split_pages_per_compute_block=min(base.split_pages_per_compute_block, sp),
                                           chunk_pages=max(base.chunk_pages, sp))
    chunk_pages = base.chunk_pages  # raised in the variants only to keep them valid
    choose("split_pages", variants, [plain], ("split_pages",))
    base = dataclasses.replace(base, chunk_pages=chunk_pages)
    checkpoint(base)

    if runner.gpu:
        # The split-KV launch's own tile (its programs hold 16 query rows, a shared item's up to
        # query_block x G): on the same plain tree.
        # Each as [pages, page_size, D] blocks and as flat token rows (`split_flat_kv`): which of
        # the two Triton copies 16 bytes at a time depends on the tile.
        variants = {}
        for ppcb, warps, stages in ((2, 4, 2), (2, 4, 3), (4, 4, 2), (4, 4, 3), (4, 8, 3), (8, 8, 1), (8, 8, 2)):
            if base.split_pages % ppcb:
                continue
            for flat in (0, 1):
                variants[(ppcb, warps, stages, flat)] = dataclasses.replace(
                    base, split_pages_per_compute_block=ppcb, split_num_warps=warps, split_num_stages=stages,
                    split_flat_kv=flat)
        choose("split_launch_tile", variants, [plain],
               ("split_pages_per_compute_block", "split_num_warps", "split_num_stages", "split_flat_kv"))
        # How many programs the split-KV launch needs before a small batch of long requests
        # fills the GPU (the kernel halves the split until it has them): summed over a small
        # plain batch and the private launch of a star (its suffixes are the split-KV part).
        small = [tree_set(Config("tune", "plain B=4 L=4096", "chains", B=4, depth=0, node_tokens=4096), 2)
                 + ("plain",),
                 tree_set(Config("tune", "star B=8 P=4096 S=512", "star", B=8, P=4096, S=512), 2) + ("share",)]
        variants = {n: dataclasses.replace(base, min_split_programs=n) for n in (0, 512, 1024)}
        choose("min_split_programs", variants, small, ("min_split_programs",))

    star = tree_set(Config("tune", "star B=32 P=8192 S=128", "star", B=32, P=8192, S=128), 1) + ("share",)
    variants = {}
    for cp in (16, 32, 64) if runner.gpu else (16, 32, 64, 128):
        for qb in (4, 8, 16, 32) if runner.gpu else (8, 16, 32):
            # on a GPU, items of >= 64 query rows also with 8 warps: at 4, 128 rows spill
            # registers (`make kernel-report`), which would rule out reading a chunk once for 32
            # requests before the warp count is swept
            for warps in (base.num_warps, 8) if runner.gpu and qb * (HQ // HKV) >= 64 else (base.num_warps,):
                if cp % base.pages_per_compute_block == 0:
                    variants[(cp, qb, warps)] = dataclasses.replace(base, chunk_pages=cp, query_block=qb,
                                                                    num_warps=warps)
    choose("chunk_pages_x_query_block", variants, [star], ("chunk_pages", "query_block", "num_warps"))

    if runner.gpu:
        variants = {}
        for ppcb, warps, stages in ((2, 4, 2), (2, 4, 3), (2, 8, 2), (4, 4, 2), (4, 4, 3), (4, 8, 2),
                                    (4, 8, 3), (8, 4, 1), (8, 8, 1), (8, 8, 2)):
            split_ok = base.split_pages_per_compute_block or base.split_pages % ppcb == 0
            if not (split_ok and base.chunk_pages % ppcb == 0 and ppcb * PAGE >= 16):
                continue
            for flat in (0, 1):
                variants[(ppcb, warps, stages, flat)] = dataclasses.replace(
                    base, pages_per_compute_block=ppcb, num_warps=warps, num_stages=stages, flat_kv=flat)
        choose("pages_per_compute_block_x_num_warps_x_num_stages", variants, [star],
               ("pages_per_compute_block", "num_warps", "num_stages", "flat_kv"))
        # Software prefetch of the next KV tile, on the star and the plain tree (summed).
        variants = {n: dataclasses.replace(base, prefetch=n) for n in (0, 1)}
        choose("prefetch", variants, [star, plain], ("prefetch",))
        # Items on fewer rows where they hold fewer requests (8 requests under a query block of
        # 32 fill 32 of its 128 rows, as in C2; a binary tree's nodes 2-16): a star of 8, a
        # depth-4 binary tree, and the B=32 star, whose full items show what the branches cost.
        few = tree_set(Config("tune", "star B=8 P=8192 S=512", "star", B=8, P=8192, S=512), 4) + ("share",)
        tree4 = tree_set(Config("tune", "binary depth 4", "binary", depth=4), 5) + ("share",)
        variants = {n: dataclasses.replace(base, row_tiers=n) for n in (1, 2, 4)}
        choose("row_tiers", variants, [few, tree4, star], ("row_tiers",))
        # Shorter shared items where a step has few (a 2k-token prefix is 4 items of 32 pages:
        # 32 programs; 16 leaves the B=32 star's 16 items whole, which 32 cut and slowed by 17%
        # on the H200), then the merge's partials one at a time or several per step (the star's
        # requests each merge 16 or more shared ones).
        short = tree_set(Config("tune", "star B=16 P=2048 S=512", "star", B=16, P=2048, S=512), 3) + ("share",)
        variants = {n: dataclasses.replace(base, min_shared_items=n) for n in (0, 16, 32, 128)}
        choose("min_shared_items", variants, [short, star], ("min_shared_items",))
        variants = {n: dataclasses.replace(base, merge_block=n) for n in (1, 4, 16)}
        choose("merge_block", variants, [star, short], ("merge_block",))
        # How the kernels compute fp32 dots (not a tile size: recorded, not chosen here; in the
        # default fp32 pass only).
        out["fp32_dot"] = []
        if runner.dtype.name == "float32" and runner.fp32_dot == "auto":
            modes = ("tf32x3", "tf32", "ieee")
            timed("fp32_dot", {m: base for m in modes}, [star, plain], ("fp32_dot",),
                  fp32_dot={m: m for m in modes})
    out["elapsed_s"]["total"] = round(time.perf_counter() - t_start, 1)
    checkpoint(base)
    return out


def _ours_fn(runner: Runner, bs, q, k_pages, v_pages, step, fp32_dot: str | None = None):
    f = runner.layered(runner.ours_single(bs, fp32_dot))
    runner.jax.block_until_ready(f(q, k_pages, v_pages, step))
    return lambda: f(q, k_pages, v_pages, step)


def decision_loss(cases, overhead: float) -> float:
    """Seconds lost on `cases` ((saving, t_plain, t_share) each) by the balancer's rule with this
    step overhead: share iff saving > overhead, and a wrong choice costs the difference."""
    return sum(max(0.0, (ts - tp) if sv > overhead else (tp - ts)) for sv, tp, ts in cases)


def min_regret_overhead(cases) -> tuple[float, float]:
    """The step overhead whose sharing decisions lose the least time on timed cases.

    cases: (saving, t_plain, t_share) per step timed both ways, `saving` the model's plain cost
    minus its shared cost without overhead (tokens). The balancer shares a step iff
    saving > overhead; a case decided wrongly loses |t_plain - t_share|. The loss is a step
    function of the overhead that changes only at the savings, so each interval between them
    is tried. Returns (overhead, loss in seconds): the middle of the first interval that loses
    least (a quarter above the largest saving when it is the last, unbounded one).
    """
    edges = sorted({0.0} | {max(0.0, float(sv)) for sv, _, _ in cases})
    losses = [decision_loss(cases, e) for e in edges]
    i = min(range(len(edges)), key=lambda j: losses[j])
    overhead = (edges[i] + edges[i + 1]) / 2 if i + 1 < len(edges) else edges[i] * 1.25
    return overhead, losses[i]


def fit_cost_model(points: list[dict]) -> tuple[dict, "CostModel"]:
    """The balancer's `CostModel` from calibration points (see `calibrate`; pure, so a stored
    calibration can be refitted): dicts with mode ("plain"/"share"), s, P, request_tokens,
    chunk_tokens and min_s. Returns (the fit's JSON record, the model)."""
    import numpy as np

    from jaxsys.pallas_kernels.shared_prefix_attention import CostModel

    sizes = sorted({p["s"] for p in points})
    kappa, overhead, residual, fits = {}, [], [], {}
    for s in sizes:
        pl = sorted((p for p in points if p["mode"] == "plain" and p["s"] == s), key=lambda p: p["P"])
        sh = sorted((p for p in points if p["mode"] == "share" and p["s"] == s), key=lambda p: p["P"])
        x_p, y_p = np.array([p["request_tokens"] for p in pl], float), np.array([p["min_s"] for p in pl])
        tau, a_p = np.polyfit(x_p, y_p, 1)
        sigma, a_s = np.polyfit([p["chunk_tokens"] for p in sh], [p["min_s"] for p in sh], 1)
        kappa[s] = float(sigma / tau)
        overhead.append(float((a_s - a_p) / tau))
        residual.append(float(np.sqrt(np.mean((y_p - (tau * x_p + a_p)) ** 2)) / np.mean(y_p)))
        fits[str(s)] = {"tau_s_per_request_token": float(tau), "plain_intercept_s": float(a_p),
                        "sigma_s_per_chunk_token": float(sigma), "shared_intercept_s": float(a_s),
                        "kappa_raw": float(sigma / tau), "plain_fit_relative_rms": residual[-1]}
    run = 0.0
    for s in sizes:
        run = max(run, kappa[s])
        kappa[s] = round(max(run, 1e-3), 3)
    # the decisions: a star's only shared node saves s * P request-tokens for chunk_tokens at
    # kappa(s) each (the balancer's own arithmetic for an item of s <= query_block requests)
    by = {(p["mode"], p["s"], p["P"]): p for p in points}
    cases = {s: [] for s in sizes}
    for (mode, s, length), p in sorted(by.items()):
        if mode == "plain" and ("share", s, length) in by:
            share = by[("share", s, length)]
            cases[s].append((p["request_tokens"] - share["chunk_tokens"] * kappa[s], p["min_s"], share["min_s"]))
    # per item size (the sharing path's fixed cost grows with its items' rows): each size's trees
    # get the overhead that decides them best, `CostModel.step_overhead_by_size`, which the
    # balancer uses; one overhead for all trees is fitted too, for the record
    every = [c for s in sizes for c in cases[s]]
    step_overhead, lost = min_regret_overhead(every)
    by_size = {s: min_regret_overhead(cases[s]) for s in sizes if cases[s]}
    fitted = CostModel(shared_token_cost=tuple((s, kappa[s]) for s in sizes),
                       step_overhead_by_size=tuple((s, round(o, 1)) for s, (o, _) in by_size.items()))
    straightest = int(np.argmin(residual))
    return {
        "fits": fits,
        "step_overhead_per_s": overhead,
        "step_overhead_straightest_fit": {"s": sizes[straightest], "tokens": max(0.0, overhead[straightest]),
                                          "lost_s": decision_loss(every, max(0.0, overhead[straightest]))},
        "step_overhead_fit": {"tokens": step_overhead, "lost_s": lost,
                              "cases": [{"s": s, "saving": sv, "plain_s": tp, "share_s": ts}
                                        for s in sizes for sv, tp, ts in cases[s]]},
        "step_overhead_by_size_fit": {str(s): {"tokens": o, "lost_s": lo} for s, (o, lo) in by_size.items()},
    }, fitted


def calibrate(runner: Runner, repeats: int, seed: int, quick: bool) -> dict:
    """Measures the balancer's cost model and derives the sharing threshold.

    How: for each item size s in 2, 4, ..., query_block, take a star tree (one node of P tokens
    shared by s requests, each with a 64-token private suffix) at P = 1024, 2048, 4096, 8192 and time
    the SAME step both ways with the tuned block sizes: plain (force="plain") and shared
    (force="share"). Per s, least-squares lines give
      plain:  t = a_p + tau_s * (s * P)                 (tau_s: seconds per request-token)
      shared: t = a_s + sigma_s * chunk_tokens(P)       (sigma_s: seconds per padded chunk token)
    and kappa(s) = sigma_s / tau_s is the cost of one shared chunk token for an item of s
    requests in plain request-token units: `CostModel.shared_token_cost`. The intercept
    difference (a_s - a_p) / tau_s estimates the sharing path's fixed extra cost per s (recorded
    as `step_overhead_per_s`). The overhead is what decides a step, so it is fitted to the
    decisions instead (`fit_cost_model`): every calibration tree was timed both ways, so for
    each overhead one can count the time its decisions would lose on those trees, and the
    overhead that loses least is taken, per item size s (`CostModel.step_overhead_by_size`: the
    sharing path's extra cost is mostly its items launch, whose floor grows with the items'
    rows; the one overhead for all sizes that loses least is recorded as `step_overhead_fit`).
    A size whose trees all share profitably only bounds its overhead from above (half the
    smallest saving is taken), and two lengths bound it only to the interval between their
    savings: P = 2048 was added after the TF32 run of 2026-11-27, whose s = 16 overhead lay
    somewhere in [14k, 57k) tokens. (Earlier rules, both on H200 data of 2026-11-27: the
    smallest intercept estimate over s came out 0, as two bent plain fits gave negative ones;
    the estimate of the s with the straightest plain fit came out 6.5k tokens in the TF32 run
    that timed row tiers, and let C3 B=4, C3 B=16 and the depth-2 tree share where sharing was
    8-22% slower than the plain kernel. On that run's own calibration points it loses 19.9 us
    where one fitted overhead for all sizes, 10.0k, loses 14.6 and the per-size ones nothing.)
    Ratios come from the same tree timed round-robin, and the fit uses the fastest of the
    repeats (the medians are recorded too): the model describes the kernels, not the load that
    other processes put on a shared machine.
    A node of R <= Qb requests pays when kappa(R) < R: the threshold is the smallest such R
    (`CostModel.sharing_threshold`). kappa is made monotone in s (a bigger item never costs
    less) before it is written down.

    Returns (the JSON record of the calibration, the fitted `CostModel`).
    """
    import numpy as np

    jax, spa = runner.jax, runner.spa
    bs = runner.block_sizes
    rng = np.random.default_rng(seed)
    scale = 8 if quick else 1
    sizes = [s for s in (2, 4, 8, 16, 32, 64) if s <= bs.query_block]
    chunk = bs.chunk_pages * PAGE
    # quick (and --interpret, whose trees are shrunk): the smallest lengths that still give the
    # shared fit two distinct chunk counts
    lengths = ([n * runner.shrink for n in (chunk // 2, chunk, 2 * chunk)] if quick or runner.interpret
               else [1024, 2048, 4096, 8192])
    points, fns = [], {}
    for s in sizes:
        for length in lengths:
            cfg = Config("cal", f"{s} x {length}", "star", B=s, P=length, S=64 // min(scale, 4))
            tree, total = runner.tree(cfg, rng)
            k_pages, v_pages = runner.pools(total, seed)
            q = runner.queries(spa.bucket(s), seed)
            for mode in ("plain", "share"):
                plan = spa.plan_step(tree, block_sizes=bs, cost_model=runner.cost_model, force=mode)
                st = plan.step
                chunk_tokens = int((st.item_page_lens.sum(axis=1) > 0).sum()) * bs.chunk_pages * PAGE
                fns[(mode, s, length)] = _ours_fn(runner, bs, q, k_pages, v_pages, jax.device_put(st))
                points.append({"mode": mode, "s": s, "P": length, "request_tokens": s * length,
                               "chunk_tokens": chunk_tokens})
    times = runner.per_call(time_round_robin(fns, repeats))
    for p in points:
        p["median_s"] = median(times[(p["mode"], p["s"], p["P"])])
        p["min_s"] = min(times[(p["mode"], p["s"], p["P"])])
    record, fitted = fit_cost_model(points)
    return {
        "how": calibrate.__doc__.strip(),
        "block_sizes": dataclasses.asdict(bs),
        "points": points,
        **record,
        "derived_cost_model": cost_model_dict(fitted),
        "derived_sharing_threshold": fitted.sharing_threshold(),
        "tuned_cost_model_in_use": cost_model_dict(runner.cost_model),
    }, fitted


# -- plot -------------------------------------------------------------------------------------------


def plot(records: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:  # the GPU image may not have it; the JSON is the result
        print(f"matplotlib is not installed: no plot at {path}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = []
    for r in records:
        if r["label"] not in labels:
            labels.append(r["label"])
    by = {(r["label"], r["variant"]): r for r in records}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 0.55 * len(labels) + 2.5), sharey=True)
    ys = list(range(len(labels)))
    for ax, key, variants, ttl in (
        (ax1, "speedup_vs_naive", ("ours", "splitkv", "jax_decode_attention", "jax_paged_attention"),
         "speedup vs naive (duplicated KV)"),
        (ax2, "speedup_vs_splitkv", ("ours", "jax_decode_attention", "jax_paged_attention"),
         "speedup vs split-KV paged decode"),
    ):
        present = [v for v in variants if any((lab, v) in by for lab in labels)]
        h = 0.8 / max(1, len(present))
        for j, v in enumerate(present):
            vals = [(by.get((lab, v)) or {}).get(key) or 0.0 for lab in labels]
            ax.barh([y + (j - (len(present) - 1) / 2) * h for y in ys], vals, height=h, label=v)
        for y, lab in enumerate(labels):
            ours = by.get((lab, "ours"))
            if not ours:
                continue
            tgt = ours["targets"]["speedup_vs_naive" if key == "speedup_vs_naive" else "speedup_vs_splitkv"]
            if tgt:
                ax.plot([tgt, tgt], [y - 0.45, y + 0.45], color="k", lw=2)
            if key == "speedup_vs_naive":
                ax.plot([ours["byte_ratio"]], [y], marker="d", color="gray", ls="none",
                        label="byte ratio" if y == 0 else None)
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_title(ttl + "  (| = target)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
    ax1.set_yticks(ys, labels)
    ax1.invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    # `jaxsys bench attention` runs this file with runpy.run_path, which puts the file's path in
    # sys.argv[0]; name the command the user typed.
    ap = argparse.ArgumentParser(prog="jaxsys bench attention", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--quick", action="store_true", help="smoke run: small configs, 2 repeats, no tuning")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 7 on CPU, 15 on a GPU; quick 2)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention.json, "
                    "quick: attention_quick.json); the PNG goes next to it")
    ap.add_argument("--gpu", action="store_true", help="GPU mode (automatic when jax's platform is gpu): "
                    "Pallas kernels + jax decode_attention baseline + bandwidth")
    ap.add_argument("--interpret", action="store_true",
                    help="check the GPU path on CPU before spending GPU time: the Pallas kernels, the "
                         "GPU sweeps and JAX's kernels in the Pallas interpreter, every tree 1/%d of its "
                         "tokens; the timings mean nothing (default --out: a temporary file)" % INTERPRET_SHRINK)
    ap.add_argument("--only", default=None, help="comma-separated config names or label substrings "
                    "to run (e.g. C1,C5 or chain)")
    ap.add_argument("--skip-tune", action="store_true", help="skip the block-size sweep")
    ap.add_argument("--skip-calibration", action="store_true", help="skip the cost-model calibration")
    ap.add_argument("--tune-first", action="store_true",
                    help="tune and calibrate before the configurations and run them with the tuned block "
                         "sizes and the calibrated cost model (what `make gpu-check` does on an untuned "
                         "device); by default they run with the tables in tuned_block_sizes.py")
    ap.add_argument("--tuned-from", default=None, metavar="JSON",
                    help="run the configurations with the tiles (tuning.best) and the cost model "
                         "(calibration.derived_cost_model) of an earlier run's JSON, without tuning or "
                         "calibrating again: a GPU session split over two device calls")
    ap.add_argument("--tune-budget", type=float, default=None, metavar="SECONDS",
                    help="stop sweeping block sizes once the sweeps have taken this long and keep the best so "
                         "far (the sweeps left are listed as skipped): a device call has a hard time limit "
                         "(default: no limit)")
    ap.add_argument("--skip-configs", action="store_true",
                    help="run no configuration (with --tune-first: only tune and calibrate)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="KV and query dtype of every variant (default float32, the issue's configurations)")
    ap.add_argument("--fp32-dot", choices=("auto", "tf32x3", "tf32", "ieee"), default="auto",
                    help="GPU, fp32: how our kernels (ours and split-KV) compute dots. auto = tf32x3 (three "
                         "TF32 products, fp32 accuracy); tf32 = one TF32 product, the precision of JAX's "
                         "decode_attention (a like-for-like comparison); ieee = FMA units")
    ap.add_argument("--unrolled", action="store_true",
                    help="GPU: run a sample's query batches one after another in the jit instead of in a device "
                         "loop (lax.map), whose per-iteration cost every variant otherwise pays "
                         "(`harness_floor_s` in the JSON)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import jax

    from jaxsys.runtime import enable_compilation_cache

    enable_compilation_cache()
    dev = jax.devices()[0]
    gpu = args.gpu or args.interpret or dev.platform == "gpu"
    if args.gpu and dev.platform != "gpu":
        print(f"--gpu needs a GPU; jax's platform is {dev.platform}", file=sys.stderr)
        return 2
    # GPU samples are milliseconds: more of them
    repeats = args.repeats or (2 if args.quick else 15 if gpu else 7)
    stem = ("attention" + ("_gpu" if gpu else "") + ("_bf16" if args.dtype == "bfloat16" else "")
            + (f"_{args.fp32_dot}" if args.fp32_dot != "auto" else "") + ("_quick" if args.quick else ""))
    if args.interpret:
        stem += "_interpret"
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) if args.interpret else RESULTS) / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    runner = Runner(gpu, args.dtype, args.fp32_dot, interpret=args.interpret, unrolled=args.unrolled)
    header = {
        "benchmark": "attention",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"device_kind": dev.device_kind, "platform": dev.platform, "cpu_count": os.cpu_count(),
                   "machine": platform.machine(), "peak_bandwidth_Bps": peak_bandwidth() if gpu else None},
        "jax_version": jax.__version__, "python": platform.python_version(),
        "quick": args.quick, "interpret": args.interpret, "repeats": repeats,
        "statistic": "median of round-robin repeats",
        "timing": (f"per call: one sample runs the variant on {runner.layers} query batches inside one "
                   "jit (" + ("one after another, unrolled" if args.unrolled else "a lax.map, like the layers of "
                   "a decode step") + ") and is divided by that") if gpu else
                  "per call: one call per sample, block_until_ready",
        "shape": {"Hq": HQ, "Hkv": HKV, "head_dim": HEAD_DIM, "page_size": PAGE, "dtype": args.dtype},
        "fp32_dot": args.fp32_dot if gpu and args.dtype == "float32" else None,
        "block_sizes_from": runner.block_sizes_from,
        "paths": {"ours": "Pallas kernel" if gpu else "XLA (shared_prefix_attention_xla)",
                  "splitkv": "Pallas kernel" if gpu else "XLA (paged_attention_xla)"},
        "block_sizes": dataclasses.asdict(runner.block_sizes),
        "cost_model": cost_model_dict(runner.cost_model),
        "tune_budget_s": args.tune_budget,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if gpu:
        # what the harness alone costs per call (a trivial function in its place), for this run's
        # harness and for the other one
        q_floor, floors = runner.queries(32, args.seed), {}
        for unrolled in (False, True):
            fn = runner.layered(lambda q: q * 2, unrolled=unrolled)
            jax.block_until_ready(fn(q_floor))
            floors["unrolled" if unrolled else "lax.map"] = functools.partial(fn, q_floor)
        header["harness_floor_s"] = {n: median(t) for n, t in
                                     runner.per_call(time_round_robin(floors, repeats)).items()}
    records: list[dict] = []
    # seconds per section (tuning, calibration, each configuration): what the next device call
    # has to budget for
    doc = dict(header, records=records, elapsed_s={})

    def save():  # after every section, so an interrupted run keeps what it measured
        doc["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        out.write_text(json.dumps(doc, indent=1) + "\n")

    def save_tuning(partial):  # after every sweep
        doc["tuning"] = partial
        save()

    def run_tuning():
        t0 = time.perf_counter()
        doc["tuning"] = tune(runner, max(3, repeats // 2), args.seed, budget_s=args.tune_budget,
                             progress=save_tuning)
        doc["elapsed_s"]["tuning"] = round(time.perf_counter() - t0, 1)
        print("tuning:", json.dumps(doc["tuning"]), flush=True)
        save()

    def run_calibration():
        t0 = time.perf_counter()
        doc["calibration"], fitted = calibrate(runner, 2 * repeats, args.seed, args.quick)
        doc["elapsed_s"]["calibration"] = round(time.perf_counter() - t0, 1)
        print("calibration:", json.dumps(doc["calibration"]["derived_cost_model"]), flush=True)
        save()
        return fitted

    tuning = not args.quick and not args.skip_tune and not args.tuned_from
    if args.tuned_from:
        earlier = json.loads(Path(args.tuned_from).read_text())
        if (earlier.get("tuning") or {}).get("best"):
            runner.set_block_sizes(runner.spa.BlockSizes(**earlier["tuning"]["best"]))
            doc["block_sizes_from"] = f"tuned by the run of {earlier.get('date')} ({args.tuned_from})"
        if earlier.get("calibration"):
            runner.cost_model = cost_model_from_dict(
                earlier["calibration"]["derived_cost_model"], runner.spa,
                source=f"calibrated by the run of {earlier.get('date')} ({args.tuned_from})")
        for key in ("tuning", "calibration"):
            if key in earlier:
                doc[key] = earlier[key]
    elif args.tune_first:
        if tuning:
            run_tuning()
            runner.set_block_sizes(runner.spa.BlockSizes(**doc["tuning"]["best"]))
            doc["block_sizes_from"] = "tuned in this run"
        if not args.skip_calibration:
            fitted = run_calibration()
            if args.interpret:  # interpreter timings calibrate nothing: the configurations share as on a GPU
                print("--interpret: the configurations keep the tables' cost model (overheads scaled to the "
                      "shrunk trees), not the one fitted to interpreter timings", flush=True)
            else:
                runner.cost_model = dataclasses.replace(
                    fitted, source=f"calibrated in this run ({dev.device_kind}, {header['date']})")
    if args.tuned_from or args.tune_first:
        doc["block_sizes"] = dataclasses.asdict(runner.block_sizes)
        doc["cost_model"] = cost_model_dict(runner.cost_model)
        print("configurations run with", doc["block_sizes"], "and cost model", doc["cost_model"], flush=True)
    wanted = None if not args.only else set(args.only.split(","))
    for i, cfg in enumerate(() if args.skip_configs else configs(args.quick)):
        if wanted and cfg.name not in wanted and not any(w in cfg.label for w in wanted):
            continue
        t0 = time.perf_counter()
        recs = run_config(runner, cfg, repeats, args.seed + i)
        records += recs
        doc["elapsed_s"][cfg.label] = round(time.perf_counter() - t0, 1)
        save()
        ours = next(r for r in recs if r["variant"] == "ours")
        fmt = lambda x: "  n/a" if x is None else f"{x:5.2f}"  # noqa: E731
        extra = ""
        if gpu:
            for v in ("jax_decode_attention", "jax_paged_attention"):
                t = next((r["median_s"] for r in recs if r["variant"] == v and r["median_s"]), None)
                extra += f"  vs {v} {fmt(t and t / ours['median_s'])}x"
            extra += f"  {ours['achieved_bandwidth_Bps'] / 1e12:.2f} TB/s  launches (ms):"
            extra += ",".join(f" {n} {t['median_s'] * 1e3:.3f}" for n, t in ours["launches"].items())
        print(f"{cfg.label:40s} ours {ours['median_s'] * 1e3:8.3f} ms  vs naive {fmt(ours['speedup_vs_naive'])}x "
              f"(target {ours['targets']['speedup_vs_naive']:.2f})  vs splitkv {fmt(ours['speedup_vs_splitkv'])}x "
              f"(target {ours['targets']['speedup_vs_splitkv'] or '-'})  sharing={ours['plan']['use_sharing']}"
              f"{extra}  [{time.perf_counter() - t0:.0f}s]", flush=True)
    if not args.tune_first and not args.tuned_from:
        if tuning:
            run_tuning()
        if not args.skip_calibration:
            run_calibration()
    save()
    png = out.with_suffix(".png")
    plot(records, png, f"shared-prefix decode attention on {dev.device_kind} ({dev.platform}, "
                       f"{os.cpu_count()} cpus), jax {jax.__version__}, {args.dtype}"
                       f"{f' ({args.fp32_dot} dots)' if gpu and args.dtype == 'float32' else ''}, medians of {repeats}")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
