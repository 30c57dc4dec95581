"""Engine decode step with and without shared-prefix attention, host planning inside the timing (64 requests sharing a prompt; SmolLM2-135M and a 1.2B Llama shape).

What one decode step of the serving engine costs, end to end: the scheduler's prefix tree of the
batch, `plan_step` (once for all layers), the jitted decode step on the device, and the token
bookkeeping, i.e. one `Scheduler.step()` that ran a decode step and no prefill. Variants, each its
own engine on the same model and workload:

  shared    EngineConfig(shared_attention=True): shared-prefix decode attention (the Pallas
            kernel on a GPU, at --precision; the XLA path on CPU)
  noshare   EngineConfig(shared_attention=False): the engine's plain decode, split-KV paged
            attention without sharing (the same kernels, nothing shared)

Models have random weights (the timing does not depend on them): SmolLM2-135M's shape (30 layers,
9 query / 3 KV heads of 64) and a 1.2B-parameter Llama (24 layers, hidden 2048, 16 query / 4 KV
heads of 128). Workload: --requests requests whose prompts share --prefix tokens and have
--own tokens each, --new-tokens generated per request (ignore_eos). Each engine first puts the
shared prompt into its prefix cache (one request), runs the workload once to compile every bucket
it needs (warm-up), then again timed; only steps with the full batch running count. Records: median and p90 step time, the host plan per step (`plan_step`, timed
around the scheduler's step builder) and its fraction of the step, tokens/s, and compiles after
warm-up (0: steady state never recompiles).

--interpret checks the GPU path on CPU: the Pallas kernels in the interpreter inside the engine
step, on a tiny model and workload (the timings mean nothing). Writes benchmarks/results/
decode_step[_gpu].json (--out to change; --interpret: a temporary file).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import LOADAVG_AT_IMPORT, RESULTS, target, write_results  # noqa: E402

SPEEDUP_TARGET = 1.5  # shared vs noshare, per model
PLAN_FRACTION_TARGET = 0.05  # host plan / decode step


def model_configs(interpret: bool, dtype: str):
    from jaxsys.models.config import ModelConfig

    if interpret:
        return {"tiny": ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                                    num_kv_heads=2, head_dim=16, dtype=dtype)}
    return {
        "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                    num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
                                    rope_theta=100000.0, tie_word_embeddings=True, dtype=dtype),
        "llama-1.2b": ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=24,
                                  num_heads=16, num_kv_heads=4, head_dim=128, max_position_embeddings=4096,
                                  dtype=dtype),
    }


class Served(NamedTuple):
    engine: object
    scheduler: object


def build(model, engine_config, shared: bool, interpret: bool) -> Served:
    """The engine and scheduler of one variant. Compiled (or on CPU): `ServingLLM`'s, the product
    path. --interpret, shared: the same parts wired with the Pallas kernel in the interpreter."""
    from jaxsys.serve import ServingLLM

    config = dataclasses.replace(engine_config, shared_attention=shared)
    if not (interpret and shared):
        llm = ServingLLM(model, config=config)
        return Served(llm.engine, llm.scheduler)
    from jaxsys.pallas_kernels.shared_prefix_attention import get_default, shared_prefix_attention
    from jaxsys.serve.engine import shared_decode
    from jaxsys.serve.engine.engine import Engine
    from jaxsys.serve.scheduler.scheduler import Scheduler

    cfg = model.config
    tuned = get_default("NVIDIA H200", cfg.dtype, config.attention_precision, q_per_kv=cfg.q_per_kv,
                        head_dim=cfg.head_dim, page_size=config.page_size)
    attend = functools.partial(shared_prefix_attention, block_sizes=tuned.block_sizes, return_lse=True,
                               precision=config.attention_precision, interpret=True)
    engine = Engine(cfg, model.params, config, decode_attention=shared_decode.attention_fn(attend))
    return Served(engine, Scheduler(engine, None, shared_step_builder=shared_decode.step_builder(tuned)))


def workload(vocab: int, requests: int, prefix: int, own: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    shared = rng.integers(1, vocab, prefix).tolist()
    return [shared + rng.integers(1, vocab, own).tolist() for _ in range(requests)]


def run_once(served: Served, prompts, sampling, plan_times: list[float] | None) -> list[dict]:
    """Submits the prompts and steps the scheduler until idle; one sample per step that ran a
    decode step (and no prefill) with every request running."""
    from jaxsys.serve.scheduler.scheduler import new_request

    sched, engine = served.scheduler, served.engine
    for p in prompts:
        sched.submit(new_request(p, sampling))
    samples = []
    while sched.has_work():
        stats = sched.stats
        before = (stats.prefill_steps, stats.decode_steps, engine.compile_count, len(sched.running))
        n_plans = len(plan_times) if plan_times is not None else 0
        t0 = time.perf_counter()
        sched.step()
        dt = time.perf_counter() - t0
        pure_decode = stats.prefill_steps == before[0] and stats.decode_steps == before[1] + 1
        if pure_decode and before[3] == len(prompts):
            samples.append({"step_s": dt, "compiled": engine.compile_count != before[2],
                            "plan_s": sum(plan_times[n_plans:]) if plan_times is not None else 0.0})
    return samples


def measure(name: str, model, prompts, args, engine_config) -> list[dict]:
    from jaxsys.sampling import SamplingParams

    sampling = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    records = []
    for variant, shared in (("shared", True), ("noshare", False)):
        t0 = time.perf_counter()
        served = build(model, engine_config, shared, args.interpret)
        plan_times: list[float] | None = None
        if shared:
            plan_times, builder = [], served.scheduler.shared_step_builder

            def timed_builder(tree, batch, builder=builder, plan_times=plan_times):
                t = time.perf_counter()
                out = builder(tree, batch)
                plan_times.append(time.perf_counter() - t)
                return out

            served.scheduler.shared_step_builder = timed_builder
        # the shared prompt into the prefix cache first, so the workload's requests are admitted and
        # prefilled together and decode at one batch size: fewer buckets to compile
        run_once(served, prompts[:1], dataclasses.replace(sampling, max_tokens=1), None)
        run_once(served, prompts, sampling, plan_times)  # warm-up: compiles every bucket of the workload
        compiled, warmup_s = served.engine.compile_count, time.perf_counter() - t0
        shared_before = served.scheduler.stats.shared_steps
        samples = run_once(served, prompts, sampling, plan_times)
        steps = sorted(s["step_s"] for s in samples)
        if not steps:
            raise SystemExit(f"{name} {variant}: no decode step ran with all {len(prompts)} requests; "
                             "raise --new-tokens")
        step_s = statistics.median(steps)
        plan_s = statistics.median([s["plan_s"] for s in samples]) if shared else 0.0
        rec = {"model": name, "variant": variant, "median_step_s": step_s, "p90_step_s": steps[int(0.9 * (len(steps) - 1))],
               "steps_timed": len(steps), "tokens_per_s": len(prompts) / step_s, "median_plan_s": plan_s,
               "plan_fraction_of_step": plan_s / step_s, "compiles_after_warmup": served.engine.compile_count - compiled,
               "shared_steps": served.scheduler.stats.shared_steps - shared_before,
               "warmup_s": round(warmup_s, 1), "times_s": [round(s["step_s"], 6) for s in samples]}
        print(f"{name:14s} {variant:8s} step {step_s * 1e3:8.3f} ms (p90 {rec['p90_step_s'] * 1e3:8.3f}), plan "
              f"{plan_s * 1e3:6.3f} ms, {rec['tokens_per_s']:9.1f} tokens/s, {rec['shared_steps']} shared steps, "
              f"{rec['compiles_after_warmup']} compiles after warm-up [warm-up {warmup_s:.0f}s]", flush=True)
        records.append(rec)
        del served
    return records


def targets(records: list[dict]) -> list[dict]:
    out = []
    for model in dict.fromkeys(r["model"] for r in records):
        by = {r["variant"]: r for r in records if r["model"] == model}
        if {"shared", "noshare"} <= set(by):
            out.append(target(f"{model}: decode step, shared vs noshare", by["noshare"]["median_step_s"]
                              / by["shared"]["median_step_s"], SPEEDUP_TARGET))
            out.append(target(f"{model}: host plan / decode step (shared)", by["shared"]["plan_fraction_of_step"],
                              PLAN_FRACTION_TARGET, higher_is_better=False))
        for variant, r in by.items():
            out.append(target(f"{model} {variant}: compiles after warm-up", r["compiles_after_warmup"], 0,
                              higher_is_better=False))
    return out


def main(argv=None) -> int:
    doc = __doc__.splitlines()
    ap = argparse.ArgumentParser(prog="jaxsys bench decode_step", description=doc[0], epilog="\n".join(doc[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None,
                    help="comma-separated of smollm2-135m, llama-1.2b (default: both on a GPU, smollm2-135m on CPU)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=1000, help="prompt tokens every request shares (default 1000)")
    ap.add_argument("--own", type=int, default=16, help="prompt tokens of each request's own (default 16)")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens generated per request (default 48)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--precision", choices=("tf32x3", "tf32", "ieee"), default="tf32x3",
                    help="EngineConfig.attention_precision (GPU fp32; default: the shipped tf32x3)")
    ap.add_argument("--interpret", action="store_true",
                    help="check the GPU path on CPU: tiny model and workload, the Pallas kernel in the interpreter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if min(args.requests, args.prefix, args.new_tokens) < 1 or args.own < 0:
        ap.error("--requests, --prefix and --new-tokens must be >= 1, --own >= 0")

    import jax

    from jaxsys.models import LoadedModel
    from jaxsys.models.decoder import init_params
    from jaxsys.runtime import enable_compilation_cache
    from jaxsys.serve.engine.engine import EngineConfig

    enable_compilation_cache()
    gpu = jax.devices()[0].platform == "gpu"
    if args.interpret:
        args.requests, args.prefix, args.own, args.new_tokens = min(args.requests, 8), min(args.prefix, 48), \
            min(args.own, 8), min(args.new_tokens, 6)
    configs = model_configs(args.interpret, args.dtype)
    names = args.models.split(",") if args.models else (list(configs) if gpu or args.interpret else ["smollm2-135m"])
    unknown = set(names) - set(configs)
    if unknown:
        ap.error(f"unknown --models {sorted(unknown)}; known: {', '.join(configs)}")
    page_size = 16
    pages = 64 + args.requests * (-(-(args.own + args.new_tokens) // page_size) + 2) + args.prefix // page_size
    engine_config = EngineConfig(page_size=page_size, num_pages=max(pages, 256), max_decode_batch=args.requests,
                                 max_prefill_batch=args.requests, prefill_chunk=512,
                                 attention_precision=args.precision)
    records = []
    for i, name in enumerate(names):
        cfg = configs[name]
        params = init_params(cfg, jax.random.PRNGKey(args.seed + i))
        model = LoadedModel(name=name, config=cfg, params=params, tokenizer=None, path=Path(name))
        prompts = workload(cfg.vocab_size, args.requests, args.prefix, args.own, args.seed + i)
        records += measure(name, model, prompts, args, engine_config)
        del model, params
    stem = "decode_step" + ("_gpu" if gpu else "") + ("_interpret" if args.interpret else "")
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) if args.interpret else RESULTS) / f"{stem}.json"
    write_results(stem, records, out, targets=targets(records), loadavg_start=LOADAVG_AT_IMPORT,
                  workload={"requests": args.requests, "prefix": args.prefix, "own": args.own,
                            "new_tokens": args.new_tokens, "page_size": page_size},
                  dtype=args.dtype, precision=args.precision, interpret=args.interpret,
                  models={n: dataclasses.asdict(configs[n]) for n in names},
                  timing="one sample = one Scheduler.step() that ran a decode step (and no prefill) with every "
                         "request running: prefix tree, plan_step, device step, token bookkeeping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
