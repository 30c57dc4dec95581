"""`jaxsys graphcot`: answer graph questions with GLM or Graph-CoT; make questions; oracle traces."""

from __future__ import annotations

import argparse
import sys

SUBCOMMANDS = ("questions", "traces", "show")

EPILOG = """examples:
  jaxsys graphcot questions --graph goodbooks --out questions.jsonl --per-template 40
  jaxsys graphcot --system glm --graph goodbooks --questions questions.jsonl --split test --out glm.jsonl
  jaxsys graphcot --system graphcot --graph goodbooks --questions questions.jsonl --backend http://127.0.0.1:8000
  jaxsys graphcot traces --graph goodbooks --questions questions.jsonl --split train --out traces.jsonl
  jaxsys graphcot show --graph goodbooks book-2767052 --feature title

--graph takes a name (goodbooks: ../shared/data/glm/goodbooks-10k/books.csv, or $JAXSYS_DATA), a
GRBench graph.json (or its folder), or a goodbooks-format books.csv. Question files are GRBench
JSON lines {"qid", "question", "answer"}; GRBench's own data.json files load as they are.
Each answered question becomes one JSON line: qid, answer, correct, llm_calls, prompt_tokens,
cached_tokens, generated_tokens, seconds (and gold, rouge_l, parse_failures, ...)."""


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxsys graphcot", description="Answer questions about a graph with GLM "
                                "(multi-agent Graph-CoT) or the single-agent Graph-CoT baseline.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=["glm", "graphcot"], default="glm")
    p.add_argument("--graph", required=True, help="name, graph.json or books.csv")
    p.add_argument("--questions", required=True, help="GRBench JSON-lines question file")
    p.add_argument("--split", choices=["train", "dev", "test"], default=None,
                   help="only questions of this split (generated files carry one)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--backend", default=None, metavar="URL",
                   help="an OpenAI-compatible server (e.g. jaxsys serve); default: our engine in this process")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model of the in-process engine")
    p.add_argument("--concurrency", type=int, default=16, help="questions in flight at once")
    p.add_argument("--out", default=None, help="write one JSON line per question here (default: stdout)")
    p.add_argument("--no-sharing", action="store_true", help="GLM: the natural prompt layout, not vertex-centric")
    p.add_argument("--lru", action="store_true", help="LRU eviction instead of the priority policy")
    p.add_argument("--no-pipelining", action="store_true", help="never overlap tool work with LLM work")
    p.add_argument("--num-pages", type=int, default=4096, help="KV-cache pages of the in-process engine")
    p.add_argument("--no-progress", action="store_true")
    return p


def _questions_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxsys graphcot questions",
                                description="Generate questions from GRBench's goodreads templates (easy / medium / "
                                            "hard, exact answers, train/dev/test), deterministic by seed.")
    p.add_argument("--graph", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--per-template", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    return p


def _traces_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxsys graphcot traces",
                                description="Oracle traces of both protocols (one JSON line per LLM call: chat "
                                            "messages and the perfect completion), for fine-tuning.")
    p.add_argument("--graph", required=True)
    p.add_argument("--questions", required=True)
    p.add_argument("--split", choices=["train", "dev", "test"], default="train")
    p.add_argument("--out", required=True)
    return p


def _show_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxsys graphcot show", description="Print a node's facts or one feature.")
    p.add_argument("--graph", required=True)
    p.add_argument("node")
    p.add_argument("--feature", default=None)
    return p


def _fail(message: str) -> int:
    print(f"jaxsys graphcot: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    from jaxsys.serve.graphcot.graph import GraphError
    from jaxsys.serve.graphcot.questions import QuestionFileError

    try:
        if argv and argv[0] in SUBCOMMANDS:
            return {"questions": _make_questions, "traces": _traces, "show": _show}[argv[0]](argv[1:])
        return _answer(argv)
    except (GraphError, QuestionFileError, FileNotFoundError) as e:
        return _fail(str(e))


def _make_questions(argv: list[str]) -> int:
    from jaxsys.serve.graphcot.api import load_graph
    from jaxsys.serve.graphcot.questions import generate_questions, write_questions

    args = _questions_parser().parse_args(argv)
    qs = generate_questions(load_graph(args.graph), per_template=args.per_template, seed=args.seed)
    write_questions(args.out, qs)
    counts = {s: sum(q["split"] == s for q in qs) for s in ("train", "dev", "test")}
    print(f"wrote {len(qs)} questions to {args.out} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return 0


def _traces(argv: list[str]) -> int:
    from jaxsys.serve.graphcot.api import load_graph
    from jaxsys.serve.graphcot.oracle import write_traces
    from jaxsys.serve.graphcot.questions import load_questions, split
    from jaxsys.serve.graphcot.sandbox import Sandbox

    args = _traces_parser().parse_args(argv)
    graph = load_graph(args.graph)
    qs = split(load_questions(args.questions), args.split)
    if not qs:
        return _fail(f"{args.questions} has no {args.split} questions")
    with Sandbox(graph) as sb:
        correct = write_traces(args.out, graph, qs, sandbox=sb)
    print(f"wrote oracle traces of {len(qs)} questions to {args.out}; oracle correct: "
          + ", ".join(f"{k} {v}/{len(qs)}" for k, v in correct.items()))
    return 0


def _show(argv: list[str]) -> int:
    from jaxsys.serve.graphcot.api import load_graph
    from jaxsys.serve.graphcot.graph import render_value, render_vertex

    args = _show_parser().parse_args(argv)
    graph = load_graph(args.graph)
    if args.feature is None:
        print(render_vertex(graph, args.node, max_neighbors=50))
    else:
        print(render_value(graph.node_feature(args.node, args.feature), limit=10_000))
    return 0


def _answer(argv: list[str]) -> int:
    args = _run_parser().parse_args(argv)
    if args.concurrency <= 0:
        return _fail("--concurrency must be positive")
    from jaxsys.runtime import enable_compilation_cache

    from jaxsys.serve.graphcot.api import answer_questions, load_graph
    from jaxsys.serve.graphcot.backends import BackendError
    from jaxsys.serve.graphcot.questions import load_questions, split
    from jaxsys.serve.graphcot.runner import summarize

    graph = load_graph(args.graph)
    questions = load_questions(args.questions)
    if args.split is not None:
        questions = split(questions, args.split)
        if not questions:
            return _fail(f"{args.questions} has no {args.split} questions (generated files carry a split)")
    questions = questions[:args.limit] if args.limit else questions
    engine_config = None
    if args.backend is None:
        enable_compilation_cache()
        from jaxsys.serve import EngineConfig

        try:
            engine_config = EngineConfig(num_pages=args.num_pages, max_decode_batch=max(16, args.concurrency))
        except ValueError as e:
            return _fail(str(e))
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout

    def write(rec) -> None:
        out.write(rec.to_json() + "\n")
        out.flush()

    try:
        records = answer_questions(questions, graph, system=args.system, model=args.model, backend_url=args.backend,
                                   concurrency=args.concurrency, sharing=not args.no_sharing,
                                   priority=not args.lru, pipelining=not args.no_pipelining,
                                   engine_config=engine_config, progress=not args.no_progress, on_record=write)
    except BackendError as e:
        return _fail(str(e))
    except Exception as e:  # model loading errors carry their own clear messages
        from jaxsys.models import ConfigError, ModelNotFoundError, TokenizerError, WeightError

        if isinstance(e, (ModelNotFoundError, WeightError, ConfigError, TokenizerError)):
            return _fail(str(e))
        raise
    finally:
        if out is not sys.stdout:
            out.close()
    s = summarize(records)
    cached = "n/a" if s["cached_tokens"] is None else f"{s['cached_tokens']:.0f}"
    print(f"{args.system}: {s['questions']} questions, accuracy {s['accuracy']:.3f} (Rouge-L {s['rouge_l']:.3f}), "
          f"{s['llm_calls']:.1f} LLM calls, {s['prompt_tokens']:.0f} prompt / {cached} cached / "
          f"{s['generated_tokens']:.0f} generated tokens per question, p50 {s['p50_s']:.1f}s p99 {s['p99_s']:.1f}s",
          file=sys.stderr)
    return 0
