"""Shared-prefix decode attention: ours vs naive (duplicated KV) vs split-KV paged decode (vs JAX's own kernels on a GPU), per prefix-tree configuration.

Variants (same process, same inputs, round-robin repeats; `_attention/harness.py`):

  ours     shared-prefix attention: each shared KV chunk read once for all requests below it,
           partials merged by LSE; the balancer falls back to split-KV where sharing does not pay
  splitkv  FlashDecoding-style split-KV paged decode: streams the shared pages once per request
  naive    decode over per-request duplicated contiguous KV ([B, Hkv, L, D] per request)
  jax_decode_attention, jax_paged_attention   (GPU) JAX's own Pallas decode kernels, each with
           parameters swept on the same tuning trees and time budget as ours (`_attention/baselines.py`)

On CPU ours and split-KV are the XLA paths; on a GPU the Pallas (Triton) kernels, at each
precision of --precisions (fp32 dots: tf32x3, the shipped default, and tf32, JAX's kernels'
precision), all in one process. Configurations (Hq=32, Hkv=8, head_dim=128, page_size=16):
`_attention/configs.py`.

Phases (--phases, run in the order given; each later phase uses what an earlier one found):
  tune            sweep our tiles (`_attention/sweeps.py`) from the tables, per precision
  tune-baselines  (GPU) sweep JAX's kernels' parameters from their defaults, same trees and budget
  calibrate       time the calibration trees both ways and fit the balancer's cost model
                  (`pallas_kernels/shared_prefix_attention/calibration.py`)
  configs         every variant on every configuration (--only to pick some)
  plan            the host plan per decode step at engine shapes (64 requests; SmolLM2-135M and a
                  1.2B Llama) next to ours' attention per step on the device
Defaults: CPU configs,tune,calibrate,plan (--quick: configs,plan on smaller trees); GPU
tune,tune-baselines,configs,plan.

The record (`benchmarks/_common.write_results`: commit, device, load average, targets) is
rewritten after every phase and configuration, so a run cut short keeps what it measured. Its
targets and headline geometric means: `_attention/report.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import LOADAVG_AT_IMPORT, RESULTS, write_results  # noqa: E402

PHASES = ("tune", "tune-baselines", "calibrate", "configs", "plan")


def parse_args(argv):
    doc = __doc__.splitlines()
    ap = argparse.ArgumentParser(prog="jaxsys bench attention", description=doc[0], epilog="\n".join(doc[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default=None, help=f"comma-separated, in order, from {', '.join(PHASES)} (default above)")
    ap.add_argument("--quick", action="store_true", help="smoke run: smaller trees, 2 repeats, no tuning or calibration")
    ap.add_argument("--gpu", action="store_true", help="GPU mode (automatic when jax's platform is gpu)")
    ap.add_argument("--interpret", action="store_true",
                    help="check the GPU path on CPU before spending GPU time: the Pallas kernels, the sweeps and JAX's "
                         "kernels in the Pallas interpreter, every tree 1/64 of its tokens, the GPU's tables; the "
                         "timings mean nothing (default --out: a temporary file)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="KV and query dtype")
    ap.add_argument("--precisions", default=None,
                    help="GPU: comma-separated fp32 dot precisions of ours, shipped default first (default for "
                         "float32: tf32x3,tf32; tf32 is the precision of JAX's kernels)")
    ap.add_argument("--only", default=None, help="comma-separated configuration names or label substrings (e.g. C1,chain)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 7; --quick 2)")
    ap.add_argument("--tune-budget", type=float, default=None, metavar="SECONDS",
                    help="seconds each tuner (ours per precision, each of JAX's kernels) may sweep before it "
                         "keeps its best so far (default: no limit)")
    ap.add_argument("--baseline-tune-budget", type=float, default=None, metavar="SECONDS",
                    help="the same for each of JAX's kernels (default: --tune-budget)")
    ap.add_argument("--max-variants", type=int, default=None, metavar="N",
                    help="time at most N variants per sweep besides the best so far (a quick check of the sweeps)")
    ap.add_argument("--tuned-from", default=None, metavar="JSON",
                    help="start from an earlier record's tuning, calibration and baseline tuning (a GPU session "
                         "split over two device calls)")
    ap.add_argument("--tables-from", default=None, metavar="DEVICE_KIND",
                    help="start ours from this device kind's tables (default: this device's; a Hopper GPU without "
                         "tables of its own: the H200's)")
    ap.add_argument("--launches", action="store_true", help="GPU: also time each of ours' launches alone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention[_gpu][_bf16].json; "
                    "--quick adds _quick); the PNG goes next to it")
    args = ap.parse_args(argv)
    phases = args.phases.split(",") if args.phases else None
    if phases and not set(phases) <= set(PHASES):
        ap.error(f"unknown phase(s) {sorted(set(phases) - set(PHASES))}; phases are {', '.join(PHASES)}")
    args.phase_list = phases
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.max_variants is not None and args.max_variants < 0:
        ap.error("--max-variants must be >= 0")
    return args


class Benchmark:
    """One run: the runner, the record being built, and the phases."""

    def __init__(self, args, gpu: bool):
        import jax

        from _attention import harness
        from _attention.configs import CONFIGS, QUICK_CONFIGS
        from jaxsys.pallas_kernels.shared_prefix_attention import PRECISIONS

        self.args, self.gpu = args, gpu
        if gpu:
            precisions = tuple(args.precisions.split(",")) if args.precisions else (
                ("tf32x3", "tf32") if args.dtype == "float32" else ("tf32x3",))
            bad = set(precisions) - set(PRECISIONS)
            if bad:
                raise SystemExit(f"--precisions: unknown {sorted(bad)}; one of {PRECISIONS}")
        else:  # the XLA path computes IEEE fp32 (bf16 products for bf16)
            precisions = ("ieee",)
        self.runner = harness.Runner(gpu=gpu, dtype=args.dtype, precisions=precisions, interpret=args.interpret,
                                     tables_from=args.tables_from)
        self.repeats = args.repeats or (2 if args.quick else 7)
        self.all_configs = QUICK_CONFIGS if args.quick else CONFIGS
        self.configs = self.all_configs
        if args.only:
            wanted = set(args.only.split(","))
            self.configs = tuple(c for c in self.configs if c.name in wanted or any(w in c.label for w in wanted))
        stem = "attention" + ("_gpu" if gpu else "") + ("_bf16" if args.dtype == "bfloat16" else "") + (
            "_quick" if args.quick else "") + ("_interpret" if args.interpret else "")
        self.name = stem
        self.out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) if args.interpret else RESULTS) / f"{stem}.json"
        self.records: list[dict] = []
        dev = jax.devices()[0]
        self.header = {
            "quick": args.quick, "interpret": args.interpret, "repeats": self.repeats, "dtype": args.dtype,
            "precisions": list(precisions), "statistic": "median of round-robin repeats",
            "timing": (f"per call: one sample runs the variant on {self.runner.layers} query batches inside one jit "
                       "(a lax.map, like the layers of a decode step) and is divided by that") if gpu else
                      "per call: one call per sample, block_until_ready",
            "shape": {"Hq": 32, "Hkv": 8, "head_dim": 128, "page_size": 16},
            "paths": {"ours": "Pallas kernels" if gpu else "XLA (shared_prefix_attention_xla)",
                      "splitkv": "Pallas kernel" if gpu else "XLA (paged_attention_xla)"},
            "peak_bandwidth_Bps": harness.peak_bandwidth() if gpu else None,
            "tables_device_kind": self.runner.device_kind, "tables_reason": self.runner.tables_reason,
            "device_kind": dev.device_kind,
            "tune_budget_s": args.tune_budget,
            "baseline_tune_budget_s": args.tune_budget if args.baseline_tune_budget is None else args.baseline_tune_budget,
            "phases": [], "elapsed_s": {},
        }

    # -- the record --------------------------------------------------------------------------------

    def ours_header(self) -> dict:
        return {p: {"block_sizes": o.block_sizes.to_dict(), "cost_model": o.cost_model.to_dict(), "source": o.source}
                for p, o in self.runner.ours.items()}

    def save(self) -> None:
        from _attention import report

        plan = self.header.get("plan")
        self.header.update(ours=self.ours_header(), baseline_params=dict(self.runner.baseline_params),
                           summary=report.summary(self.records, self.all_configs, self.runner.precisions))
        write_results(self.name, self.records, self.out, loadavg_start=LOADAVG_AT_IMPORT,
                      targets=report.targets(self.records, self.all_configs, self.runner.precisions, self.gpu, plan),
                      **self.header)

    def phase(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        self.header["elapsed_s"][name] = round(time.perf_counter() - t0, 1)
        self.header["phases"].append(name)
        self.save()

    # -- the phases --------------------------------------------------------------------------------

    def tune(self) -> None:
        from _attention import sweeps
        from jaxsys.pallas_kernels.shared_prefix_attention import BlockSizes

        tuning = self.header.setdefault("tuning", {})
        for p in self.runner.precisions:
            def progress(partial, p=p):
                tuning[p] = partial
                self.save()

            tuning[p] = sweeps.tune_ours(self.runner, p, max(3, self.repeats // 2), self.args.seed,
                                         self.args.tune_budget, self.args.max_variants, progress)
            self.runner.ours[p] = dataclasses.replace(self.runner.ours[p], block_sizes=BlockSizes.from_dict(
                tuning[p]["best"]), source="tuned in this run (tuning)")

    def tune_baselines(self) -> None:
        from _attention import baselines, sweeps

        if not self.gpu:
            print("tune-baselines: JAX's kernels are GPU kernels: nothing to tune on CPU", flush=True)
            return
        tuning = self.header.setdefault("baseline_tuning", {})
        for name in baselines.BASELINES:
            def progress(partial, name=name):
                tuning[name] = partial
                self.save()

            budget = self.args.tune_budget if self.args.baseline_tune_budget is None else self.args.baseline_tune_budget
            tuning[name] = sweeps.tune_baseline(self.runner, name, max(3, self.repeats // 2), self.args.seed,
                                                budget, self.args.max_variants, progress)
            self.runner.baseline_params[name] = tuning[name]["best"]

    def calibrate(self) -> None:
        from _attention import phases

        calibration = self.header.setdefault("calibration", {})
        for p in self.runner.precisions:
            calibration[p], fitted = phases.calibrate(self.runner, p, 2 * self.repeats, self.args.seed, self.args.quick)
            print(f"calibrate ({p}): {json.dumps(calibration[p]['derived_cost_model'])}", flush=True)
            if self.args.interpret:  # interpreter timings calibrate nothing: keep the tables' model
                print("--interpret: the configurations keep the tables' cost model", flush=True)
            else:
                self.runner.ours[p] = dataclasses.replace(self.runner.ours[p], cost_model=fitted,
                                                          source=self.runner.ours[p].source + "; cost model calibrated in this run")
            self.save()

    def run_configs(self) -> None:
        from _attention import phases, report

        for i, cfg in enumerate(self.configs):
            t0 = time.perf_counter()
            recs = phases.run_config(self.runner, cfg, self.repeats, self.args.seed + i, with_launches=self.args.launches)
            self.records += recs
            self.header["elapsed_s"][cfg.label] = round(time.perf_counter() - t0, 1)
            self.save()
            line = f"{cfg.label:38s}"
            for r in recs:
                if r["variant"] == "ours":
                    line += (f" | ours[{r['precision']}] {r['median_s'] * 1e3:8.3f} ms vs naive {report.fmt(r['speedup_vs_naive'])}"
                             f" vs split-KV {report.fmt(r['speedup_vs_splitkv'])}")
                    if self.gpu:
                        line += f" vs JAX {report.fmt(r['speedup_vs_jax_best'])}"
                    line += f" sharing={r['plan']['use_sharing']}"
            print(line + f" [{time.perf_counter() - t0:.0f}s]", flush=True)

    def plan(self) -> None:
        from _attention import phases

        self.header["plan"] = [rec for p in self.runner.precisions
                               for rec in phases.time_plan(self.runner, p, self.repeats)]

    def load_tuned(self, path: str) -> None:
        """Tiles, cost models and baseline parameters of an earlier record (--tuned-from)."""
        from jaxsys.pallas_kernels.shared_prefix_attention import BlockSizes, CostModel

        earlier = json.loads(Path(path).read_text())
        for p in self.runner.precisions:
            o = self.runner.ours[p]
            if p in earlier.get("tuning", {}):
                o = dataclasses.replace(o, block_sizes=BlockSizes.from_dict(earlier["tuning"][p]["best"]),
                                        source=f"tuned by the run of {earlier.get('date')} ({path})")
            if p in earlier.get("calibration", {}) and not self.args.interpret:
                o = dataclasses.replace(o, cost_model=CostModel.from_dict(earlier["calibration"][p]["derived_cost_model"]),
                                        source=o.source + f"; cost model calibrated by the run of {earlier.get('date')}")
            self.runner.ours[p] = o
        for name, rec in earlier.get("baseline_tuning", {}).items():
            self.runner.baseline_params[name] = rec["best"]
        for key in ("tuning", "baseline_tuning", "calibration"):
            if key in earlier:
                self.header[key] = earlier[key]
        self.header["tuned_from"] = path


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from jaxsys.runtime import enable_compilation_cache

    enable_compilation_cache()
    platform = jax.devices()[0].platform
    if args.gpu and platform != "gpu":
        print(f"--gpu needs a GPU; jax's platform is {platform} (--interpret checks the GPU path on CPU)",
              file=sys.stderr)
        return 2
    gpu = args.gpu or args.interpret or platform == "gpu"
    bench = Benchmark(args, gpu)
    phases = args.phase_list or (["configs", "plan"] if args.quick else
                                 ["tune", "tune-baselines", "configs", "plan"] if gpu else
                                 ["configs", "tune", "calibrate", "plan"])
    if args.tuned_from:
        bench.load_tuned(args.tuned_from)
    if gpu:
        bench.header["harness_floor_s"] = bench.runner.harness_floor(bench.repeats)
    run = {"tune": bench.tune, "tune-baselines": bench.tune_baselines, "calibrate": bench.calibrate,
           "configs": bench.run_configs, "plan": bench.plan}
    print(f"attention benchmark: phases {','.join(phases)}; {bench.runner.device_kind} tables; precisions "
          f"{','.join(bench.runner.precisions)}; {len(bench.configs)} configurations; -> {bench.out}", flush=True)
    bench.save()
    for name in phases:
        bench.phase(name, run[name])
    from _attention import report

    dev = jax.devices()[0]
    png = bench.out.with_suffix(".png")
    report.plot(bench.records, png, f"shared-prefix decode attention on {dev.device_kind}, jax {jax.__version__}, "
                                     f"{args.dtype}, medians of {bench.repeats}")
    for p, row in bench.header["summary"].items():
        print(f"headline [{p}]: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
