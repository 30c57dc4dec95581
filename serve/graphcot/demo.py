"""The GLM section of `make demo` (see `jaxsys.demo`): two questions about the goodbooks-10k graph,
answered by GLM (C-, R- and A-Agents, sandboxed code) and by single-agent Graph-CoT on one engine
with the demo's model, then their tokens, LLM calls and latency side by side.

The demo's model is the untuned SmolLM2-135M-Instruct, which rarely answers these correctly; the
point here is the two protocols running on the engine and what each costs. `jaxsys bench graphcot`
has the full comparison (more questions, full limits, many in flight, the serving ablation) and
`jaxsys bench graphcot_finetune` the fine-tuned accuracy.

What keeps the section short on 2 CPU cores, where XLA compilations are a large part of it (11 programs),
without changing either protocol (prompts, stops, agents, parsing):

- One request at a time on one engine (questions one after another, `max_decode_batch=1`): every
  prefill and decode step is a batch of one, so both systems run the same few compiled programs,
  one per page-table (and prefill chunk) bucket; plain split-KV decode attention, whose programs
  depend on the batch shape alone (the shared-prefix step adds the shape of each step's sharing
  plan). One question in flight also keeps each question's latency its own.
- Two questions, chosen deterministically (the first test question of a template, as `jaxsys bench
  graphcot` generates them), of templates both systems can answer within the demo's limits: a
  publication year (Graph-CoT: RetrieveNode, NodeFeature, Finish) and an author's number of books
  (RetrieveNode, NodeDegree, Finish); GLM answers either with one round of code.
- Shorter limits (`DEMO_LIMITS`, printed with the results): Graph-CoT's 3 steps are the fewest
  both questions need; GLM gets one round of code; per-call token limits that still fit every
  line and snippet the prompts' own examples show.

Each system starts from an empty prefix cache. Compilation happens inside whichever question first
needs a program; its seconds are measured per question (one question in flight, so they are that
question's) and the latency comparison leaves them out.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

DEMO_TEMPLATES = ("year", "author_count")  # easy, medium
DEMO_LIMITS = dict(max_steps=3, graphcot_max_tokens=32, max_iters=1, c_tokens=8, r_tokens=32, a_tokens=64)
DEMO_ENGINE = dict(num_pages=512, max_decode_batch=1, max_prefill_batch=1, prefill_chunk=512,
                   shared_attention=False)
SYSTEMS = (("glm", "GLM"), ("graphcot", "Graph-CoT"))


def demo_questions(graph) -> list[dict[str, Any]]:
    """The first test question of each of `DEMO_TEMPLATES` (questions generated as `jaxsys bench
    graphcot` generates them: 40 per template, seed 0)."""
    from jaxsys.serve.graphcot.questions import generate_questions, split

    questions = []
    for t in DEMO_TEMPLATES:
        test = split(generate_questions(graph, per_template=40, seed=0, templates=(t,)), "test")
        if not test:
            raise ValueError(f"the graph has no test question of the {t!r} template")
        questions.append(test[0])
    return questions


def _run_system(graph, backend, policy, system: str, questions) -> list[tuple[Any, int, float]]:
    """(record, compilations, compile seconds) of each question, one question at a time, from an
    empty prefix cache."""
    from jaxsys.serve.graphcot.runner import GraphQA, RunConfig

    engine = backend.llm.engine
    backend.llm.scheduler.radix.evict(1 << 40)  # the scheduler is idle between questions
    runs = []
    with GraphQA(graph, backend, RunConfig(system=system, concurrency=1, **DEMO_LIMITS), policy=policy) as qa:
        if qa.sandbox is not None:
            qa.sandbox.run("print(0)")  # start its worker process, as a running service has it
        for q in questions:
            count, seconds = engine.compile_count, engine.compile_seconds
            record = qa.answer(q)
            runs.append((record, engine.compile_count - count, engine.compile_seconds - seconds))
    return runs


def _mean(values) -> float:
    return statistics.mean(values) if values else 0.0


def run_comparison(model, graph, questions: Sequence[dict[str, Any]], *,
                   out: Callable[[str], Any] = print) -> dict[str, Any]:
    """GLM, then Graph-CoT, on `questions` on one engine serving `model` (priority eviction);
    prints each question's answers and the per-question means of both systems. Returns
    {"ok": no backend error, "compiles": n, "seconds": wall, "<system>": per-question means}."""
    from jaxsys.serve import EngineConfig, ServingLLM
    from jaxsys.serve.graphcot.backends import EngineBackend
    from jaxsys.serve.graphcot.cache_policy import VertexPriorityPolicy

    t0 = time.perf_counter()
    config = EngineConfig(**DEMO_ENGINE)
    policy = VertexPriorityPolicy(config.page_size)
    backend = EngineBackend(ServingLLM(model, config=config, eviction_policy=policy), policy=policy)
    try:
        runs = {system: _run_system(graph, backend, policy, system, questions) for system, _ in SYSTEMS}
    finally:
        backend.close()
    wall = time.perf_counter() - t0

    for k, q in enumerate(questions):
        out(f"  Q{k + 1} ({q.get('difficulty') or 'question'}): {q['question']}   gold: {q['answer']}")
        for system, label in SYSTEMS:
            r = runs[system][k][0]
            answer = repr(r.answer) if r.answer else "(no answer)"
            note = f", {r.error}" if r.error else ""
            out(f"     {label:9s} -> {answer[:48]:48s} {'correct' if r.correct else 'wrong'} "
                f"({r.llm_calls} LLM calls{note})")
    means = {}
    for system, _ in SYSTEMS:
        recs = [r for r, _, _ in runs[system]]
        means[system] = {
            "accuracy": _mean([float(r.correct) for r in recs]),
            "prompt_tokens": _mean([r.prompt_tokens for r in recs]),
            "cached_tokens": _mean([r.cached_tokens or 0 for r in recs]),
            "generated_tokens": _mean([r.generated_tokens for r in recs]),
            "llm_calls": _mean([r.llm_calls for r in recs]),
            "latency_s": _mean([r.seconds - c for r, _, c in runs[system]]),
            "compiles": sum(n for _, n, _ in runs[system]),
            "compile_s": sum(c for _, _, c in runs[system]),
        }
    g, b = means["glm"], means["graphcot"]

    def ratio(key: str) -> str:
        return f"{g[key] / b[key]:.2f}x" if b[key] else "-"

    head = f"per question (mean of {len(questions)})"
    out(f"  {head:30s} {'GLM':>7s} {'Graph-CoT':>10s}  {'GLM/Graph-CoT':>13s}")
    for key, label, fmt in (("prompt_tokens", "prompt tokens", ".0f"), ("cached_tokens", "  of them cached", ".0f"),
                            ("generated_tokens", "generated tokens", ".0f"), ("llm_calls", "LLM calls", ".1f"),
                            ("latency_s", "latency (s)", ".1f")):
        out(f"    {label:28s} {g[key]:7{fmt}} {b[key]:10{fmt}}  {ratio(key):>13s}")
    out(f"  latency leaves out compilation (GLM {g['compiles']} programs, {g['compile_s']:.1f}s; Graph-CoT "
        f"{b['compiles']} more, {b['compile_s']:.1f}s: the rest it shares with GLM on the one engine)")
    out(f"  demo limits: Graph-CoT {DEMO_LIMITS['max_steps']} steps, GLM {DEMO_LIMITS['max_iters']} round of code, "
        f"one question at a time; {wall:.0f}s for both. Full limits, many questions in flight and the serving "
        "ablation: jaxsys bench graphcot; fine-tuned accuracy: jaxsys bench graphcot_finetune")
    ok = not any((r.error or "").startswith("backend") for system, _ in SYSTEMS for r, _, _ in runs[system])
    return {"ok": ok, "compiles": g["compiles"] + b["compiles"], "seconds": wall, **means}


def demo_section(*, out: Callable[[str], Any] = print) -> dict[str, Any] | None:
    from jaxsys.demo import DEMO_MODEL, demo_model
    from jaxsys.serve.graphcot.api import load_graph

    out(f"== GLM (multi-agent Graph-CoT) vs Graph-CoT on the goodbooks-10k graph, {DEMO_MODEL} (untuned)")
    try:
        graph = load_graph("goodbooks").warm()
    except (FileNotFoundError, ImportError) as e:
        out(f"  skipped: {e}")
        return None
    return run_comparison(demo_model(), graph, demo_questions(graph), out=out)
