"""`jaxsys generate`: generate text from a named model, an HF folder or a GGUF file.

Runs on the serving engine (`jaxsys.serve`: continuous batching, radix prefix cache, shared-prefix
decode attention), loaded only when this command runs.
"""

from __future__ import annotations

import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxsys generate",
        description="Generate text from a model. Several prompts run as one batch; a single prompt is "
                    "streamed to the terminal token by token.",
        epilog='example: jaxsys generate --chat "What is the capital of France?"')
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="registry name, HF model folder or .gguf file (default: %(default)s)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i uses seed+i)")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when STR is generated (repeatable)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--no-shared-attention", action="store_true",
                   help="plain paged decode attention instead of shared-prefix attention")
    p.add_argument("--quiet", action="store_true", help="no timing line on stderr")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from jaxsys.sampling import SamplingParams

    try:
        SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    except ValueError as e:
        print(f"jaxsys generate: {e}", file=sys.stderr)
        return 2
    from jaxsys.runtime import enable_compilation_cache

    enable_compilation_cache()
    import importlib

    import jaxsys
    from jaxsys.models import ConfigError, ModelNotFoundError, TokenizerError, WeightError

    serve = importlib.import_module("jaxsys.serve")
    from jaxsys.serve.scheduler.scheduler import RequestError

    try:
        model = jaxsys.load_model(args.model, dtype=args.dtype)
    except (ModelNotFoundError, WeightError, ConfigError, TokenizerError) as e:
        print(f"jaxsys generate: {e}", file=sys.stderr)
        return 2
    if model.tokenizer is None:
        print("jaxsys generate: this model has no tokenizer", file=sys.stderr)
        return 2
    single = len(args.prompts) == 1
    longest = max(len(model.tokenizer.encode(p)) for p in args.prompts) + 64
    pages = len(args.prompts) * (-(-(longest + args.max_tokens) // 16)) + 2
    config = serve.EngineConfig(num_pages=max(pages, 64), max_decode_batch=max(1, len(args.prompts)),
                                shared_attention=not args.no_shared_attention)
    llm = serve.ServingLLM(model, config=config)
    samplings = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed + i, stop=tuple(args.stop))
                 for i in range(len(args.prompts))]

    def on_output(i: int, out) -> None:
        if single and out.text:
            sys.stdout.write(out.text)
            sys.stdout.flush()

    t0 = time.perf_counter()
    try:
        results = llm.generate(args.prompts, samplings, chat=args.chat, on_output=on_output)
    except (RequestError, ValueError, TokenizerError) as e:
        print(f"jaxsys generate: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    if single:
        print()
    else:
        for i, r in enumerate(results):
            print(f"--- [{i}] {args.prompts[i]!r}\n{r.text}")
    if not args.quiet:
        n = sum(len(r.token_ids) for r in results)
        print(f"[{len(results)} prompt(s), {n} tokens in {wall:.2f}s incl. compile]", file=sys.stderr)
    return 0
