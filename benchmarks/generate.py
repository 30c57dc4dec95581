"""SmolLM2 greedy tokens/s at batch 1 and 16: `jaxsys.generate` (the reference loop) vs HF transformers, same weights."""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import median_time, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(prog="jaxsys bench generate", description=__doc__)
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default: %(default)s)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true", help="measure jaxsys only")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/generate.json)")
    args = ap.parse_args()

    import numpy as np

    import jaxsys
    from jaxsys.runtime import enable_compilation_cache

    enable_compilation_cache()
    model = jaxsys.load_model("smollm2-135m-instruct", dtype="float32")
    rng = np.random.RandomState(0)
    records = []
    hf = None
    if not args.skip_hf:
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_pretrained(str(model.path.parent), gguf_file=model.path.name,
                                                  dtype=torch.float32).eval()
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = rng.randint(100, model.config.vocab_size, (b, args.prompt_len)).tolist()
        n_tokens = b * args.new_tokens

        def ours():
            res = jaxsys.generate(model, prompts, max_tokens=args.new_tokens, ignore_eos=True)
            assert all(len(r.token_ids) == args.new_tokens for r in res)

        systems = {"jaxsys": ours}
        if hf is not None:
            import torch

            ids = torch.tensor(prompts)

            def theirs():
                with torch.no_grad():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      pad_token_id=0)
                assert out.shape[1] == args.prompt_len + args.new_tokens

            systems["hf-transformers"] = theirs
        for fn in systems.values():  # warm-up (compiles our buckets)
            fn()
        times = {name: [] for name in systems}
        for _ in range(args.repeats):  # round-robin: load changes hit every system alike
            for name, fn in systems.items():
                times[name].append(median_time(fn, 1)[0])
        for name, ts in times.items():
            med = statistics.median(ts)
            records.append({"system": name, "batch": b, "tokens_per_s": n_tokens / med, "median_s": med,
                            "times_s": ts})
            print(f"{name:15s} batch {b:3d}: {n_tokens / med:8.1f} tokens/s (median {med:.2f}s)", flush=True)
    # no target was set for the reference loop: the record reports the ratios, it claims none
    write_results("generate", records, args.out, targets=[], model="smollm2-135m-instruct", dtype="float32",
                  prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                  note="jaxsys.generate is the plain reference loop (decoder attention, no prefix cache; the "
                       "serving engine is measured by `jaxsys bench engine`). tokens_per_s = batch * new_tokens "
                       "/ wall time of one generate call (prefill + decode), greedy, EOS ignored; median over "
                       "repeats after a warm-up call")


if __name__ == "__main__":
    main()
