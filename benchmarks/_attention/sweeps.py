"""The block-size sweeps, as data, and the tuner that runs them.

A sweep times the best setting so far and variants of a few of its fields on named tuning trees
(`configs.TUNING_TREES`); the setting fastest summed over the trees becomes the best, and the next
sweep starts from it (coordinate descent, never worse on the trees than where it started). Ours
sweeps `BlockSizes` fields (dotted names such as "split.pages_per_split"); JAX's kernels sweep
their own parameters (`BASELINE_SWEEPS`), on trees of the same set, under the same time budget.
Once a tuner has spent its budget it compiles no more variants and runs no more sweeps (listed as
skipped in the record), and the best so far stands: a device call has a hard time limit. A
variant the compiler rejects (e.g. Triton out of shared memory) is recorded with its error.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable

import jax
import numpy as np

from jaxsys.pallas_kernels import shared_prefix_attention as spa
from jaxsys.pallas_kernels.shapes import pow2_bucket

from . import baselines
from .configs import TUNING_TREES, page_tables
from .harness import Runner, median, time_round_robin


def grid(axes: dict) -> tuple[dict, ...]:
    """Every combination of the axes' values: grid({"a": (1, 2), "b": (3,)}) -> ({a: 1, b: 3},
    {a: 2, b: 3}). A tuple of names as the key sets those fields together from tuples of values."""
    keys = list(axes)
    out = []
    for values in itertools.product(*(axes[k] for k in keys)):
        d = {}
        for k, v in zip(keys, values):
            d.update(zip(k, v) if isinstance(k, tuple) else ((k, v),))
        out.append(d)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Variants of some fields (dotted `BlockSizes` fields for ours, keyword arguments for JAX's
    kernels), each timed on every one of `trees`."""

    name: str
    trees: tuple[str, ...]  # keys of TUNING_TREES
    variants: tuple[dict, ...]  # field (dotted for ours) -> value


_TILES = ((2, 4, 2), (2, 4, 3), (4, 4, 2), (4, 4, 3), (4, 8, 3), (8, 8, 1), (8, 8, 2))
_ITEM_TILES = ((2, 4, 2), (2, 4, 3), (2, 8, 2), (4, 4, 2), (4, 4, 3), (4, 8, 2), (4, 8, 3), (8, 4, 1), (8, 8, 1),
               (8, 8, 2))
_WARPS_STAGES = ((4, 2), (4, 3), (8, 2), (8, 3))

_SPLIT_TILE = ("split.pages_per_compute_block", "split.num_warps", "split.num_stages")
_ITEM_TILE = ("items.pages_per_compute_block", "items.num_warps", "items.num_stages")

CPU_SWEEPS = (
    Sweep("split_pages", ("plain",), grid({"split.pages_per_split": (8, 16, 32, 64, 128)})),
    Sweep("items_shape", ("star",), grid({"items.chunk_pages": (16, 32, 64, 128), "items.query_block": (8, 16, 32)})),
)

GPU_SWEEPS = (
    Sweep("split_pages", ("plain",), grid({"split.pages_per_split": (8, 16, 32, 64, 128)})),
    # the split-KV launch's own tile, as [pages, page_size, D] blocks and as flat token rows
    Sweep("split_tile", ("plain",), grid({_SPLIT_TILE: _TILES, "split.flat_kv": (False, True)})),
    # how many programs the split-KV launch needs before a small batch of long requests fills the GPU
    Sweep("split_min_programs", ("plain_small", "star_small"), grid({"split.min_programs": (0, 512, 1024)})),
    # items of >= 64 query rows also with 8 warps (at 4, 128 rows spill registers)
    Sweep("items_shape", ("star",), grid({"items.chunk_pages": (16, 32, 64), "items.query_block": (4, 8, 16, 32),
                                          "items.num_warps": (4, 8)})),
    Sweep("items_tile", ("star",), grid({_ITEM_TILE: _ITEM_TILES, "items.flat_kv": (False, True)})),
    # items with few requests on fewer rows: a star of 8, a depth-4 binary tree, and the B=32 star
    # (whose full items show what the branches cost)
    Sweep("row_tiers", ("star_few", "binary4", "star"), grid({"items.row_tiers": (1, 2, 4)})),
    Sweep("merge", ("star", "star_short"), grid({"merge.partials_per_step": (1, 4, 16),
                                                 ("merge.num_warps", "merge.num_stages"): ((4, 2), (8, 3))})),
)

_BASELINE_TREES = ("plain", "star")
BASELINE_SWEEPS = {
    "jax_decode_attention": (
        Sweep("k_splits", _BASELINE_TREES, grid({"k_splits": (4, 8, 16, 32)})),
        Sweep("block_k", _BASELINE_TREES, grid({"block_k": (64, 128, 256)})),
        Sweep("warps_stages", _BASELINE_TREES, grid({("num_warps", "num_stages"): _WARPS_STAGES})),
    ),
    "jax_paged_attention": (
        Sweep("k_splits", _BASELINE_TREES, grid({"k_splits": (4, 8, 16, 32)})),
        Sweep("pages_per_compute_block", _BASELINE_TREES, grid({"pages_per_compute_block": (2, 4, 8)})),
        Sweep("warps_stages", _BASELINE_TREES, grid({("num_warps", "num_stages"): _WARPS_STAGES})),
    ),
}


def apply(bs: spa.BlockSizes, changes: dict) -> spa.BlockSizes:
    """`bs` with dotted fields changed; a launch's tile is cut to its width (a narrower split or
    chunk keeps a valid tile). ValueError for a setting the dataclasses reject."""
    launches = {"items": dict(dataclasses.asdict(bs.items)), "split": dict(dataclasses.asdict(bs.split)),
                "merge": dict(dataclasses.asdict(bs.merge))}
    for key, value in changes.items():
        launch, field = key.split(".")
        launches[launch][field] = value
    items, split = launches["items"], launches["split"]
    items["pages_per_compute_block"] = min(items["pages_per_compute_block"], items["chunk_pages"])
    split["pages_per_compute_block"] = min(split["pages_per_compute_block"], split["pages_per_split"])
    return spa.BlockSizes.from_dict(launches)


class _Trees:
    """Tuning trees built once per tuner (inputs on the device), by name."""

    def __init__(self, runner: Runner, seed: int):
        self.runner, self.seed, self.built = runner, seed, {}

    def __getitem__(self, name: str) -> dict:
        if name not in self.built:
            spec, runner = TUNING_TREES[name], self.runner
            tree, total = runner.tree(spec.config, np.random.default_rng(self.seed + len(self.built)))
            k_pages, v_pages = runner.pools(total, self.seed + len(self.built))
            self.built[name] = {"label": spec.config.label, "tree": tree, "share": spec.share,
                                "k_pages": k_pages, "v_pages": v_pages}
        return self.built[name]


class Budget:
    """A tuner's time budget (None: unlimited), checked before every sweep and every variant."""

    def __init__(self, seconds: float | None):
        self.seconds, self.start = seconds, time.perf_counter()

    def spent(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.start > self.seconds


def _measure(runner: Runner, variants: list, trees: tuple[str, ...], compile_variant: Callable, repeats: int,
             budget: Budget) -> tuple[list[dict], int | None]:
    """Times `variants` ((fields, setting) pairs; the first is the current best) on each tree, round
    robin. compile_variant(tree name, setting) -> a zero-arg callable, compiled and run once.
    Variants are compiled until the budget is spent (the current best always), and the same ones
    are timed on the other trees. Returns (records, index of the variant fastest summed over every
    tree, None when none ran on all)."""
    records, chosen, total, failed = [], None, {}, set()
    for tree_name in trees:
        fns, errors = {}, {}
        for i, (_, setting) in enumerate(variants):
            if chosen is not None and i not in chosen:
                continue
            if chosen is None and i > 0 and budget.spent():
                break
            try:
                fns[i] = compile_variant(tree_name, setting)
            except Exception as e:  # noqa: BLE001 - a setting the compiler rejects is a result
                errors[i] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if chosen is None:
            chosen = set(fns) | set(errors)
        times = runner.per_call(time_round_robin(fns, repeats)) if fns else {}
        for i in sorted(chosen):
            rec = {"variant": i, **variants[i][0], "tree": tree_name, "median_s": median(times[i]) if i in times else None}
            if i in errors:
                rec["error"] = errors[i]
            records.append(rec)
            if i in times:
                total[i] = total.get(i, 0.0) + median(times[i])
            else:
                failed.add(i)
    ok = {i: t for i, t in total.items() if i not in failed}
    return records, (min(ok, key=ok.get) if ok else None)


def _tune(sweeps, start: dict, to_setting: Callable, compile_variant: Callable, runner: Runner, repeats: int,
          budget_s: float | None, max_variants: int | None, progress: Callable | None, label: str) -> dict:
    """Coordinate descent over `sweeps` from `start` (a dict): each sweep times the current best and
    its variants (at most `max_variants` of them); the fastest becomes the best. to_setting(best,
    changes) -> the setting to compile, or ValueError for an invalid one. Returns the tuning record
    (`best`: a dict); progress(record) after every sweep."""
    out = {"start": start, "best": start, "budget_s": budget_s, "sweeps": {}, "elapsed_s": {}, "skipped": []}
    best, budget = start, Budget(budget_s)
    for sweep in sweeps:
        if budget.spent():
            out["skipped"].append(sweep.name)
            print(f"{label}: {sweep.name} skipped (the {budget_s:.0f}s budget is spent)", flush=True)
            continue
        t0 = time.perf_counter()
        variants = [({"current": True}, to_setting(best, {}))]
        for changes in sweep.variants[:max_variants]:
            try:
                variants.append((changes, to_setting(best, changes)))
            except ValueError:  # a combination the tiles' constraints rule out
                continue
        records, fastest = _measure(runner, variants, sweep.trees, compile_variant, repeats, budget)
        if fastest is not None:
            setting = variants[fastest][1]
            best = setting.to_dict() if isinstance(setting, spa.BlockSizes) else setting
        out["sweeps"][sweep.name] = records
        out["best"] = best
        out["elapsed_s"][sweep.name] = round(time.perf_counter() - t0, 1)
        print(f"{label}: {sweep.name} -> {best} [{out['elapsed_s'][sweep.name]:.0f}s]", flush=True)
        if progress is not None:
            progress(out)
    out["elapsed_s"]["total"] = round(time.perf_counter() - budget.start, 1)
    return out


def tune_ours(runner: Runner, precision: str, repeats: int, seed: int, budget_s: float | None,
              max_variants: int | None = None, progress: Callable | None = None) -> dict:
    """Our sweeps (GPU_SWEEPS or CPU_SWEEPS) at one precision, from the tiles ours runs with;
    the record's `best` is a `BlockSizes.to_dict()`."""
    trees = _Trees(runner, seed)

    def compile_variant(tree_name: str, bs: spa.BlockSizes):
        t = trees[tree_name]
        q = runner.queries(pow2_bucket(t["tree"].num_requests), seed)
        step = jax.device_put(spa.forced_plan(t["tree"], share=t["share"], block_sizes=bs).step)
        fn = runner.ours_fn(precision, bs)
        jax.block_until_ready(fn(q, t["k_pages"], t["v_pages"], step))
        return lambda: fn(q, t["k_pages"], t["v_pages"], step)

    def to_setting(best: dict, changes: dict) -> spa.BlockSizes:
        return apply(spa.BlockSizes.from_dict(best), changes)

    sweeps = GPU_SWEEPS if runner.gpu else CPU_SWEEPS
    return _tune(sweeps, runner.ours[precision].block_sizes.to_dict(), to_setting, compile_variant, runner, repeats,
                 budget_s, max_variants, progress, f"tune ours ({precision})")


def tune_baseline(runner: Runner, name: str, repeats: int, seed: int, budget_s: float | None,
                  max_variants: int | None = None, progress: Callable | None = None) -> dict:
    """The sweeps of one of JAX's kernels (`BASELINE_SWEEPS[name]`) from its defaults; the
    record's `best` is the kernel's keyword arguments."""
    trees = _Trees(runner, seed)
    inputs: dict[str, dict] = {}

    def tree_inputs(tree_name: str) -> dict:
        if tree_name not in inputs:
            t = trees[tree_name]
            table, lengths = page_tables(t["tree"])
            length = int(lengths.max())
            inputs[tree_name] = {
                "q": runner.queries(t["tree"].num_requests, seed), "k_pages": t["k_pages"], "v_pages": t["v_pages"],
                "k_c": runner.contiguous(t["k_pages"], table, length),
                "v_c": runner.contiguous(t["v_pages"], table, length),
                "table": jax.numpy.asarray(table), "lengths": jax.numpy.asarray(lengths)}
        return inputs[tree_name]

    def compile_variant(tree_name: str, params: dict):
        return baselines.baseline_fn(name, runner, tree_inputs(tree_name), params)

    start = baselines.default_params(name, runner.dtype.itemsize)
    return _tune(BASELINE_SWEEPS[name], start, lambda best, changes: {**best, **changes}, compile_variant, runner,
                 repeats, budget_s, max_variants, progress, f"tune {name}")
