"""One configuration of the attention benchmark, called a few times, for a GPU profiler.

`make gpu-check` section `profile` runs this under Nsight Compute (`ncu`, where the GPU image has
it) to see what each launch waits on: memory throughput against the peak, warp stall reasons,
occupancy. The benchmark (`benchmarks/attention.py`) says how long each launch takes; this says
why. It runs our step (split-KV pages, shared items, merge) on the configuration's tree with the
tiles of the tables (`get_default` for this GPU) or of a `--tuned-from` benchmark record, then,
with `--with-jax`, JAX's contiguous `decode_attention` on the same KV (its parameters from the
record's baseline tuning, else its defaults); each once to compile and warm up and then `--calls`
more. With `ncu --launch-skip`, profile the calls after the warm-up.

Also runs without a profiler: it prints the launches' wall time per call (no profiler overhead).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/profile_step.py", description=__doc__.splitlines()[0],
                                 epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="C2 B=8 P=16384 S=512",
                    help="a configuration label of the attention benchmark (default: %(default)s)")
    ap.add_argument("--precision", choices=("tf32x3", "tf32", "ieee"), default="tf32")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--tuned-from", default=None, metavar="JSON",
                    help="take the tiles from this attention benchmark record (default: the tables)")
    ap.add_argument("--calls", type=int, default=1, help="calls after the warm-up (default 1)")
    ap.add_argument("--with-jax", action="store_true", help="also JAX's decode_attention on the same KV")
    ap.add_argument("--interpret", action="store_true", help="the Pallas interpreter on CPU, shrunk trees "
                                                                "(checks the script)")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import jax
    import jax.numpy as jnp
    import numpy as np

    from _attention import baselines, harness
    from _attention.configs import CONFIGS, page_tables
    from jaxsys.pallas_kernels.shared_prefix_attention import BlockSizes, plan_step

    cfg = next((c for c in CONFIGS if c.label == args.config), None)
    if cfg is None:
        ap.error(f"unknown --config {args.config!r}; one of: {', '.join(c.label for c in CONFIGS)}")
    runner = harness.Runner(gpu=True, dtype=args.dtype, precisions=(args.precision,), interpret=args.interpret)
    runner.layers = 1  # one launch of each kernel per call
    jax_params = baselines.default_params("jax_decode_attention", runner.dtype.itemsize)
    if args.tuned_from:
        record = json.loads(Path(args.tuned_from).read_text())
        tuning = record.get("tuning", {}).get(args.precision)
        if tuning:
            runner.ours[args.precision].block_sizes = BlockSizes.from_dict(tuning["best"])
        jax_params = record.get("baseline_params", {}).get("jax_decode_attention") or jax_params
    ours = runner.ours[args.precision]
    tree, total_pages = runner.tree(cfg, np.random.default_rng(0))
    k_pages, v_pages = runner.pools(total_pages, 0)
    plan = plan_step(tree, block_sizes=ours.block_sizes, cost_model=ours.cost_model)
    q = runner.queries(plan.shape.num_requests, 0)
    step = jax.device_put(plan.step)
    fn = runner.ours_fn(args.precision)
    fns = {"ours": lambda: fn(q, k_pages, v_pages, step)}
    if args.with_jax:
        table_p, lengths_p = page_tables(tree, plan.shape.num_requests)
        k_c = runner.contiguous(k_pages, table_p, int(lengths_p.max()))
        v_c = runner.contiguous(v_pages, table_p, int(lengths_p.max()))
        fns["jax_decode_attention"] = baselines.decode_attention_fn(runner, q, k_c, v_c, jnp.asarray(lengths_p),
                                                                    jax_params)
    print(f"profile_step: {cfg.label}, {args.precision} dots, sharing={plan.use_sharing}, "
          f"step {plan.shape}, tiles {ours.block_sizes}", flush=True)
    for f in fns.values():  # compile and warm up: the launches a profiler should skip
        jax.block_until_ready(f())
    for name, f in fns.items():
        t0 = time.perf_counter()
        for _ in range(args.calls):
            jax.block_until_ready(f())
        print(f"{name}: {(time.perf_counter() - t0) / args.calls * 1e6:.1f} us per call (wall, one layer)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
