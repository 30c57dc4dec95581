"""Fine-tune SmolLM2-135M-Instruct for GLM and for Graph-CoT on oracle traces (same token budget), then evaluate both.

Part D of the GLM issue, the one place that joins `jaxsys.serve.graphcot` (the traces, the
evaluation) and `jaxsys.train` (the trainer), which never import each other:

1. Questions as `jaxsys bench graphcot` makes them (GRBench goodreads templates over goodbooks-10k,
   same seed, same train/dev/test split). The oracle plays each protocol on `--train-questions`
   train questions (templates in turn); every LLM call becomes one example, its prompt tokenized
   exactly as the engine serves it (`jaxsys.serve.graphcot.sft`).
2. Each system's examples are fine-tuned into its own copy of the model with `jaxsys.train`'s
   trainer (GSPMD step, AdamW, full fine-tune starting from the pretrained weights), the loss on
   the completion tokens only (the prompt is masked). The budget is the same for both systems:
   the same number of steps of the same number of tokens (`--tokens-per-step`); a row holds one
   example, and each system's row length is the power of two that holds 95% of its examples (the
   longest are left out; Graph-CoT's prompts are longer, so it gets fewer, longer rows per step).
3. Each fine-tuned model is saved as an HF folder (config.json, model.safetensors, tokenizer.json)
   under the user's cache directory (`$JAXSYS_CACHE_DIR` or `~/.cache/jaxsys`, `graphcot-sft/<key>/`,
   the key a hash of every setting above), reused by later runs; `jaxsys.load_model`, `jaxsys graphcot
   --model`, `jaxsys serve --model` and `jaxsys bench graphcot --finetuned-glm/--finetuned-graphcot`
   load it.
4. Both fine-tuned models, and the untuned model, answer the same `--eval-split` questions with
   their own system on our engine (priority eviction, `--concurrency` questions in flight):
   accuracy (exact match after normalisation), Rouge-L, calls and tokens per question.

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
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
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
    p.add_argument("--eval-split", choices=["train", "dev", "test"], default="dev")
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


# ------------------------------------------------------------------------------ HF export

def hf_config(cfg) -> dict[str, Any]:
    """The HF `config.json` of a dense Llama-family `ModelConfig` (what `ModelConfig.from_hf` reads)."""
    if cfg.is_moe or cfg.model_type not in HF_ARCHITECTURES:
        raise ValueError(f"HF export covers dense {', '.join(HF_ARCHITECTURES)} models, not {cfg.model_type!r}")
    hf = {"architectures": [HF_ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "max_position_embeddings": cfg.max_position_embeddings, "rope_theta": cfg.rope_theta,
          "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
          "attention_bias": cfg.attention_bias, "hidden_act": "silu", "bos_token_id": cfg.bos_token_id,
          "eos_token_id": list(cfg.eos_token_ids), "torch_dtype": "float32"}
    if cfg.rope_scaling is not None:
        hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    if cfg.sliding_window is not None:
        hf["sliding_window"] = cfg.sliding_window
    return hf


def hf_tensors(params, cfg) -> dict[str, Any]:
    """HF tensor names and layouts of our parameter tree: the inverse of `weights.load_hf_folder`."""
    import numpy as np

    def host(x):
        return np.ascontiguousarray(np.asarray(x, np.float32))

    D = cfg.hidden_size
    lay = params["layers"]
    out = {"model.embed_tokens.weight": host(params["embed"]), "model.norm.weight": host(params["final_norm"])}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = host(np.asarray(params["lm_head"]).T)
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = host(lay["attn_norm"][i])
        out[pre + "post_attention_layernorm.weight"] = host(lay["mlp_norm"][i])
        for n in "qkv":
            out[pre + f"self_attn.{n}_proj.weight"] = host(np.asarray(lay[f"w{n}"][i]).reshape(D, -1).T)
            if cfg.attention_bias:
                out[pre + f"self_attn.{n}_proj.bias"] = host(np.asarray(lay[f"b{n}"][i]).reshape(-1))
        out[pre + "self_attn.o_proj.weight"] = host(np.asarray(lay["wo"][i]).reshape(-1, D).T)
        for name, key in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
            out[pre + f"mlp.{name}.weight"] = host(np.asarray(lay[key][i]).T)
    return out


def save_hf_folder(folder: str | os.PathLike, params, cfg, tokenizer) -> Path:
    """An HF model folder that `jaxsys.load_model` (and transformers) load: config.json,
    model.safetensors (float32), tokenizer.json and tokenizer_config.json (chat template, special
    tokens), written into a new folder."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=False)
    (folder / "config.json").write_text(json.dumps(hf_config(cfg), indent=1))
    save_file(hf_tensors(params, cfg), str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tokenizer.chat_template, "bos_token": tokenizer.bos_token,
         "eos_token": tokenizer.eos_token, "add_bos_token": tokenizer.add_bos}, indent=1))
    return folder


# ------------------------------------------------------------------------------ fine-tuning

def train_config(model_cfg, *, rows_path: Path, seq_len: int, batch: int, steps: int, lr: float,
                 warmup_steps: int, seed: int):
    """The trainer's config: a full fine-tune on one device, AdamW without weight decay."""
    from jaxsys.train.config import (ElasticConfig, LMDataConfig, LMTrainConfig, MeshAxesConfig,
                                     OptimConfig)

    return LMTrainConfig(
        model=model_cfg.replace(dtype="float32"),
        data=LMDataConfig(source="tokens", paths=(str(rows_path),), seq_len=seq_len, global_batch=batch,
                          micro_batches=1, seed=seed),
        optim=OptimConfig(lr=lr, schedule="cosine", warmup_steps=min(warmup_steps, steps - 1), min_lr_ratio=0.1,
                          weight_decay=0.0, clip_norm=1.0),
        mesh=MeshAxesConfig(data=1, fsdp=1, tensor=1), elastic=ElasticConfig(enabled=False),
        steps=steps, seed=seed, devices=1, progress=True)


def finetune(params, model_cfg, rows_path: Path, *, seq_len: int, batch: int, steps: int, lr: float,
             warmup_steps: int, seed: int) -> tuple[Any, dict[str, Any]]:
    """Fine-tune `params` on the rows at `rows_path`: (new host params, training record)."""
    import jax
    import numpy as np

    from jaxsys.train.data import batch_for_step
    from jaxsys.train.trainer import Trainer

    cfg = train_config(model_cfg, rows_path=rows_path, seq_len=seq_len, batch=batch, steps=steps, lr=lr,
                       warmup_steps=warmup_steps, seed=seed)
    trainer = Trainer(cfg)
    trainer.setup()
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
    trainer.program.load_state({"params": host, "mu": jax.tree.map(np.zeros_like, host),
                                "nu": jax.tree.map(np.zeros_like, host), "count": np.zeros((), np.int32)})
    loss_tokens = sum(int(np.count_nonzero(batch_for_step(trainer.source, s, batch)[:, 1:] >= 0))
                      for s in range(steps))
    t0 = time.perf_counter()
    trainer.compile()
    compile_s = time.perf_counter() - t0
    result = trainer.run()
    wall = time.perf_counter() - t0
    new = trainer.params()
    trainer.close()
    return new, {"seq_len": seq_len, "global_batch": batch, "steps": steps, "tokens": steps * batch * seq_len,
                 "loss_tokens": loss_tokens, "lr": lr, "warmup_steps": cfg.optim.warmup_steps,
                 "losses": result.losses, "step_time_s": [r.step_time_s for r in result.records],
                 "compile_s": compile_s, "wall_s": wall}


def prepare_examples(model, graph, train_qs):
    from jaxsys.serve.graphcot.sandbox import Sandbox
    from jaxsys.serve.graphcot.sft import sft_examples

    with Sandbox(graph) as sb:
        return sft_examples(graph, train_qs, model.tokenizer, systems=SYSTEMS, sandbox=sb)


def finetuned_models(model, graph, train_qs, args) -> dict[str, tuple[Path, dict[str, Any]]]:
    """{system: (HF folder, training record)}, from the cache or fine-tuned now."""
    from jaxsys.serve.graphcot.sft import describe, pack_rows, seq_len_for, write_rows

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
            for level in ("easy", "medium", "hard"):
                sub = [r for r in records if r.difficulty == level]
                s[f"accuracy_{level}"] = sum(r.correct for r in sub) / len(sub) if sub else None
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
        print(f"  {variant:20s} accuracy {s['accuracy']:.3f} (easy {s['accuracy_easy']}, medium "
              f"{s['accuracy_medium']}, hard {s['accuracy_hard']}) Rouge-L {s['rouge_l']:.3f} | calls "
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
