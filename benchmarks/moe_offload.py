"""MoE expert offloading (SpecMoEOff): real CPU decode with the MoEfied SmolLM2, and a simulated Mixtral-8x7B on H100 + PCIe.

(1) Real, on this machine: the MoEfied SmolLM2-135M (`jaxsys.serve.moe_offload.moefy`) decoding
    greedily over the paged KV cache, all experts on the device (one jitted forward computing only
    the routed experts) against experts in host memory behind a per-layer device cache
    (`OffloadedMoE`, real host->device copies), for several batch sizes and cache sizes; tokens/s,
    bytes moved, hit rate, experts per step. Verify steps of gamma + 1 tokens are timed too (their
    cost), and with --speculate-gammas the same forwards decode speculatively for real (n-gram
    prompt lookup, greedy acceptance: tokens/s, acceptance, tokens per step). The roofline tuner,
    given this machine's parameters measured by microbenchmarks (`jaxsys.serve.moe_offload.machine`:
    the served model's layer and head timed at 1-16 rows, priced piecewise-linearly in rows; link,
    host-loop overheads) and the routing statistics measured on held-out text, predicts each
    offload configuration's throughput: the record has the prediction error and whether its
    chosen configuration is within 5% of the best measured.
(2) Simulated (labelled so): Mixtral-8x7B shapes on one H100 PCIe with PCIe 4.0 and 5.0
    (`configs/hardware/`), with the acceptance and reuse statistics measured in (1)'s model: ours
    (speculation + offload + tuned) against offloading without speculation, a Fiddler-like and a
    MoE-Lightning-like system, one cost model for all.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import LOADAVG_AT_IMPORT, ROOT, geomean, target, write_results  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"


def _prompts(tokenizer, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in open(SHARED_DATA / "prompts" / "gsm8k_test.jsonl")][1200:1200 + n]
    return [tokenizer.encode_chat([{"role": "user", "content": r["question"]}]) for r in rows]


@functools.lru_cache(maxsize=None)
def _greedy_accept_jit():
    """`greedy_accept` compiled once per shape (eager, its few ops would each pay a dispatch)."""
    import jax

    from jaxsys.serve.speculative import greedy_accept

    return jax.jit(greedy_accept)


class Decoder:
    """Greedy decode of B requests over the paged KV cache, by any forward with decoder.forward's
    contract; prefill once, then timed single-token (or gamma + 1 token verify-shaped) steps."""

    def __init__(self, forward, cfg, prompts, page_size=16, max_new=64, extra=8):
        import numpy as np

        from jaxsys.models.kv_cache import init_cache

        self.forward, self.cfg = forward, cfg
        self.B = len(prompts)
        ctx = max(map(len, prompts)) + max_new + extra
        self.pages = -(-ctx // page_size)
        self.cache = init_cache(cfg, 1 + self.B * self.pages, page_size)
        self.table = (1 + np.arange(self.B * self.pages, dtype=np.int32)).reshape(self.B, self.pages)
        self.prompts = prompts
        self.lens = np.zeros(self.B, np.int32)

    def _meta(self):
        import jax.numpy as jnp

        from jaxsys.models.kv_cache import AttentionMetadata

        return AttentionMetadata(jnp.asarray(self.table), jnp.asarray(self.lens))

    def prefill(self):
        import numpy as np

        T = max(map(len, self.prompts))
        toks = np.zeros((self.B, T), np.int32)
        pos = np.full((self.B, T), -1, np.int32)
        for b, p in enumerate(self.prompts):
            toks[b, :len(p)] = p
            pos[b, :len(p)] = np.arange(len(p))
        self.lens = np.array([len(p) for p in self.prompts], np.int32)
        logits, self.cache = self.forward(toks, pos, self.cache, self._meta())
        last = np.asarray(logits)[np.arange(self.B), self.lens - 1]
        self.next = last.argmax(-1).astype(np.int32)
        self.contexts = [list(p) for p in self.prompts]  # prompt + emitted tokens (speculative_step)

    def step(self, tokens_per_request: int = 1):
        """One step of T tokens per request: T = 1 is decode; T = gamma + 1 has a verify step's shape:
        the next token followed by T - 1 tokens of the request's own text (its last ones), which
        route like real drafts (copies of one token would need fewer experts). The cost, not the
        acceptance, is what is timed; all T are kept as the request's text."""
        import numpy as np

        T = tokens_per_request
        toks = np.zeros((self.B, T), np.int32)
        for b in range(self.B):
            toks[b] = [int(self.next[b]), *self.contexts[b][len(self.contexts[b]) - (T - 1):]][:T]
        pos = (self.lens[:, None] + np.arange(T)[None, :]).astype(np.int32)
        self.lens = self.lens + T
        logits, self.cache = self.forward(toks, pos, self.cache, self._meta())
        for b in range(self.B):
            self.contexts[b] += [int(t) for t in toks[b]]
        self.next = np.asarray(logits)[:, -1].argmax(-1).astype(np.int32)

    def speculative_step(self, gamma: int) -> tuple[int, int, int]:
        """One real greedy speculative step after `prefill` (not mixed with `step`): n-gram prompt
        lookup proposes up to gamma tokens per request, the forward verifies them with the request's
        next token in one [B, gamma + 1] call (the engine's verify shape), the argmax prefix is
        accepted (`greedy_accept`) and rejected K/V are left past each length to be overwritten.
        Returns (proposed, accepted, emitted) over the batch."""
        import numpy as np

        from jaxsys.serve.speculative import ngram_propose_host

        T = gamma + 1
        toks = np.zeros((self.B, T), np.int32)
        pos = np.full((self.B, T), -1, np.int32)
        draft_len = np.zeros(self.B, np.int32)
        for b in range(self.B):
            ctx = self.contexts[b] + [int(self.next[b])]
            prop = ngram_propose_host(ctx, gamma)
            d = len(prop)
            toks[b, 0], toks[b, 1:1 + d], draft_len[b] = self.next[b], prop, d
            pos[b, :1 + d] = self.lens[b] + np.arange(1 + d)
        kv_after = self.lens + 1 + draft_len
        logits, self.cache = self.forward(toks, pos, self.cache, self._meta_lens(kv_after))
        accepted, nxt = (np.asarray(x) for x in _greedy_accept_jit()(toks[:, 1:], draft_len, logits))
        for b in range(self.B):
            a = int(accepted[b])
            self.contexts[b] += [int(self.next[b]), *map(int, toks[b, 1:1 + a])]
        self.lens = self.lens + 1 + accepted.astype(np.int32)
        self.next = nxt.astype(np.int32)
        return int(draft_len.sum()), int(accepted.sum()), int(accepted.sum()) + self.B

    def _meta_lens(self, kv_lens):
        import jax.numpy as jnp

        from jaxsys.models.kv_cache import AttentionMetadata

        return AttentionMetadata(jnp.asarray(self.table), jnp.asarray(kv_lens, jnp.int32))


def run_real(args, log) -> tuple[list[dict], dict, dict]:
    import jax
    import numpy as np

    from jaxsys.models import decoder
    from jaxsys.serve.moe_offload import moefy, tuner as tu
    from jaxsys.serve.moe_offload.machine import measure_machine
    from jaxsys.serve.moe_offload.experts import sparse_moe_ffn
    from jaxsys.serve.moe_offload.runner import OffloadConfig, OffloadedMoE

    mc = moefy.MoEfyConfig()
    params, cfg, record, dense = moefy.load_or_build(SHARED_DATA, mc, log=log)
    ev_path = moefy.cache_dir() / mc.key() / "evaluation.json"
    if not ev_path.exists():
        ev = moefy.evaluate(params, cfg, dense, SHARED_DATA, log=log)
        ev["ngram"] = moefy.ngram_acceptance(params, cfg, dense, SHARED_DATA)
        ev["training"] = record
        ev["model"] = moefy.model_record(cfg)
        ev_path.write_text(json.dumps(ev, indent=1))
    ev = json.loads(ev_path.read_text())
    if "by_gamma" not in ev["ngram"]:  # an evaluation from before tokens per step were measured per gamma
        ev["ngram"] = moefy.ngram_acceptance(params, cfg, dense, SHARED_DATA)
        ev_path.write_text(json.dumps(ev, indent=1))
    # the attention piece is timed over about the context the timed steps attend (prompts + steps)
    context = int(np.mean([len(p) for p in _prompts(dense.tokenizer, max(args.batches))])) + 32
    machine = measure_machine(cfg, context=context, log=log)
    hw = tu.HardwareSpec.model_validate(machine["spec"])
    # prefetching guesses pays off only where copies run beside compute; where they do not, every
    # wrong guess is a copy on the critical path (offload alone and speculation share the setting)
    prefetch = machine["measured"]["overlap"]
    log(f"expert prefetch {'on' if prefetch else 'off'} (copies {'' if prefetch else 'do not '}overlap compute)")
    shape = tu.ModelShape.from_config(cfg)
    jit_fwd = jax.jit(decoder.forward, static_argnames=("cfg", "moe"), donate_argnames=("cache",))

    def on_device(toks, pos, cache, meta):
        import jax.numpy as jnp

        return jit_fwd(params, jnp.asarray(toks), cfg=cfg, positions_BxT=jnp.asarray(pos), cache=cache, meta=meta,
                       moe=sparse_moe_ffn)

    records = []
    for B in args.batches:
        prompts = _prompts(dense.tokenizer, B)
        variants = [("no_offload", None)] + [(f"offload_c{c}", c) for c in args.caches]
        for name, slots in variants:
            if slots is None:
                fwd, model = on_device, None
            else:
                model = OffloadedMoE(cfg, params, OffloadConfig(expert_cache=slots, policy="lru", prefetch=prefetch))
                fwd = lambda t, p, c, m, model=model: model.forward(t, p, cache=c, meta=m)  # noqa: E731
            for T in [1] + [g + 1 for g in args.verify_gammas]:
                runs = []
                stats = None
                for rep in range(args.repeats):
                    dec = Decoder(fwd, cfg, prompts, max_new=(args.steps + 1) * T)
                    dec.prefill()
                    dec.step(T)  # warm-up: compiles this shape
                    if model is not None:
                        model.reset_stats()
                        compiles = model.compile_count
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        dec.step(T)
                    runs.append(time.perf_counter() - t0)
                    if model is not None:
                        stats = model.snapshot_stats()
                        stats["compiles_in_timed_steps"] = model.compile_count - compiles
                step_s = statistics.median(runs) / args.steps
                rec = {"variant": name, "batch": B, "tokens_per_request_per_step": T, "expert_cache": slots,
                       "step_s_repeats": [r / args.steps for r in runs], "step_s": step_s,
                       "tokens_per_s": B / step_s if T == 1 else None}
                if stats is not None:
                    rec["offload_stats"] = stats
                    rec["bytes_moved_per_step"] = stats["bytes_moved"] / max(stats["steps"], 1)
                if slots is not None:
                    w = tu.workload_from_evaluation(ev, context=int(np.mean([len(p) for p in prompts])) + 32)
                    pred = tu.predict(hw, shape, w, tu.Plan(T - 1, B, slots, "device", "ngram" if T > 1 else "none"),
                                      overlap=machine["measured"]["overlap"])
                    rec["predicted_step_s"] = pred.step_s
                    rec["prediction_error"] = pred.step_s / step_s - 1
                records.append(rec)
                log(f"  B={B} {name:<12} T={T}: {step_s * 1e3:7.1f} ms/step"
                    + (f", predicted {rec['predicted_step_s'] * 1e3:.1f} ms" if "predicted_step_s" in rec else ""))
            for gamma in args.speculate_gammas:
                rec = run_speculative(fwd, model, cfg, prompts, gamma, args)
                rec.update(variant=f"{name}+ngram", batch=B, expert_cache=slots)
                records.append(rec)
                log(f"  B={B} {name:<12} speculative gamma={gamma}: {rec['tokens_per_s']:7.1f} tok/s, acceptance "
                    f"{rec['acceptance']:.2f}, {rec['tokens_per_step']:.2f} tokens/step")
    return records, ev, machine


def run_speculative(fwd, model, cfg, prompts, gamma: int, args) -> dict:
    """Real greedy speculative decoding (n-gram prompt lookup, verify steps of gamma + 1 tokens):
    tokens/s over `args.steps` steps after one warm-up step, median of `args.repeats`."""
    runs, stats = [], None
    for _ in range(args.repeats):
        dec = Decoder(fwd, cfg, prompts, max_new=(args.steps + 1) * (gamma + 1))
        dec.prefill()
        dec.speculative_step(gamma)  # warm-up: compiles this shape
        if model is not None:
            model.reset_stats()
            compiles = model.compile_count
        proposed = accepted = emitted = 0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            p, a, e = dec.speculative_step(gamma)
            proposed, accepted, emitted = proposed + p, accepted + a, emitted + e
        runs.append((time.perf_counter() - t0, proposed, accepted, emitted))
        if model is not None:
            stats = model.snapshot_stats()
            stats["compiles_in_timed_steps"] = model.compile_count - compiles
    t, proposed, accepted, emitted = sorted(runs)[len(runs) // 2]
    rec = {"gamma": gamma, "tokens_per_request_per_step": gamma + 1,
           "step_s_repeats": [r[0] / args.steps for r in runs], "step_s": t / args.steps,
           "tokens_per_s": emitted / t, "acceptance": accepted / max(proposed, 1),
           "tokens_per_step": emitted / (len(prompts) * args.steps)}
    if stats is not None:
        rec["offload_stats"] = stats
    return rec


def run_simulated(ev: dict, log) -> list[dict]:
    from jaxsys.serve.moe_offload import tuner as tu

    out = []
    m = tu.MIXTRAL_8X7B
    for hw_name in ("h100-pcie4.yaml", "h100-pcie5.yaml"):
        hw = tu.load_hardware(hw_name)
        for context in (512, 2048):
            w = tu.workload_from_evaluation(ev, context=context).rescaled(
                m.num_experts, m.top_k, ev["model"]["num_experts"], ev["model"]["top_k"])
            batches = (1, 2, 4, 8, 16, 32, 64)
            systems = {s: tu.best_of_system(hw, m, w, s, batches) for s in ("ours", "offload", "fiddler", "moe-lightning")}
            rec = {"simulated": True, "hardware": hw.model_dump(), "model": "mixtral-8x7b", "context": context,
                   "acceptance": w.acceptance, "systems": {s: {"plan": dataclasses.asdict(p.plan),
                                                                "tokens_per_s": p.tokens_per_s, "parts": p.parts}
                                                            for s, p in systems.items()}}
            rec["speedup"] = {s: systems["ours"].tokens_per_s / systems[s].tokens_per_s
                              for s in ("offload", "fiddler", "moe-lightning")}
            out.append(rec)
            log(f"  simulated {hw.name} ctx {context}: ours {systems['ours'].tokens_per_s:.1f} tok/s "
                f"({systems['ours'].plan}); x{rec['speedup']['offload']:.2f} offload, "
                f"x{rec['speedup']['fiddler']:.2f} fiddler, x{rec['speedup']['moe-lightning']:.2f} moe-lightning")
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="jaxsys bench moe_offload", description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    p.add_argument("--caches", type=lambda s: [int(x) for x in s.split(",")], default=[4, 6, 8])
    p.add_argument("--verify-gammas", type=lambda s: [int(x) for x in s.split(",") if x], default=[3])
    p.add_argument("--speculate-gammas", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                   help="also decode speculatively for real (n-gram drafts, greedy) with these gammas")
    p.add_argument("--steps", type=int, default=16, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="output JSON (default benchmarks/results/moe_offload.json)")
    args = p.parse_args()
    from jaxsys.runtime import enable_compilation_cache

    enable_compilation_cache()
    log = lambda s: print(s, flush=True)  # noqa: E731
    real, ev, machine = run_real(args, log)
    sim = run_simulated(ev, log)
    offload = [r for r in real if r["expert_cache"] is not None and r["tokens_per_request_per_step"] == 1]
    errors = [abs(r["prediction_error"]) for r in real if "prediction_error" in r]
    best_measured = min(offload, key=lambda r: r["step_s"] / r["batch"])
    chosen = min(offload, key=lambda r: r["predicted_step_s"] / r["batch"])
    within = (chosen["step_s"] / chosen["batch"]) / (best_measured["step_s"] / best_measured["batch"]) - 1
    targets = [
        target("simulated speedup over offloading without speculation (geomean, Mixtral-8x7B, H100 PCIe4/5)",
               geomean(r["speedup"]["offload"] for r in sim), 2.5),
        target("simulated speedup over Fiddler-like (geomean)", geomean(r["speedup"]["fiddler"] for r in sim), 1.0),
        target("simulated speedup over MoE-Lightning-like (geomean)",
               geomean(r["speedup"]["moe-lightning"] for r in sim), 1.0),
        target("tuner: mean |prediction error| of offload step time on this machine", statistics.mean(errors), 0.25,
               higher_is_better=False),
        target("tuner: chosen offload configuration's time per token over the best measured - 1", within, 0.05,
               higher_is_better=False),
    ]
    pending = []
    if args.speculate_gammas:
        plain = {(r["batch"], r["expert_cache"]): r["tokens_per_s"] for r in offload}
        best: dict[tuple, float] = {}
        for r in real:
            if r.get("gamma") is not None and r["expert_cache"] is not None:
                key = (r["batch"], r["expert_cache"])
                best[key] = max(best.get(key, 0.0), r["tokens_per_s"])
        targets.append(target("real CPU speculation+offload over offload alone (geomean over batch x cache, "
                              "best gamma)", geomean(best[k] / plain[k] for k in best), 1.5))
    else:
        pending.append("real CPU speculation+offload >= 1.5x offload alone: run with --speculate-gammas")
    write_results("moe_offload", real + sim, args.out, targets=targets, loadavg_start=LOADAVG_AT_IMPORT,
                  machine=machine, moefied=ev, pending=pending,
                  config={"batches": args.batches, "caches": args.caches, "verify_gammas": args.verify_gammas,
                          "speculate_gammas": args.speculate_gammas,
                          "expert_prefetch": machine["measured"]["overlap"],
                          "steps": args.steps, "repeats": args.repeats})


if __name__ == "__main__":
    main()
