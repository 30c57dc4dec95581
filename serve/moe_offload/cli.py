"""`jaxsys tune moe_offload`: pick gamma, batch, expert-cache size and attention placement for a
hardware description, by the roofline cost model of `jaxsys.serve.moe_offload.tuner`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODELS = ("mixtral-8x7b", "moefied-smollm2")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxsys tune moe_offload",
        description="Predict decode throughput of MoE expert offloading with speculative decoding for "
                    "every (gamma, batch, expert cache, attention place, draft) and print the best plan, "
                    "next to offloading without speculation, a Fiddler-like and a MoE-Lightning-like "
                    "plan under the same cost model. Routing and acceptance statistics come from the "
                    "MoEfied SmolLM2 evaluation (python -m jaxsys.serve.moe_offload.moefy) or --stats.",
        epilog="example: jaxsys tune moe_offload --hardware h100-pcie5.yaml --model mixtral-8x7b",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hardware", required=True,
                   help="hardware YAML: a path or a name from configs/hardware (h100-pcie5.yaml, h100-pcie4.yaml)")
    p.add_argument("--model", default="mixtral-8x7b", help=f"model shapes: {', '.join(MODELS)}")
    p.add_argument("--stats", default=None, help="evaluation JSON of moefy (default: the cached one)")
    p.add_argument("--acceptance-mode", choices=["greedy", "sampled"], default="greedy",
                   help="which measured acceptance of the early-exit drafts to use")
    p.add_argument("--context", type=int, default=512, help="cached tokens per request")
    p.add_argument("--batches", default="1,2,4,8,16,32", help="batch sizes to search")
    p.add_argument("--gammas", default="0,1,2,3,4,6,8", help="the compiled gamma set to search")
    p.add_argument("--gamma", type=int, default=None, help="price only this gamma (must be in --gammas)")
    p.add_argument("--expert-cache", type=int, default=None,
                   help="experts per layer on the device (default: as many as fit)")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="vocabulary size of a separate draft model, checked against the target's")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"jaxsys tune moe_offload: {flag} takes comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 0:
        raise SystemExit(f"jaxsys tune moe_offload: {flag} needs non-negative integers, got {text!r}")
    return vals


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from jaxsys.serve.moe_offload import tuner as tu

    err = lambda msg: (print(f"jaxsys tune moe_offload: {msg}", file=sys.stderr), 2)[1]  # noqa: E731
    try:
        hw = tu.load_hardware(args.hardware)
    except tu.TunerError as e:
        return err(str(e))
    if args.model not in MODELS:
        return err(f"unknown --model {args.model!r}; known: {', '.join(MODELS)}")
    stats_path = Path(args.stats) if args.stats else None
    if stats_path is None:
        from jaxsys.serve.moe_offload.moefy import MoEfyConfig, cache_dir

        stats_path = cache_dir() / MoEfyConfig().key() / "evaluation.json"
    if not stats_path.exists():
        return err(f"no routing statistics at {stats_path}: build them with "
                   "`python -m jaxsys.serve.moe_offload.moefy` (a few minutes) or pass --stats")
    ev = json.loads(stats_path.read_text())
    w = tu.workload_from_evaluation(ev, mode=args.acceptance_mode, context=args.context)
    meas = ev["model"]
    if args.model == "mixtral-8x7b":
        m = tu.MIXTRAL_8X7B
        w = w.rescaled(m.num_experts, m.top_k, meas["num_experts"], meas["top_k"])
    else:
        m = tu.ModelShape(**meas["shape"])
    if args.draft_vocab is not None and args.draft_vocab != m.vocab:
        return err(f"the draft's vocabulary ({args.draft_vocab} tokens) differs from the target's ({m.vocab}); "
                   "a draft must use the target's tokenizer")
    if args.expert_cache is not None and args.expert_cache < m.top_k:
        return err(f"--expert-cache {args.expert_cache} is smaller than top-k ({m.top_k}): one token's "
                   "experts would not fit")
    if args.expert_cache is not None and args.expert_cache > m.num_experts:
        return err(f"--expert-cache {args.expert_cache} exceeds the {m.num_experts} experts of a layer")
    gammas = _ints(args.gammas, "--gammas")
    if args.gamma is not None:
        try:
            tu.check_gamma(args.gamma, gammas)
        except tu.TunerError as e:
            return err(str(e))
        gammas = [args.gamma]
    batches = _ints(args.batches, "--batches")
    if 0 in batches:
        return err("--batches must be positive")
    try:
        ours = tu.choose(hw, m, w, tu.candidate_plans(hw, m, w, system="ours", gammas=gammas, batches=batches,
                                                       attentions=("device", "host"), cache_slots=args.expert_cache))
        base = {s: tu.best_of_system(hw, m, w, s, batches) for s in ("offload", "fiddler", "moe-lightning")}
    except tu.TunerError as e:
        return err(str(e))
    result = {"hardware": hw.name, "model": args.model, "chosen": _pred(ours),
              "baselines": {s: _pred(p) for s, p in base.items()},
              "speedup_over": {s: ours.tokens_per_s / p.tokens_per_s for s, p in base.items()}}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    c = ours.plan
    print(f"{hw.name}, {args.model}: gamma={c.gamma} batch={c.batch} expert_cache={c.cache_slots} "
          f"attention={c.attention} draft={c.draft}")
    print(f"  predicted {ours.tokens_per_s:.1f} tokens/s ({ours.tokens_per_step:.2f} tokens per step, "
          f"{ours.step_s * 1e3:.1f} ms per step)")
    for s, p in base.items():
        print(f"  {s:<14} {p.tokens_per_s:9.1f} tokens/s  (batch {p.plan.batch}, cache {p.plan.cache_slots}) "
              f"-> ours x{ours.tokens_per_s / p.tokens_per_s:.2f}")
    return 0


def _pred(p) -> dict:
    import dataclasses

    return {"plan": dataclasses.asdict(p.plan), "tokens_per_s": p.tokens_per_s, "step_s": p.step_s,
            "tokens_per_step": p.tokens_per_step, "parts": p.parts}
