"""The serving section of `make demo` (see `jaxsys.demo`): 16 requests sharing a system prompt on
the serving engine, with shared-prefix decode attention and without, then the OpenAI server."""

from __future__ import annotations

import time
from typing import Any, Callable

QUESTIONS = ("Where are the dinosaurs?", "What is a black hole?", "Who discovered gravity?",
             "How do volcanoes form?")


def _run(model, prompts, sampling, shared: bool):
    """(tokens/s, median time per output token, prefix-cache hit rate, results) of one timed run
    after a warm-up run of the same workload."""
    from jaxsys.serve import EngineConfig, ServingLLM

    llm = ServingLLM(model, config=EngineConfig(num_pages=768, shared_attention=shared))
    llm.generate(prompts, sampling)  # compile this workload's buckets
    llm.scheduler.radix.evict(10**9)  # time a cold prefix cache, as a fresh server would have
    t0 = time.perf_counter()
    results = llm.generate(prompts, sampling)
    wall = time.perf_counter() - t0
    n = sum(len(r.token_ids) for r in results)
    tpot = sorted(x for r in results for x in r.tpot_s)
    return n / wall, tpot[len(tpot) // 2], llm.scheduler.radix.hit_rate, results


def demo_section(*, out: Callable[[str], Any] = print) -> None:
    from jaxsys.demo import demo_model
    from jaxsys.sampling import SamplingParams

    model = demo_model()
    tok = model.tokenizer
    out("== serving engine: 16 requests sharing a system prompt (radix prefix cache + shared-prefix "
        "decode attention)")
    system = tok.decode(tok.encode("You are the help desk of a science museum. Answer in one short "
                                   "sentence and mention the exhibit hall. " * 12)[:400])
    prompts = [tok.encode_chat([{"role": "system", "content": system},
                                {"role": "user", "content": QUESTIONS[i % 4] + f" (visitor {i})"}])
               for i in range(16)]
    sampling = SamplingParams(max_tokens=24)
    runs = {shared: _run(model, prompts, sampling, shared) for shared in (True, False)}
    for shared, (tps, tpot, hit, _) in runs.items():
        label = "shared-prefix attention " if shared else "split-KV paged attention"
        out(f"  {label}: {tps:6.1f} tokens/s, median time per output token {tpot * 1e3:6.1f} ms, "
            f"prefix-cache hit rate {hit:.0%}")
    same = [r.token_ids for r in runs[True][3]] == [r.token_ids for r in runs[False][3]]
    out(f"  speedup of shared-prefix decode: {runs[True][0] / runs[False][0]:.2f}x (same greedy tokens: "
        f"{same}); first answer: {runs[True][3][0].text.strip()[:60]!r}")
    out("  numbers for 64 requests x 1000-token prompt: jaxsys bench engine (benchmarks/results/engine.json)")

    out("== the OpenAI-compatible server")
    out("  jaxsys serve --model smollm2-135m-instruct --port 8000")
    out("  curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\")
    out("       -d '{\"model\": \"smollm2-135m-instruct\", \"messages\": [{\"role\": \"user\", "
        "\"content\": \"Hi\"}], \"stream\": true}'")
    out("  (or any OpenAI client with base_url=http://127.0.0.1:8000/v1; metrics at /metrics)")
