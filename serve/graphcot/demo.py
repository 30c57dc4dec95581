"""The GLM section of `make demo` (see `jaxsys.demo`): a few questions about the goodbooks-10k graph,
answered by GLM (C-, R- and A-Agents, sandboxed code) and by single-agent Graph-CoT on one engine
with the demo's model, then their tokens, LLM calls and latency side by side.

The demo's model is the untuned SmolLM2-135M-Instruct, which rarely answers these correctly; the
point here is the protocols running on the engine and what each costs. Both run with shortened
limits (below) so the section takes about a minute on 2 CPU cores; `jaxsys bench graphcot` has the
full comparison and `jaxsys bench graphcot_finetune` the fine-tuned accuracy.
"""

from __future__ import annotations

import time
from typing import Any, Callable

DEMO_TEMPLATES = ("authors", "year", "author_count", "top_rated")  # easy, easy, medium, hard
DEMO_LIMITS = dict(max_steps=3, graphcot_max_tokens=40, max_iters=1, r_tokens=32, a_tokens=96)


def _run(graph, backend, policy, system: str, questions) -> tuple[list, float, int]:
    """(records, wall seconds, compilations) of one system on the questions, all in flight."""
    from jaxsys.serve.graphcot.runner import GraphQA, RunConfig

    engine = backend.llm.engine
    compiles = engine.compile_count
    config = RunConfig(system=system, concurrency=len(questions), **DEMO_LIMITS)
    t0 = time.perf_counter()
    with GraphQA(graph, backend, config, policy=policy) as qa:
        records = qa.run(questions)
    return records, time.perf_counter() - t0, engine.compile_count - compiles


def demo_section(*, out: Callable[[str], Any] = print) -> dict[str, Any] | None:
    from jaxsys.demo import demo_model
    from jaxsys.serve import EngineConfig, ServingLLM
    from jaxsys.serve.graphcot.api import load_graph
    from jaxsys.serve.graphcot.backends import EngineBackend
    from jaxsys.serve.graphcot.cache_policy import VertexPriorityPolicy
    from jaxsys.serve.graphcot.questions import generate_questions, split
    from jaxsys.serve.graphcot.runner import summarize

    out("== GLM (multi-agent Graph-CoT) vs Graph-CoT on the goodbooks-10k graph")
    try:
        graph = load_graph("goodbooks").warm()
    except (FileNotFoundError, ImportError) as e:
        out(f"  skipped: {e}")
        return None
    questions = [split(generate_questions(graph, per_template=40, seed=0, templates=(t,)), "test")[0]
                 for t in DEMO_TEMPLATES]
    cfg = EngineConfig(num_pages=1024, max_decode_batch=8, max_prefill_batch=4, prefill_chunk=512)
    policy = VertexPriorityPolicy(cfg.page_size)
    backend = EngineBackend(ServingLLM(demo_model(), config=cfg, eviction_policy=policy), policy=policy)
    try:
        runs = {system: _run(graph, backend, policy, system, questions) for system in ("glm", "graphcot")}
    finally:
        backend.close()
    for k, q in enumerate(questions):
        out(f"  Q ({q['difficulty']}): {q['question']}   gold: {q['answer']}")
        for system, label in (("glm", "GLM"), ("graphcot", "Graph-CoT")):
            r = runs[system][0][k]
            out(f"     {label:9s} -> {r.answer or '(no answer)'!r:40.40s} {'correct' if r.correct else 'wrong'}, "
                f"{r.llm_calls} calls, {r.prompt_tokens + r.generated_tokens} tokens")
    summaries = {}
    for system, (records, wall, compiles) in runs.items():
        s = summarize(records)
        summaries[system] = s
        out(f"  {system:9s}: accuracy {s['accuracy']:.2f}, {s['llm_calls']:.1f} LLM calls, {s['prompt_tokens']:.0f} "
            f"prompt ({s['cached_tokens']:.0f} cached) + {s['generated_tokens']:.0f} generated tokens, p50 "
            f"{s['p50_s']:.1f}s per question, {wall:.1f}s for all {len(records)} ({compiles} compilations)")
    g, b = summaries["glm"], summaries["graphcot"]
    out(f"  GLM / Graph-CoT: tokens per question {g['tokens'] / b['tokens']:.2f}x, p50 latency "
        f"{g['p50_s'] / b['p50_s']:.2f}x (limits shortened for the demo: {DEMO_LIMITS})")
    out("  full comparison: jaxsys bench graphcot; fine-tuned accuracy: jaxsys bench graphcot_finetune")
    return {"ok": not any((r.error or "").startswith("backend") for recs, _, _ in runs.values() for r in recs),
            "tokens_ratio": g["tokens"] / b["tokens"]}
