"""GLM vs Graph-CoT on our engine (tokens, calls, latency, throughput, accuracy), the serving ablation, and the Qwen3-14B Graph-CoT replay.

Same run, same engine, same model (SmolLM2-135M-Instruct by default), same questions (the test
split of questions generated from GRBench's goodreads templates over goodbooks-10k; `--questions`
of them, easy / medium / hard in turn):

1. GLM and Graph-CoT at `--concurrency` questions in flight: tokens per question (prompt, cached,
   generated), LLM calls, p50/p99 latency per question, throughput, untuned accuracy (exact match
   after normalisation, overall and per difficulty; Rouge-L). Graph-CoT runs on the same engine with
   the same prefix cache and eviction policy: its append-only scratchpad is served from the radix
   cache as well.
2. GLM ablation on the same engine: vertex-centric layout off, pipelining off. `tool_overlap`
   measures what pipelining does: the fraction of tool seconds (graph calls, sandboxed code)
   during which other questions had LLM calls in flight on the engine.
3. Priority eviction vs LRU for GLM at a KV budget of half the working set (the working set is
   the number of distinct whole-page prefixes of all the prompts GLM sent in step 1, i.e. the tree
   size with nothing evicted).
4. The real Qwen3-14B Graph-CoT call/token profile (`../shared/data/glm/graphcot-traces/`)
   replayed through the engine (`jaxsys.serve.graphcot.replay`), priority vs LRU at half its
   working set.

Every run starts from an empty prefix cache; each engine first runs every variant once on the
measured workload (which compiles the shape buckets it needs; `--warmup system`: the first variant
of each system only), then the measured rounds rotate the variants' order; `compiles` counts compilations during measured runs (0 in steady state). Each run
also records `cpu_s`, this process's CPU seconds, a cost that other load on the machine stretches
less than the wall clock. The record is rewritten after every phase (`complete` says whether all
ran).

Fine-tuned accuracy (part D of the issue): `jaxsys bench graphcot_finetune` fine-tunes one model per
system (same token budget) and caches them as HF folders; pass them with `--finetuned-glm PATH
--finetuned-graphcot PATH` and this run evaluates both on the same test questions and adds the
accuracy target (`finetuned_accuracy_glm_minus_graphcot`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import target, write_results  # noqa: E402

NUMERIC = ("accuracy", "accuracy_easy", "accuracy_medium", "accuracy_hard", "rouge_l", "llm_calls", "prompt_tokens",
           "cached_tokens", "generated_tokens", "tokens", "p50_s", "p99_s", "parse_failures", "finished",
           "throughput_qps", "wall_s", "cpu_s", "compile_s", "hit_rate", "tool_overlap")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxsys bench graphcot", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--graph", default="goodbooks")
    p.add_argument("--per-template", type=int, default=40, help="generated questions per template (60/20/20 split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--questions", type=int, default=32,
                   help="test questions per variant: easy, medium and hard in turn, each difficulty's templates "
                        "in turn (any n >= 3 has every difficulty, n >= 15 every template)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="repeats per variant (medians reported)")
    p.add_argument("--warmup", choices=["variant", "system"], default="variant",
                   help="warm-up runs on each engine: every variant, or the first variant of each system (about "
                        "half the runs; compilations left to measured runs are recorded)")
    p.add_argument("--num-pages", type=int, default=4096, help="KV pages of the main engine")
    p.add_argument("--replay-domain", default="goodreads", choices=["goodreads", "amazon", "physics"])
    p.add_argument("--replay-questions", type=int, default=32)
    p.add_argument("--skip-ablation", action="store_true")
    p.add_argument("--skip-eviction", action="store_true")
    p.add_argument("--skip-replay", action="store_true")
    p.add_argument("--finetuned-glm", default=None, help="part D: fine-tuned model for GLM (evaluated on the test set)")
    p.add_argument("--finetuned-graphcot", default=None, help="part D: fine-tuned model for Graph-CoT")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/graphcot.json)")
    return p


class SwitchPolicy:
    """The eviction policy a ServingLLM holds, switched between variants (LRU or priority)."""

    def __init__(self):
        from jaxsys.serve.scheduler.radix import LRUPolicy

        self.inner = LRUPolicy()

    def key(self, node) -> float:
        return self.inner.key(node)


def make_engine(model, num_pages: int, concurrency: int):
    from jaxsys.serve import EngineConfig, ServingLLM
    from jaxsys.serve.graphcot.backends import EngineBackend

    class LoggingBackend(EngineBackend):
        """Keeps every prompt's token ids while `log` is a list (to measure the working set)."""

        log: list[list[int]] | None = None

        def complete_tokens(self, ids, spans, **kw):
            if self.log is not None:
                self.log.append(list(ids))
            return super().complete_tokens(ids, spans, **kw)

    switch = SwitchPolicy()
    cfg = EngineConfig(num_pages=num_pages, max_decode_batch=max(16, concurrency), max_prefill_batch=8,
                       prefill_chunk=512)
    llm = ServingLLM(model, config=cfg, eviction_policy=switch)
    return llm, LoggingBackend(llm), switch


def set_policy(backend, switch, priority: bool):
    from jaxsys.serve.graphcot.cache_policy import VertexPriorityPolicy
    from jaxsys.serve.scheduler.radix import LRUPolicy

    policy = VertexPriorityPolicy(backend.llm.engine.config.page_size) if priority else None
    switch.inner = policy or LRUPolicy()
    backend.policy = policy
    return policy


def median_summary(runs: list[dict]) -> dict:
    out = {}
    for k in runs[0]:
        vals = [r[k] for r in runs]
        if k in NUMERIC and all(isinstance(v, (int, float)) for v in vals):
            out[k] = statistics.median(vals)
        else:
            out[k] = vals[len(vals) // 2]
    return out


def _cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) so far: a run's cost, read apart from the
    wall clock, which other load on the machine stretches."""
    t = os.times()
    return t.user + t.system


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    system: str  # glm | graphcot | replay
    priority: bool = True
    config: tuple = ()  # RunConfig overrides, as (key, value) pairs


def run_once(variant: Variant, graph, backend, switch, workload, concurrency: int) -> tuple[dict, list | None]:
    """One cold-cache run of a variant: its summary (and per-question records)."""
    from jaxsys.serve.graphcot import replay
    from jaxsys.serve.graphcot.runner import GraphQA, RunConfig, summarize, tool_overlap

    llm = backend.llm
    radix = llm.scheduler.radix
    radix.evict(1 << 40)  # every run starts from an empty prefix cache
    policy = set_policy(backend, switch, variant.priority)
    hits, lookups = radix.hit_tokens, radix.lookup_tokens
    compiles, compile_s = llm.engine.compile_count, llm.engine.compile_seconds
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    if variant.system == "replay":
        recs, wall = replay.run_replay(backend, workload, concurrency=concurrency,
                                       generated_tokens=replay.ReplayShape().generated_tokens, policy=policy)
        s, per_question = replay.summarize_replay(recs, wall), None
    else:
        cfg = RunConfig(system=variant.system, concurrency=concurrency, **dict(variant.config))
        with GraphQA(graph, backend, cfg, policy=policy) as qa:
            records = qa.run(workload, progress=True)
        wall = time.perf_counter() - t0
        s = summarize(records)
        s.update(throughput_qps=len(records) / wall, wall_s=wall, tool_overlap=tool_overlap(qa.timeline))
        per_question = [dataclasses.asdict(r) for r in records]
    s.update(compiles=llm.engine.compile_count - compiles, compile_s=llm.engine.compile_seconds - compile_s,
             cpu_s=_cpu_seconds() - cpu0, hit_rate=(radix.hit_tokens - hits) / max(1, radix.lookup_tokens - lookups))
    return s, per_question


def warm_up_done(name: str, s: dict) -> None:
    print(f"  warm-up {name}: {s['wall_s']:.0f}s wall {s['cpu_s']:.0f}s cpu, {s['compiles']} compiles "
          f"({s['compile_s']:.1f}s)", flush=True)


def compare(variants: list[Variant], graph, backend, switch, workload, *, concurrency: int, repeats: int,
            warmup: str = "variant", warmed: tuple[Variant, ...] = ()) -> list[dict]:
    """Warm up on the measured workload itself (compiles the shape buckets it needs): every variant
    once (`warmup="variant"`), or the first variant of each system (`"system"`: the variants of one
    system send the same kind of prompts, so they mostly share buckets; what is left compiles inside
    measured runs and is recorded in `compiles` / `compile_s`), skipping what `warmed` already ran on
    this engine. Then `repeats` rounds over the variants, the order rotating each round so drift in
    the machine's load hits every variant alike. Medians over the rounds."""
    def key(v: Variant) -> str:
        return v.name if warmup == "variant" else v.system

    done = {key(v) for v in warmed}
    for v in variants:
        if key(v) not in done:
            print(f"  warm-up {v.name}", flush=True)
            warm_up_done(v.name, run_once(v, graph, backend, switch, workload, concurrency)[0])
            done.add(key(v))
    runs: dict[str, list[dict]] = {v.name: [] for v in variants}
    per_question: dict[str, list | None] = {}
    for r in range(repeats):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            s, pq = run_once(v, graph, backend, switch, workload, concurrency)
            runs[v.name].append(s)
            per_question.setdefault(v.name, pq)
    out = []
    for v in variants:
        med = median_summary(runs[v.name])
        if v.system == "replay":
            print(f"  {v.name:28s} hit {med['hit_rate']:.3f} | p50 {med['p50_s']:6.1f}s p99 {med['p99_s']:6.1f}s | "
                  f"{med['throughput_qps']:.3f} q/s | {med['wall_s']:.0f}s wall {med['cpu_s']:.0f}s cpu | compiles "
                  f"{med['compiles']}", flush=True)
        else:
            levels = "/".join(f"{med[k]:.2f}" for k in ("accuracy_easy", "accuracy_medium", "accuracy_hard")
                              if med.get(k) is not None)
            print(f"  {v.name:28s} acc {med['accuracy']:.3f} (e/m/h {levels}) rougeL {med['rouge_l']:.3f} | calls "
                  f"{med['llm_calls']:5.1f} tokens {med['tokens']:8.0f} (cached {med['cached_tokens'] or 0:8.0f}) | "
                  f"p50 {med['p50_s']:6.1f}s p99 {med['p99_s']:6.1f}s | {med['throughput_qps']:.3f} q/s | hit "
                  f"{med['hit_rate']:.3f} | tool overlap {med['tool_overlap']:.2f} | {med['wall_s']:.0f}s wall "
                  f"{med['cpu_s']:.0f}s cpu | compiles {med['compiles']}", flush=True)
        out.append({"variant": v.name, "system": v.system, "priority_eviction": v.priority, "config": dict(v.config),
                    "median": med, "repeats": runs[v.name], "questions": per_question.get(v.name)})
    return out


def working_set(prompts: list[list[int]], page_size: int) -> int:
    from jaxsys.serve.graphcot.replay import ReplayQuestion, working_set_pages

    return working_set_pages([ReplayQuestion("all", prompts, [], 0, 0)], page_size)


def budget_pages(ws: int, largest_request_pages: int) -> tuple[int, bool]:
    """Half the working set (plus the scratch page), but never less than two of the largest
    request (an engine that cannot admit a request is not a cache experiment)."""
    half = math.ceil(ws / 2)
    floor = 2 * largest_request_pages
    return max(half, floor) + 1, half < floor


def main() -> None:
    args = build_parser().parse_args()
    from jaxsys.runtime import enable_compilation_cache

    enable_compilation_cache()
    import jaxsys

    t_start = time.perf_counter()

    def write(records: list[dict], header: dict, complete: bool) -> None:
        write_results("graphcot", records, args.out, targets=compute_targets(records), **header, complete=complete,
                      wall_s=time.perf_counter() - t_start)

    model = jaxsys.load_model(args.model)
    records, header = run_benchmark(model, args, checkpoint=write)
    write(records, header, True)
    plot(records, args.out)


def run_benchmark(model, args, checkpoint=None) -> tuple[list[dict], dict]:
    """Every phase of the module docstring; `checkpoint(records, header, False)` after each phase,
    so a run stopped part-way keeps what it measured."""
    import gc

    from jaxsys.serve.graphcot.api import data_dir, load_graph
    from jaxsys.serve.graphcot.questions import generate_questions, split, spread

    graph = load_graph(args.graph).warm()
    qs = generate_questions(graph, per_template=args.per_template, seed=args.seed)
    test = spread(split(qs, "test"), args.questions)
    c = args.concurrency
    records: list[dict] = []
    header = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "model": str(args.model),
              "questions": [q["qid"] for q in test],
              "questions_per_difficulty": dict(collections.Counter(q.get("difficulty") for q in test))}
    print(f"graphcot bench: {len(test)} test questions, concurrency {c}, model {args.model}", flush=True)

    # 1-2: both systems and the GLM ablation on the main engine
    llm, backend, switch = make_engine(model, args.num_pages, c)
    backend.log = []
    print("  warm-up glm (and its prompts: the working set)", flush=True)
    warm_up_done("glm", run_once(Variant("glm", "glm"), graph, backend, switch, test, c)[0])
    glm_prompts, backend.log = backend.log, None
    variants = [Variant("glm", "glm"), Variant("graphcot", "graphcot")]
    if not args.skip_ablation:
        variants += [Variant("glm-no-sharing", "glm", config=(("sharing", False),)),
                     Variant("glm-no-pipelining", "glm", config=(("pipelining", False),))]
    records += compare(variants, graph, backend, switch, test, concurrency=c, repeats=args.repeats,
                       warmup=args.warmup, warmed=(variants[0],))
    ps = llm.engine.config.page_size
    backend.close()
    del llm, backend
    gc.collect()
    if checkpoint is not None:
        checkpoint(records, header, False)

    # 3: priority vs LRU for GLM at half its working set
    if not args.skip_eviction:
        from jaxsys.serve.graphcot.runner import RunConfig

        ws = working_set(glm_prompts, ps)
        largest = max(math.ceil((len(p) + RunConfig().a_tokens) / ps) for p in glm_prompts)
        pages, clamped = budget_pages(ws, largest)
        header.update(glm_working_set_pages=ws, glm_budget_pages=pages - 1, glm_budget_clamped=clamped)
        print(f"GLM working set {ws} pages; budget {pages - 1}{' (clamped)' if clamped else ''}", flush=True)
        llm, backend, switch = make_engine(model, pages, c)
        records += compare([Variant("glm-half-ws-lru", "glm", priority=False),
                            Variant("glm-half-ws-priority", "glm", priority=True)],
                           graph, backend, switch, test, concurrency=c, repeats=args.repeats, warmup=args.warmup)
        backend.close()
        del llm, backend
        gc.collect()
        if checkpoint is not None:
            checkpoint(records, header, False)

    # 4: the Qwen3-14B Graph-CoT profile replayed, priority vs LRU at half its working set
    if not args.skip_replay:
        from jaxsys.serve.graphcot import replay

        shape = replay.ReplayShape()
        profile = replay.load_profile(replay.trace_path(data_dir(), args.replay_domain), args.replay_questions)
        questions = replay.build_replay(profile, vocab_size=model.config.vocab_size, shape=shape, seed=args.seed)
        ws = replay.working_set_pages(questions, ps)
        largest = max(math.ceil((len(ids) + shape.generated_tokens) / ps) for q in questions for ids in q.calls)
        pages, clamped = budget_pages(ws, largest)
        header.update(replay_working_set_pages=ws, replay_budget_pages=pages - 1, replay_budget_clamped=clamped,
                      replay_shape=dataclasses.asdict(shape),
                      replay_profile={"domain": args.replay_domain, "questions": len(profile),
                                      "mean_calls": statistics.mean(p["calls"] for p in profile),
                                      "mean_tokens": statistics.mean(p["tokens"] for p in profile)})
        print(f"replay ({args.replay_domain}, {len(questions)} questions): working set {ws} pages; budget "
              f"{pages - 1}{' (clamped)' if clamped else ''}", flush=True)
        llm, backend, switch = make_engine(model, pages, c)
        records += compare([Variant("replay-half-ws-lru", "replay", priority=False),
                            Variant("replay-half-ws-priority", "replay", priority=True)],
                           graph, backend, switch, questions, concurrency=c, repeats=args.repeats,
                           warmup=args.warmup)
        backend.close()
        del llm, backend
        gc.collect()
        if checkpoint is not None:
            checkpoint(records, header, False)

    # part D hook: fine-tuned models, evaluated on the same test questions
    if args.finetuned_glm or args.finetuned_graphcot:
        import jaxsys

        for system, path in (("glm", args.finetuned_glm), ("graphcot", args.finetuned_graphcot)):
            if path is None:
                continue
            tuned = jaxsys.load_model(path)
            llm, backend, switch = make_engine(tuned, args.num_pages, c)
            [rec] = compare([Variant(f"{system}-finetuned", system)], graph, backend, switch, test, concurrency=c,
                            repeats=1)
            rec["model"] = path
            records.append(rec)
            backend.close()
            del llm, backend, tuned
            gc.collect()
    return records, header


def _ratio_target(name: str, num: float, den: float, goal: float, *, higher_is_better: bool) -> dict:
    return target(name, num / den if den else float("inf"), goal, higher_is_better=higher_is_better)


def _beats(name: str, value: float, *, higher_is_better: bool, goal: float) -> dict:
    met = value > goal if higher_is_better else value < goal
    return {"name": name, "value": float(value), "target": goal, "direction": ">" if higher_is_better else "<",
            "met": bool(met)}


def compute_targets(records: list[dict]) -> list[dict]:
    """Every target of the issue this run can compute, from the records above."""
    by = {r["variant"]: r["median"] for r in records}
    out = []
    if "glm" in by and "graphcot" in by:
        g, b = by["glm"], by["graphcot"]
        out.append(_ratio_target("tokens_per_question_glm_over_graphcot", g["tokens"], b["tokens"], 0.3,
                                 higher_is_better=False))
        out.append(_ratio_target("p50_latency_glm_over_graphcot", g["p50_s"], b["p50_s"], 0.3,
                                 higher_is_better=False))
        out.append(_ratio_target("throughput_glm_over_graphcot_c16", g["throughput_qps"], b["throughput_qps"], 5.0,
                                 higher_is_better=True))
    for workload, prefix in (("glm", "glm-half-ws-"), ("replay", "replay-half-ws-")):
        lru, prio = by.get(prefix + "lru"), by.get(prefix + "priority")
        if lru and prio:
            out.append(_beats(f"{workload}_half_ws_hit_rate_priority_minus_lru", prio["hit_rate"] - lru["hit_rate"],
                              higher_is_better=True, goal=0.0))
            out.append(_beats(f"{workload}_half_ws_p50_latency_priority_over_lru",
                              prio["p50_s"] / lru["p50_s"] if lru["p50_s"] else float("inf"),
                              higher_is_better=False, goal=1.0))
    if "glm-finetuned" in by and "graphcot-finetuned" in by:
        out.append(_beats("finetuned_accuracy_glm_minus_graphcot",
                          by["glm-finetuned"]["accuracy"] - by["graphcot-finetuned"]["accuracy"],
                          higher_is_better=True, goal=0.0))
    return out


def plot(records: list[dict], out: str | None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from _common import RESULTS

    by = {r["variant"]: r["median"] for r in records}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    qa = [v for v in ("glm", "graphcot", "glm-no-sharing", "glm-no-pipelining") if v in by]
    axes[0].bar(qa, [by[v]["tokens"] for v in qa], label="prompt + generated")
    axes[0].bar(qa, [by[v]["cached_tokens"] or 0 for v in qa], label="of which cached")
    axes[0].set_title("tokens per question")
    axes[0].legend(fontsize=7)
    axes[1].bar(qa, [by[v]["p50_s"] for v in qa])
    axes[1].set_title("p50 latency per question (s)")
    ev = [v for v in ("glm-half-ws-lru", "glm-half-ws-priority", "replay-half-ws-lru", "replay-half-ws-priority")
          if v in by]
    axes[2].bar(ev, [by[v]["hit_rate"] for v in ev])
    axes[2].set_title("prefix-cache hit rate at half the working set")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    path = (os.path.splitext(out)[0] if out else str(RESULTS / "graphcot")) + ".png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
