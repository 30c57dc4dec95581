"""SmolLM2 serving: 64 requests sharing a 1,000-token system prompt; shared-prefix attention on vs off vs HF."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import write_results  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Name a primary color.", "What is 7 times 8?", "Who wrote Hamlet?",
    "What is the boiling point of water?", "Name a large mammal.", "What is photosynthesis?",
    "How many days are in a week?", "What is the largest planet?", "Name a programming language.",
    "What does a thermometer measure?", "Who painted the Mona Lisa?", "What is the square root of 81?",
    "Name an ocean.", "What gas do plants absorb?", "What is the freezing point of water?",
]


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


def main() -> None:
    ap = argparse.ArgumentParser(prog="jaxsys bench engine", description=__doc__)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-repeats", type=int, default=None, help="repeats for HF (default: --repeats)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-threads", type=int, default=None,
                    help="torch intra-op threads for the HF baseline (default: torch's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from jaxsys.runtime import enable_compilation_cache

    enable_compilation_cache()
    import jaxsys
    from jaxsys.sampling import SamplingParams
    from jaxsys.serve import EngineConfig, ServingLLM

    model = jaxsys.load_model("smollm2-135m-instruct")
    tok = model.tokenizer
    sysmsg = system_prompt(tok, args.system_tokens)
    msgs = [[{"role": "system", "content": sysmsg},
             {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" (visitor {i})"}]
            for i in range(args.requests)]
    prompts = [tok.encode_chat(m) for m in msgs]
    sp = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)  # same work as HF's min_new_tokens
    n_tokens = args.requests * args.new_tokens
    records = []
    outputs = {}
    llms, compiled, runs = {}, {}, {}
    systems = (("jaxsys-shared", True), ("jaxsys-noshare", False))
    for system, shared in systems:
        pages = 64 + args.requests * ((args.system_tokens + 64 + args.new_tokens) // 16 + 2)
        cfg = EngineConfig(num_pages=max(pages, 512), max_decode_batch=args.requests, shared_attention=shared,
                           prefill_chunk=512)
        llms[system] = llm = ServingLLM(model, config=cfg)
        # warm-up: the same workload compiles every bucket it needs
        llm.generate(prompts, sp)
        compiled[system] = llm.engine.compile_count
        runs[system] = []
    # repeats round-robin over the systems, so load changes on a shared machine hit both alike
    for _ in range(args.repeats):
        for system, _shared in systems:
            llm = llms[system]
            llm.scheduler.radix.evict(10**9)  # every repeat starts with a cold prefix cache
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp)
            wall = time.perf_counter() - t0
            gen = sum(len(o.token_ids) for o in outs)
            tpot = [x for o in outs for x in o.tpot_s]
            runs[system].append((wall, gen, tpot))
            outputs[system] = [o.token_ids for o in outs]
    for system, _shared in systems:
        walls = [r[0] for r in runs[system]]
        med = statistics.median(walls)
        wall, gen, tpot = sorted(runs[system], key=lambda r: r[0])[len(walls) // 2]
        rec = {"system": system, "tokens_per_s": gen / wall, "p50_tpot_s": percentile(tpot, 50),
               "p99_tpot_s": percentile(tpot, 99), "median_s": med, "times_s": walls, "generated_tokens": gen,
               "compiles_after_warmup": llms[system].engine.compile_count - compiled[system],
               "shared_decode_steps": llms[system].scheduler.stats.shared_steps}
        print(f"{system:16s} {rec['tokens_per_s']:8.1f} tokens/s  p50 TPOT {rec['p50_tpot_s'] * 1e3:7.1f} ms  "
              f"p99 TPOT {rec['p99_tpot_s'] * 1e3:7.1f} ms  ({med:.1f}s/run)", flush=True)
        records.append(rec)
    del llms
    same = outputs["jaxsys-shared"] == outputs["jaxsys-noshare"]
    print(f"greedy outputs identical with and without sharing: {same}")

    if not args.skip_hf:
        import torch
        from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

        torch.manual_seed(0)
        if args.hf_threads:
            torch.set_num_threads(args.hf_threads)
        hf = AutoModelForCausalLM.from_pretrained(str(model.path.parent), gguf_file=model.path.name,
                                                  dtype=torch.float32).eval()
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

        class Stamp(StoppingCriteria):
            def __init__(self):
                self.times = []

            def __call__(self, input_ids, scores, **kw):
                self.times.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        runs = []
        for _ in range(args.hf_repeats or args.repeats):
            stamp = Stamp()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, pad_token_id=0,
                                  stopping_criteria=StoppingCriteriaList([stamp]))
            wall = time.perf_counter() - t0
            steps = [b - a for a, b in zip(stamp.times, stamp.times[1:])]
            runs.append((wall, out.shape[0] * (out.shape[1] - width), steps))
            print(f"  hf-transformers run: {wall:.1f}s", flush=True)
        wall, gen, steps = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        rec = {"system": "hf-transformers", "tokens_per_s": gen / wall, "p50_tpot_s": percentile(steps, 50),
               "p99_tpot_s": percentile(steps, 99), "median_s": wall, "times_s": [r[0] for r in runs],
               "generated_tokens": gen, "torch_threads": torch.get_num_threads()}
        print(f"{'hf-transformers':16s} {rec['tokens_per_s']:8.1f} tokens/s  p50 TPOT {rec['p50_tpot_s'] * 1e3:7.1f} ms"
              f"  p99 TPOT {rec['p99_tpot_s'] * 1e3:7.1f} ms", flush=True)
        records.append(rec)

    by = {r["system"]: r for r in records}
    ratios = {"shared_vs_noshare": by["jaxsys-shared"]["tokens_per_s"] / by["jaxsys-noshare"]["tokens_per_s"]}
    if "hf-transformers" in by:
        ratios["shared_vs_hf"] = by["jaxsys-shared"]["tokens_per_s"] / by["hf-transformers"]["tokens_per_s"]
    print("ratios:", {k: round(v, 2) for k, v in ratios.items()})
    write_results("engine", records, args.out, loadavg_end=os.getloadavg(), requests=args.requests, system_tokens=args.system_tokens,
                  new_tokens=args.new_tokens, repeats=args.repeats, ratios=ratios,
                  outputs_identical_shared_vs_noshare=same,
                  note="jaxsys-shared and jaxsys-noshare run the same engine with the radix prefix cache on "
                       "(cold at the start of each repeat; the 64 requests arrive together, so the system "
                       "prompt is prefilled once); they differ only in decode attention: shared-prefix "
                       "attention vs plain paged decode. tokens_per_s = generated tokens / wall time of the "
                       "whole batch (prefill + decode); every system generates exactly new_tokens per request "
                       "(EOS ignored). HF: batched generate, left-padded, same fp32 weights "
                       "(dequantized from the same GGUF); its TPOT is the time per decode step.")


if __name__ == "__main__":
    main()
