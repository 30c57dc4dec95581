"""SmolLM2 serving: 64 requests sharing a 1,000-token system prompt; shared-prefix decode vs split-KV decode vs HF.

Three systems generate the same tokens for the same 64 chat prompts (a long shared system prompt,
then one short question each), greedy, exactly `--new-tokens` each (EOS ignored):

- jaxsys-shared: the serving engine with the radix prefix cache and shared-prefix decode
  attention (each shared KV chunk read once per step for all requests below it);
- jaxsys-noshare: the same engine, same prefix cache, with plain split-KV paged decode attention
  (the engine's default when sharing is off: the kernel package's paged path, never sharing);
- hf-transformers: HF `generate`, batched, left-padded, same fp32 weights (dequantized from the
  same GGUF); it has no prefix cache, so it prefills all 64 prompts in full.

Every system is warmed up on the full workload before it is timed; repeats run round-robin so
load changes hit all alike. Each record reports end to end (generated tokens / wall time) and
the two phases apart: prefill (prompt tokens / time in prefill steps; ours computes the shared
prompt once, HF 64 times) and decode (tokens of the decode steps / their time: shared-prefix decode
against split-KV decode against HF's decode steps, HF's timed alone from the first to the last
token). So a reader sees which part of a ratio comes from prefix caching and which from
shared-prefix decode.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import target, write_results  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Name a primary color.", "What is 7 times 8?", "Who wrote Hamlet?",
    "What is the boiling point of water?", "Name a large mammal.", "What is photosynthesis?",
    "How many days are in a week?", "What is the largest planet?", "Name a programming language.",
    "What does a thermometer measure?", "Who painted the Mona Lisa?", "What is the square root of 81?",
    "Name an ocean.", "What gas do plants absorb?", "What is the freezing point of water?",
]
SYSTEMS = (("jaxsys-shared", True), ("jaxsys-noshare", False))
TARGET_END_TO_END = 1.8  # shared vs no-share, generated tokens per second of the whole batch
TARGET_DECODE = 2.0  # shared vs no-share, decode tokens per second


def system_prompt(tokenizer, n_tokens: int) -> str:
    base = ("You are a meticulous assistant for a science museum. Answer visitors' questions briefly and "
            "accurately, cite the exhibit hall when relevant, and never invent facts. ")
    text = base
    while len(tokenizer.encode(text)) < n_tokens:
        text += base
    ids = tokenizer.encode(text)[:n_tokens]
    return tokenizer.decode(ids)


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="jaxsys bench engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-repeats", type=int, default=None, help="repeats for HF (default: --repeats)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-threads", type=int, default=None,
                    help="torch intra-op threads for the HF baseline (default: torch's default)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/engine.json)")
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (decode is timed from the second token on)")
    return args


# ------------------------------------------------------------------------------ jaxsys

def make_llm(model, prompts, new_tokens: int, shared: bool):
    from jaxsys.serve import EngineConfig, ServingLLM

    page_size = EngineConfig().page_size
    pages = 1 + sum(math.ceil((len(p) + new_tokens) / page_size) for p in prompts)  # even if nothing is shared
    config = EngineConfig(page_size=page_size, num_pages=pages, max_decode_batch=len(prompts),
                          prefill_chunk=512, shared_attention=shared)
    return ServingLLM(model, config=config)


def run_ours(llm, prompts, sampling) -> dict:
    """One timed run from a cold prefix cache; the phase times are the scheduler's own counters."""
    stats = llm.scheduler.stats
    llm.scheduler.radix.evict(10**9)
    before = (stats.prefill_s, stats.decode_s, stats.prefill_tokens, stats.decode_tokens)
    t0 = time.perf_counter()
    results = llm.generate(prompts, sampling)
    wall = time.perf_counter() - t0
    prefill_s, decode_s, prefill_tokens, decode_tokens = (
        a - b for a, b in zip((stats.prefill_s, stats.decode_s, stats.prefill_tokens, stats.decode_tokens), before))
    return {"wall_s": wall, "generated_tokens": sum(len(r.token_ids) for r in results),
            "prompt_tokens": sum(len(p) for p in prompts), "prefill_s": prefill_s,
            "prefill_computed_tokens": prefill_tokens, "decode_s": decode_s, "decode_tokens": decode_tokens,
            "tpot_s": [x for r in results for x in r.tpot_s], "token_ids": [r.token_ids for r in results]}


# ------------------------------------------------------------------------------ HF transformers

def hf_model(model, threads: int | None):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(str(model.path.parent), gguf_file=model.path.name,
                                                dtype=torch.float32).eval()


def run_hf(hf, prompts, new_tokens: int) -> dict:
    """One batched `generate`; a stopping criterion stamps the time of every new token, so the
    prefill (to the first token) and the decode steps (first to last token) are timed apart."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stamp(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kw):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    stamp = Stamp()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=0, stopping_criteria=StoppingCriteriaList([stamp]))
    wall = time.perf_counter() - t0
    assert out.shape[1] - width == new_tokens == len(stamp.times)
    steps = [b - a for a, b in zip(stamp.times, stamp.times[1:])]
    return {"wall_s": wall, "generated_tokens": len(prompts) * new_tokens,
            "prompt_tokens": sum(len(p) for p in prompts), "prefill_s": stamp.times[0] - t0,
            "prefill_computed_tokens": sum(len(p) for p in prompts), "decode_s": stamp.times[-1] - stamp.times[0],
            "decode_tokens": len(prompts) * (new_tokens - 1), "tpot_s": steps,
            "token_ids": [row[width:].tolist() for row in out]}


# ------------------------------------------------------------------------------ records

def summarize(system: str, runs: list[dict], **extra) -> dict:
    """The record of one system: medians over the repeats, every repeat kept."""
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "prefill_s", "decode_s")}
    mid = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    rec = {"system": system,
           "tokens_per_s": mid["generated_tokens"] / med["wall_s"], "median_s": med["wall_s"],
           "prefill_tokens_per_s": mid["prompt_tokens"] / med["prefill_s"], "prefill_s": med["prefill_s"],
           "decode_tokens_per_s": mid["decode_tokens"] / med["decode_s"], "decode_s": med["decode_s"],
           "p50_tpot_s": percentile(mid["tpot_s"], 50), "p99_tpot_s": percentile(mid["tpot_s"], 99),
           "generated_tokens": mid["generated_tokens"], "prompt_tokens": mid["prompt_tokens"],
           "prefill_computed_tokens": mid["prefill_computed_tokens"], "decode_tokens": mid["decode_tokens"],
           "times_s": [r["wall_s"] for r in runs], "prefill_times_s": [r["prefill_s"] for r in runs],
           "decode_times_s": [r["decode_s"] for r in runs], **extra}
    print(f"{system:16s} end to end {rec['tokens_per_s']:8.1f} tokens/s ({rec['median_s']:.1f} s) | "
          f"prefill {rec['prefill_tokens_per_s']:8.0f} prompt tokens/s ({rec['prefill_s']:.1f} s) | "
          f"decode {rec['decode_tokens_per_s']:8.1f} tokens/s ({rec['decode_s']:.1f} s) | "
          f"p50 TPOT {rec['p50_tpot_s'] * 1e3:.1f} ms", flush=True)
    return rec


def ratios_of(by: dict[str, dict]) -> dict[str, float]:
    """Throughput ratios, end to end and per phase, of each jaxsys system over each baseline."""
    metrics = {"": "tokens_per_s", "_prefill": "prefill_tokens_per_s", "_decode": "decode_tokens_per_s"}
    pairs = [("shared", "noshare"), ("shared", "hf"), ("noshare", "hf")]
    names = {"shared": "jaxsys-shared", "noshare": "jaxsys-noshare", "hf": "hf-transformers"}
    out = {}
    for a, b in pairs:
        if names[a] in by and names[b] in by:
            for suffix, key in metrics.items():
                out[f"{a}_vs_{b}{suffix}"] = by[names[a]][key] / by[names[b]][key]
    return out


def main() -> None:
    args = parse_args()
    from jaxsys.runtime import enable_compilation_cache

    enable_compilation_cache()
    import jaxsys
    from jaxsys.sampling import SamplingParams

    model = jaxsys.load_model("smollm2-135m-instruct")
    tok = model.tokenizer
    sysmsg = system_prompt(tok, args.system_tokens)
    prompts = [tok.encode_chat([{"role": "system", "content": sysmsg},
                                {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" (visitor {i})"}])
               for i in range(args.requests)]
    sampling = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)  # same work as HF's min_new_tokens

    llms, compiled = {}, {}
    for system, shared in SYSTEMS:
        llms[system] = make_llm(model, prompts, args.new_tokens, shared)
        llms[system].generate(prompts, sampling)  # warm-up: the same workload compiles every bucket it needs
        compiled[system] = llms[system].engine.compile_count
    runs: dict[str, list[dict]] = {system: [] for system, _ in SYSTEMS}
    for _ in range(args.repeats):  # round-robin over the systems
        for system, _ in SYSTEMS:
            runs[system].append(run_ours(llms[system], prompts, sampling))
    records = [summarize(system, runs[system],
                         compiles_after_warmup=llms[system].engine.compile_count - compiled[system],
                         shared_decode_steps=llms[system].scheduler.stats.shared_steps)
               for system, _ in SYSTEMS]
    outputs = {system: runs[system][-1]["token_ids"] for system, _ in SYSTEMS}
    del llms
    same = outputs["jaxsys-shared"] == outputs["jaxsys-noshare"]
    print(f"greedy outputs identical with and without sharing: {same}")

    hf_same = None
    if not args.skip_hf:
        import torch

        hf = hf_model(model, args.hf_threads)
        run_hf(hf, prompts, args.new_tokens)  # warm-up on the full workload, as ours
        hf_runs = [run_hf(hf, prompts, args.new_tokens) for _ in range(args.hf_repeats or args.repeats)]
        records.append(summarize("hf-transformers", hf_runs, torch_threads=torch.get_num_threads()))
        hf_same = sum(a == b for a, b in zip(hf_runs[-1]["token_ids"], outputs["jaxsys-shared"]))

    by = {r["system"]: r for r in records}
    ratios = ratios_of(by)
    print("ratios:", {k: round(v, 2) for k, v in ratios.items()})
    workload = f"{args.requests} requests x {args.system_tokens}-token shared prompt, {args.new_tokens} new tokens"
    targets = [target(f"shared vs no-share, end to end ({workload})", ratios["shared_vs_noshare"], TARGET_END_TO_END),
               target(f"shared vs no-share, decode ({workload})", ratios["shared_vs_noshare_decode"], TARGET_DECODE)]
    write_results("engine", records, args.out, targets=targets, requests=args.requests,
                  system_tokens=args.system_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                  ratios=ratios, outputs_identical_shared_vs_noshare=same,
                  hf_requests_with_identical_greedy_outputs=hf_same,
                  note="jaxsys-shared and jaxsys-noshare run the same engine with the radix prefix cache on "
                       "(cold at the start of each repeat; the requests arrive together, so the system prompt "
                       "is prefilled once) and differ only in decode attention: shared-prefix attention vs "
                       "split-KV paged decode (no sharing). tokens_per_s = generated tokens / wall time of the "
                       "whole batch. prefill_tokens_per_s = prompt tokens / time in prefill steps (ours: the "
                       "scheduler's prefill steps, which compute prefill_computed_tokens; HF: start to first "
                       "token). decode_tokens_per_s = decode_tokens / time in decode steps (ours: the "
                       "scheduler's decode steps incl. host planning; HF: first to last token). Prefill and "
                       "decode steps of ours interleave (continuous batching), so their times add up to "
                       "about, not exactly, the wall time. HF: batched generate, left-padded, same fp32 "
                       "weights, warmed up on the full workload; its TPOT is the time per decode step. "
                       "Medians over repeats.")


if __name__ == "__main__":
    main()
