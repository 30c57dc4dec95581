"""`jaxsys generate`: generate text from a named model, an HF folder or a GGUF file.

Runs on the serving engine (continuous batching, radix prefix cache, shared-prefix decode
attention), sized for the prompts at hand: one KV page run per prompt, its prompt plus
`--max-tokens` long.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from jaxsys.serve.cli_devices import DeviceError, add_device_args, request_devices, tensor_mesh


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxsys generate",
        description="Generate text from a model on the serving engine. Several prompts run as one batch; "
                    "a single prompt is streamed to the terminal token by token.",
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
                   help="plain split-KV paged decode attention (no sharing) instead of shared-prefix attention")
    add_device_args(p)
    p.add_argument("--quiet", action="store_true", help="no timing line on stderr")
    return p


def _fail(message: object) -> int:
    print(f"jaxsys generate: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from jaxsys.sampling import SamplingParams

    try:
        samplings = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, seed=args.seed + i, stop=tuple(args.stop))
                     for i in range(len(args.prompts))]
        request_devices(args)
    except (ValueError, DeviceError) as e:
        return _fail(e)
    from jaxsys.runtime import enable_compilation_cache

    enable_compilation_cache()
    import jaxsys
    from jaxsys.models import ConfigError, ModelNotFoundError, TokenizerError, WeightError
    from jaxsys.serve.engine.engine import EngineConfig
    from jaxsys.generation import encode_prompt
    from jaxsys.serve.llm import ServingLLM
    from jaxsys.serve.scheduler.scheduler import RequestError

    try:
        mesh = tensor_mesh(args.tensor_parallel)
        model = jaxsys.load_model(args.model, dtype=args.dtype)
        prompt_ids = [encode_prompt(model.tokenizer, p, chat=args.chat) for p in args.prompts]
    except (DeviceError, ModelNotFoundError, WeightError, ConfigError, TokenizerError, ValueError) as e:
        return _fail(e)
    page_size = EngineConfig().page_size
    context = model.config.max_position_embeddings
    pages = 1 + sum(math.ceil(min(len(ids) + args.max_tokens, context) / page_size) for ids in prompt_ids)
    config = EngineConfig(page_size=page_size, num_pages=pages, max_decode_batch=len(prompt_ids),
                          shared_attention=not args.no_shared_attention)
    llm = ServingLLM(model, config=config, mesh=mesh)
    single = len(prompt_ids) == 1

    def on_output(i: int, out) -> None:
        if single and out.text:
            sys.stdout.write(out.text)
            sys.stdout.flush()

    t0 = time.perf_counter()
    try:
        results = llm.generate(prompt_ids, samplings, on_output=on_output)
    except RequestError as e:
        return _fail(e)
    wall = time.perf_counter() - t0
    if single:
        print()
    else:
        for i, (prompt, r) in enumerate(zip(args.prompts, results)):
            print(f"--- [{i}] {prompt!r}\n{r.text}")
    if not args.quiet:
        n = sum(len(r.token_ids) for r in results)
        print(f"[{len(results)} prompt(s), {n} tokens in {wall:.2f}s incl. compile]", file=sys.stderr)
    return 0
