"""Fine-tune SmolLM2-135M-Instruct for GLM and for Graph-CoT on oracle traces (same token budget), then evaluate both.

Part D of the GLM issue, the one place that joins `jaxsys.serve.graphcot` (the traces, the
evaluation) and `jaxsys.train` (the fine-tune, `jaxsys.train.sft`), which never import each other:

1. Questions as `jaxsys bench graphcot` makes them (GRBench goodreads templates over goodbooks-10k,
   same seed, same train/dev/test split). The oracle plays each protocol on `--train-questions`
   train questions (templates in turn); every LLM call becomes one example, its prompt tokenized
   exactly as the engine serves it (`jaxsys.serve.graphcot.sft`).
2. Each system's examples are fine-tuned into its own copy of the model by `jaxsys.train.sft.finetune`
   (the trainer's GSPMD step, AdamW, full fine-tune starting from the pretrained weights), the loss on
   the completion tokens only (the prompt is masked). The budget is the same for both systems:
   the same number of steps of the same number of tokens (`--tokens-per-step`); a row holds one
   example, and each system's row length is the power of two that holds 95% of its examples (the
   longest are left out; Graph-CoT's prompts are longer, so it gets fewer, longer rows per step).
3. Each fine-tuned model is saved as an HF folder (`jaxsys.models.hf_export.save_hf_folder`)
   under the user's cache directory (`$JAXSYS_CACHE_DIR` or `~/.cache/jaxsys`, `graphcot-sft/<key>/`,
   the key a hash of every setting above), reused by later runs; `jaxsys.load_model`, `jaxsys graphcot
   --model`, `jaxsys serve --model` and `jaxsys bench graphcot --finetuned-glm/--finetuned-graphcot`
   load it.
4. Both fine-tuned models, and the untuned model, answer the same held-out questions with their
   own system on our engine (priority eviction, `--concurrency` questions in flight): accuracy
   (exact match after normalisation, overall and per difficulty), Rouge-L, calls and tokens per
   question. The record evaluates on the test split, as the issue asks; `--eval-split dev` is for
   trying out a training recipe without looking at the test questions.

Targets: fine-tuned GLM accuracy above fine-tuned Graph-CoT's (the issue's), and fine-tuned GLM
above the untuned model with GLM.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import write_results  # noqa: E402

SYSTEMS = ("glm", "graphcot")
# what the cache key covers: every setting that changes the fine-tuned weights
TRAINING_KEYS = ("model", "graph", "per_template", "seed", "train_questions", "tokens_per_step", "steps", "lr",
                 "warmup_steps", "max_seq_len", "train_seed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxsys bench graphcot_finetune", description=__doc__.split("\n")[0],
                                epilog="example (about 25 minutes on 2 CPU cores): jaxsys bench graphcot_finetune "
                                       "--steps 16 --eval-questions 26",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--graph", default="goodbooks")
    p.add_argument("--per-template", type=int, default=40, help="generated questions per template (as bench graphcot)")
    p.add_argument("--seed", type=int, default=0, help="question generation seed (as bench graphcot)")
    p.add_argument("--train-questions", type=int, default=104, help="train questions the oracle plays (templates in turn)")
    p.add_argument("--tokens-per-step", type=int, default=2048, help="batch x row length, the same for both systems")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps, the same for both systems")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (cosine to 0.1x after warm-up)")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=2048, help="longest row; longer examples are left out")
    p.add_argument("--train-seed", type=int, default=0, help="order of the examples")
    p.add_argument("--eval-split", choices=["train", "dev", "test"], default="test",
                   help="questions to evaluate on (the record: test; dev to try a recipe)")
    p.add_argument("--eval-questions", type=int, default=26, help="questions per system (templates in turn)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=4096, help="KV pages of the evaluation engines")
    p.add_argument("--skip-untuned", action="store_true", help="do not evaluate the untuned model")
    p.add_argument("--skip-eval", action="store_true", help="only fine-tune (and cache)")
    p.add_argument("--force", action="store_true", help="fine-tune again even when the cache holds the result")
    p.add_argument("--cache-dir", default=None, help="default: $JAXSYS_CACHE_DIR or ~/.cache/jaxsys, + graphcot-sft")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/graphcot_finetune.json)")
    return p


def cache_root(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser()
    base = os.environ.get("JAXSYS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxsys")
    return Path(base) / "graphcot-sft"


def run_key(args: argparse.Namespace) -> str:
    settings = {k: getattr(args, k) for k in TRAINING_KEYS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def prepare_examples(model, graph, train_qs):
    from jaxsys.serve.graphcot.sandbox import Sandbox
    from jaxsys.serve.graphcot.sft import sft_examples

    with Sandbox(graph) as sb:
        return sft_examples(graph, train_qs, model.tokenizer, systems=SYSTEMS, sandbox=sb)


def finetuned_models(model, graph, train_qs, args) -> dict[str, tuple[Path, dict[str, Any]]]:
    """{system: (HF folder, training record)}, from the cache or fine-tuned now."""
    from jaxsys.models.hf_export import save_hf_folder
    from jaxsys.serve.graphcot.sft import describe, pack_rows, seq_len_for, write_rows
    from jaxsys.train.sft import finetune

    root = cache_root(args.cache_dir) / run_key(args)
    out = {}
    examples = wrong = None
    for system in SYSTEMS:
        cached = root / system / "sft.json"
        if cached.is_file() and not args.force:
            print(f"{system}: fine-tuned model from the cache: {cached.parent}", flush=True)
            out[system] = (cached.parent, json.loads(cached.read_text()))
            continue
        if examples is None:
            examples, wrong = prepare_examples(model, graph, train_qs)
        exs = examples[system]
        seq_len = seq_len_for(exs, cap=args.max_seq_len)
        if args.tokens_per_step % seq_len:
            raise SystemExit(f"--tokens-per-step {args.tokens_per_step} is not a multiple of {system}'s row length "
                             f"{seq_len}")
        batch = args.tokens_per_step // seq_len
        rows, dropped = pack_rows(exs, seq_len)
        if not len(rows):
            raise SystemExit(f"{system}: no example fits a row of {seq_len} tokens (--max-seq-len)")
        stats = dict(describe(exs), rows=len(rows), longer_than_row=dropped, oracle_wrong=wrong[system])
        print(f"{system}: {stats['examples']} examples from {stats['questions']} questions "
              f"({stats['agents']}), mean prompt {stats['mean_prompt_tokens']:.0f} / completion "
              f"{stats['mean_completion_tokens']:.0f} tokens; rows of {seq_len} x {batch} per step "
              f"({dropped} longer examples left out)", flush=True)
        work = root / f".{system}.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        rows_path = write_rows(work / "rows.npy", rows)
        params, record = finetune(model.params, model.config, rows_path, seq_len=seq_len, batch=batch,
                                  steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, seed=args.train_seed)
        record.update(system=system, data=stats, settings={k: getattr(args, k) for k in TRAINING_KEYS})
        print(f"{system}: loss {record['losses'][0]:.3f} -> {record['losses'][-1]:.3f} in {record['wall_s']:.0f}s "
              f"({record['tokens']} tokens, {record['loss_tokens']} with loss)", flush=True)
        folder = save_hf_folder(work / "model", params, model.config, model.tokenizer)
        (folder / "sft.json").write_text(json.dumps(record, indent=1))
        shutil.rmtree(root / system, ignore_errors=True)
        folder.rename(root / system)
        shutil.rmtree(work)
        out[system] = (root / system, record)
        del params
        gc.collect()
    return out


# ------------------------------------------------------------------------------ evaluation

def evaluate(model, systems, graph, questions, args) -> dict[str, dict[str, Any]]:
    """Each system on `questions` with `model` on one engine: {system: {"summary", "questions"}}."""
    from jaxsys.serve import EngineConfig, ServingLLM
    from jaxsys.serve.graphcot.backends import EngineBackend
    from jaxsys.serve.graphcot.cache_policy import VertexPriorityPolicy
    from jaxsys.serve.graphcot.runner import GraphQA, RunConfig, summarize

    cfg = EngineConfig(num_pages=args.num_pages, max_decode_batch=max(16, args.concurrency), max_prefill_batch=8,
                       prefill_chunk=512)
    policy = VertexPriorityPolicy(cfg.page_size)
    backend = EngineBackend(ServingLLM(model, config=cfg, eviction_policy=policy), policy=policy)
    out = {}
    try:
        for system in systems:
            t0 = time.perf_counter()
            with GraphQA(graph, backend, RunConfig(system=system, concurrency=args.concurrency), policy=policy) as qa:
                records = qa.run(questions, progress=True)
            s = summarize(records)
            s["wall_s"] = time.perf_counter() - t0
            out[system] = {"summary": s, "questions": [dataclasses.asdict(r) for r in records]}
    finally:
        backend.close()
    return out


def _beats(name: str, value: float, goal: float = 0.0) -> dict[str, Any]:
    return {"name": name, "value": float(value), "target": goal, "direction": ">", "met": bool(value > goal)}


def compute_targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["variant"]: r["summary"] for r in records}
    out = []
    if "glm-finetuned" in by and "graphcot-finetuned" in by:
        out.append(_beats("finetuned_accuracy_glm_minus_graphcot",
                          by["glm-finetuned"]["accuracy"] - by["graphcot-finetuned"]["accuracy"]))
    if "glm-finetuned" in by and "glm-untuned" in by:
        out.append(_beats("finetuned_glm_accuracy_minus_untuned",
                          by["glm-finetuned"]["accuracy"] - by["glm-untuned"]["accuracy"]))
    return out


def main() -> None:
    args = build_parser().parse_args()
    if args.steps <= 0 or args.tokens_per_step <= 0 or args.train_questions <= 0 or args.eval_questions <= 0:
        raise SystemExit("--steps, --tokens-per-step, --train-questions and --eval-questions must be positive")
    from jaxsys.runtime import enable_compilation_cache

    enable_compilation_cache()
    import jaxsys
    from jaxsys.serve.graphcot.api import load_graph
    from jaxsys.serve.graphcot.questions import generate_questions, split, spread

    t_start = time.perf_counter()
    model = jaxsys.load_model(args.model)
    graph = load_graph(args.graph).warm()
    qs = generate_questions(graph, per_template=args.per_template, seed=args.seed)
    train_qs = spread(split(qs, "train"), args.train_questions)
    eval_qs = spread(split(qs, args.eval_split), args.eval_questions)
    tuned = finetuned_models(model, graph, train_qs, args)
    for system, (folder, _) in tuned.items():
        print(f"  {system}: {folder}  (jaxsys bench graphcot --finetuned-{system} {folder})")
    if args.skip_eval:
        return
    records: list[dict[str, Any]] = []

    def add(variant: str, system: str, model_name: str, result: dict[str, Any], training=None) -> None:
        s = result["summary"]
        print(f"  {variant:20s} accuracy {s['accuracy']:.3f} (easy {s.get('accuracy_easy')}, medium "
              f"{s.get('accuracy_medium')}, hard {s.get('accuracy_hard')}) Rouge-L {s['rouge_l']:.3f} | calls "
              f"{s['llm_calls']:.1f} tokens {s['tokens']:.0f} | parse failures {s['parse_failures']:.1f} | "
              f"{s['wall_s']:.0f}s", flush=True)
        records.append({"variant": variant, "system": system, "model": model_name, "summary": s,
                        "training": training, "questions": result["questions"]})

    header = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "cache_key": run_key(args),
              "eval_questions": [q["qid"] for q in eval_qs], "train_questions": [q["qid"] for q in train_qs]}

    def write(complete: bool) -> None:  # after each phase, so a long run keeps what it measured
        write_results("graphcot_finetune", records, args.out, targets=compute_targets(records), **header,
                      complete=complete, wall_s=time.perf_counter() - t_start)

    for system, (folder, training) in tuned.items():
        tuned_model = jaxsys.load_model(folder)
        [result] = evaluate(tuned_model, (system,), graph, eval_qs, args).values()
        add(f"{system}-finetuned", system, str(folder), result, training)
        del tuned_model
        gc.collect()
    if not args.skip_untuned:
        write(False)
        for system, result in evaluate(model, SYSTEMS, graph, eval_qs, args).items():
            add(f"{system}-untuned", system, args.model, result)
    write(True)


if __name__ == "__main__":
    main()
