"""What Triton makes of the shared-prefix Pallas kernels for a Hopper GPU, on a machine without one.

Each launch of `shared_prefix_attention` (shared items, split-KV pages, merge) is lowered the way
jax lowers it for CUDA (Pallas -> Triton IR; no GPU needed) and, with the `triton` package
installed, compiled for sm_90 (H100/H200) by Triton and ptxas. Per launch and tile setting the
report gives:

  regs, spill_bytes     registers per thread; bytes per thread of stack frame and local memory
                        (register spills: ptxas puts them in the stack frame)
  shared_bytes          shared memory per program (Triton's allocation)
  ctas_per_sm           programs one SM can hold at once: min over registers (64K per SM),
                        shared memory (228 KiB per SM, 1 KiB of it per program reserved) and
                        warps (64 per SM)
  kv_buffers            shared-memory buffers per KV tile in the loop (pipeline depth)
  loop_async_wait       the loop's `cp.async.wait_group` count: 0 = every tile's load is waited
                        for in full before its use (no overlap); N = N copy groups stay in flight
                        (None where the loop's blocks could not be told apart in the PTX)
  loop_copies_16B / 4B  cp.async instructions of 16 and of 4 bytes per thread in the loop (the
                        fp32 V tile is stored transposed for the tensor cores: 4-byte copies)
  kv_loops              where a launch has several KV loops (`ItemsLaunch.row_tiers`: one per
                        branch), the same loop figures for each, in program order

This is a static check of what the code asks the compiler for, not a measurement: the GPU's
Triton (inside jaxlib) is another version and may decide differently. `make kernel-report`
installs `triton` into the venv and writes benchmarks/results/attention_triton_static.json;
without `triton`, `--lower-only` checks that every launch lowers (what the tests do).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HQ, HKV, HEAD_DIM, PAGE = 32, 8, 128, 16
DEVICE = "NVIDIA H200"  # whose tables are lowered (sm_90, as an H100)
SM_REGS, SM_SHARED, SM_WARPS, RESERVED_SHARED = 65536, 228 * 1024, 64, 1024
LAUNCHES = ("shared_prefix_private_pages", "shared_prefix_items", "shared_prefix_merge")


@contextlib.contextmanager
def capture_triton_modules():
    """Yields a list that collects (kernel name, Triton IR text, num_warps, num_stages) of every
    Pallas Triton lowering inside the block."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    captured: list[dict] = []
    original = registration.lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, grid_mapping, *args, **kwargs):
        result = original(jaxpr, grid_mapping, *args, **kwargs)
        ir = result.module.operation.get_asm(enable_debug_info=False)
        name = re.search(r"module @(\w+)", ir[:200])
        captured.append({"name": name.group(1) if name else "?", "ir": ir, "grid": list(result.grid)})
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    # jax >= 0.11 asks the device which GPU it lowers for (and refuses on a machine without
    # one): an H100/H200 (sm_90), the target this report is for. jax 0.10 does not ask.
    gpu_info = getattr(registration, "gpu_info_lib", None)
    asked = gpu_info and gpu_info.get_gpu_info
    if asked:
        gpu_info.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    try:
        yield captured
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = original
        if asked:
            gpu_info.get_gpu_info = asked


def lower_step(block_sizes, tree, total_pages: int, *, dtype: str = "float32", precision: str = "tf32x3",
               share: bool = True) -> list[dict]:
    """Lowers `shared_prefix_attention` for CUDA on the tree's step (every sharable node shared,
    or none); one dict per launch, with the launch's num_warps and num_stages."""
    import jax
    import jax.numpy as jnp

    from jaxsys.pallas_kernels import shared_prefix_attention as spa

    plan = spa.forced_plan(tree, share=share, block_sizes=block_sizes)
    b = plan.shape.num_requests
    q = jax.ShapeDtypeStruct((b, HQ, HEAD_DIM), jnp.dtype(dtype))
    kv = jax.ShapeDtypeStruct((HKV, total_pages, PAGE, HEAD_DIM), jnp.dtype(dtype))
    step = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), plan.step)
    f = functools.partial(spa.shared_prefix_attention, block_sizes=block_sizes, precision=precision)
    with capture_triton_modules() as mods:
        jax.jit(f).trace(q, kv, kv, step).lower(lowering_platforms=("cuda",))
    launch = {"shared_prefix_items": block_sizes.items, "shared_prefix_private_pages": block_sizes.split,
              "shared_prefix_merge": block_sizes.merge}
    for m in mods:
        m["num_warps"], m["num_stages"] = launch[m["name"]].num_warps, launch[m["name"]].num_stages
    return mods


def compile_report(mod: dict, arch: int = 90) -> dict:
    """Compiles one captured module with the `triton` package for sm_`arch` and reads its
    resources and loop structure."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{mod['name']}.ttir"
        path.write_text(mod["ir"])
        kernel = triton.compile(str(path), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": mod["num_warps"], "num_stages": mod["num_stages"]})
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        tool = Path(os.path.dirname(triton.__file__)) / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    regs, stack, local = int(res.group(1)), int(res.group(2)), int(res.group(4))
    shared = int(kernel.metadata.shared)
    warps = mod["num_warps"]
    by_regs = SM_REGS // (math.ceil(regs / 8) * 8 * 32 * warps)
    by_shared = SM_SHARED // (shared + RESERVED_SHARED)
    loops = _kv_loops(kernel.asm["ptx"])
    buffers = [int(n) for n in re.findall(
        r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+(?:x\d+)?x(?:f32|bf16|f16)", kernel.asm["ttgir"])]
    out = {"regs": regs, "spill_bytes": stack + local, "shared_bytes": shared,
           "ctas_per_sm": min(by_regs, by_shared, SM_WARPS // warps),
           "kv_buffers": max(buffers) if buffers else 0}
    out.update({f"loop_{k}": v for k, v in _loop_stats(max(loops, key=_loop_score) if loops else "").items()})
    with_mma = [loop for loop in loops if _loop_stats(loop)["mma"]]
    if len(with_mma) > 1:  # one KV loop per branch (row_tiers): each, in program order
        out["kv_loops"] = [_loop_stats(loop) for loop in with_mma]
    return out


def _loop_stats(loop: str) -> dict:
    products = len(re.findall(r"\bmma\.sync|\bwgmma\.mma_async", loop))
    if not products:  # the KV loop's blocks are not contiguous in the PTX
        return {"async_wait": None, "copies_16B": None, "copies_4B": None, "global_loads": None, "mma": None}
    return {"async_wait": [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", loop)],
            "copies_16B": len(re.findall(r"cp\.async\.\w+\.shared\.global[^;]*0x10,", loop)),
            "copies_4B": len(re.findall(r"cp\.async\.\w+\.shared\.global[^;]*0x4,", loop)),
            "global_loads": len(re.findall(r"ld\.global", loop)), "mma": products}


def _loop_score(loop: str) -> int:
    return len(re.findall(r"\bmma\.sync|\bwgmma\.mma_async|cp\.async\.\w+\.shared|ld\.global", loop))


def _kv_loops(ptx: str) -> list[str]:
    """The PTX of the innermost loops (a header label to its last branch back), in program
    order; the KV loop is the one with the most tensor-core products and loads (`_loop_score`)."""
    loops = []
    for header in re.finditer(r"^(\$L__BB\d+_\d+):[^\n]*Inner Loop Header", ptx, re.M):
        label = header.group(1)
        back = [m.end() for m in re.finditer(rf"bra(?:\.uni)?\s+{re.escape(label)};", ptx)]
        if back:
            loops.append(ptx[header.start():max(back)])
    return loops


def _with(bs, launch: str, **changes):
    return dataclasses.replace(bs, **{launch: dataclasses.replace(getattr(bs, launch), **changes)})


def settings(quick: bool):
    """(label, dtype, precision, BlockSizes) to report: the H200 tables and the tile variants the
    GPU sweeps try."""
    from jaxsys.pallas_kernels import shared_prefix_attention as spa

    out = []
    for dtype, precision in (("float32", "tf32x3"), ("float32", "tf32"), ("bfloat16", "tf32x3")):
        base = spa.get_default(DEVICE, dtype, precision, q_per_kv=HQ // HKV, head_dim=HEAD_DIM,
                               page_size=PAGE).block_sizes
        tag = f"{dtype} {precision}" if dtype == "float32" else dtype
        out.append((f"{tag}: tuned table", dtype, precision, base))
        if quick:
            continue
        for ppcb, warps, stages in ((2, 4, 3), (4, 4, 2), (4, 4, 3), (8, 4, 1), (8, 8, 2)):
            if base.items.chunk_pages % ppcb:
                continue
            bs = _with(base, "items", pages_per_compute_block=ppcb, num_warps=warps, num_stages=stages)
            out.append((f"{tag}: items {ppcb} pages, {warps} warps, {stages} stages", dtype, precision, bs))
        out.append((f"{tag}: tuned table + merge of 8 partials per step", dtype, precision,
                    _with(base, "merge", partials_per_step=8)))
        out.append((f"{tag}: tuned table + 4 row tiers", dtype, precision, _with(base, "items", row_tiers=4)))
        out.append((f"{tag}: tuned table + flat KV tiles in both launches", dtype, precision,
                    _with(_with(base, "items", flat_kv=True), "split", flat_kv=True)))
        out.append((f"{tag}: tuned table + split launch of 2 pages x 3 stages, >= 512 programs", dtype, precision,
                    _with(base, "split", pages_per_compute_block=2, num_stages=3, min_programs=512)))
    return out


def item_row_use() -> dict:
    """Per benchmark configuration, on the step the TF32 table plans: how much of the shared-items
    launch's product work is on rows that hold a query (`kernel.item_rows`), untiered and with
    `row_tiers` 2 and 4. Host-side arithmetic on the plan, no GPU."""
    import numpy as np

    from _attention.configs import CONFIGS, build_tree
    from jaxsys.pallas_kernels import shared_prefix_attention as spa
    from jaxsys.pallas_kernels.shared_prefix_attention.kernel import item_rows

    tuned = spa.get_default(DEVICE, "float32", "tf32", q_per_kv=HQ // HKV, head_dim=HEAD_DIM, page_size=PAGE)
    out = {"block_sizes": tuned.source,
           "how": "query rows x KV tokens over the step's items: useful = rows holding a query head; "
                  "products_vs_untiered[n] = what row_tiers=n multiplies / what row_tiers=1 does",
           "configs": {}}
    for cfg in CONFIGS:
        tree, _ = build_tree(cfg, np.random.default_rng(0))
        plan = spa.plan_step(tree, block_sizes=tuned.block_sizes, cost_model=tuned.cost_model)
        if not plan.use_sharing:
            out["configs"][cfg.label] = "does not share"
            continue
        use = {n: item_rows(plan.step, HQ // HKV, _with(tuned.block_sizes, "items", row_tiers=n)) for n in (1, 2, 4)}
        out["configs"][cfg.label] = {
            "useful_fraction_untiered": round(use[1]["useful"] / use[1]["full"], 3),
            "products_vs_untiered": {n: round(u["computed"] / u["full"], 3) for n, u in use.items()}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/triton_static.py", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--lower-only", action="store_true", help="lower every launch, compile nothing (no triton needed)")
    ap.add_argument("--quick", action="store_true", help="the tuned tables only, not the tile variants")
    ap.add_argument("--out", default=str(RESULTS / "attention_triton_static.json"),
                    help="JSON path (default: %(default)s)")
    args = ap.parse_args(argv)

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _attention.configs import Config, build_tree  # the benchmark's trees

    if not args.lower_only:
        try:
            import triton
        except ImportError:
            print("the `triton` package is not installed: `make kernel-report` installs it, or pass "
                  "--lower-only", file=sys.stderr)
            return 2
    # the star of C1 exercises all three launches; the plain tree the split-KV launch alone
    trees = [("star B=32 P=8192 S=128", Config("C1", "", "star", B=32, P=8192, S=128), True),
             ("plain B=8 L=8192", Config("t", "", "chains", B=8, depth=0, node_tokens=8192), False)]
    built = {label: build_tree(cfg, np.random.default_rng(0)) for label, cfg, _ in trees}
    records = []
    for label, dtype, precision, bs in settings(args.quick):
        for tree_label, _, share in trees:
            tree, total = built[tree_label]
            for mod in lower_step(bs, tree, total, dtype=dtype, precision=precision, share=share):
                if not share and mod["name"] != "shared_prefix_private_pages":
                    continue
                rec = {"setting": label, "tree": tree_label, "launch": mod["name"], "dtype": dtype,
                       "precision": precision, "num_warps": mod["num_warps"], "num_stages": mod["num_stages"],
                       "grid": mod["grid"], "block_sizes": bs.to_dict()}
                if not args.lower_only:
                    rec.update(compile_report(mod))
                records.append(rec)
                print(json.dumps({k: v for k, v in rec.items() if k != "block_sizes"}), flush=True)
    if args.lower_only:
        return 0
    from _common import write_results

    # a static report: no measurement, so no targets
    write_results("attention_triton_static", records, args.out, targets=[],
                  what="static analysis: the Pallas kernels lowered for CUDA by jax and compiled for sm_90 by the "
                       "triton package on a CPU machine; not a measurement (the GPU's jaxlib Triton may differ)",
                  item_rows=item_row_use(), triton_version=triton.__version__,
                  sm_limits={"registers": SM_REGS, "shared_bytes": SM_SHARED, "warps": SM_WARPS},
                  shape={"Hq": HQ, "Hkv": HKV, "head_dim": HEAD_DIM, "page_size": PAGE})
    return 0

if __name__ == "__main__":
    sys.exit(main())
