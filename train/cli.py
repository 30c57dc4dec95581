"""`jaxsys train lm`: causal-LM training, elastic on device loss/join."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

PROG = "jaxsys train lm"
DEFAULT_CPU_DEVICES = 8
"""Virtual CPU devices for a run that names devices (a --fail/--join schedule or `devices=N`)
when neither --cpu-devices nor XLA_FLAGS says how many: the examples and tests use 8."""

EPILOG = """\
config:
  --config takes a YAML path or the name of a packaged config (tiny). Any key can be overridden
  with key=value (dotted, YAML-typed), e.g. optim.lr=1e-3 data.global_batch=64 dropout=0.0.
  Unknown keys are errors.

elastic training (elastic.enabled, on in configs/train/tiny.yaml):
  --fail DEV@STEP   device DEV (index into jax.devices()) is lost while step STEP runs; the step
                    is re-run on the survivors from the in-memory snapshot (no step lost).
  --join DEV@STEP   device DEV is back in service from step STEP on.
  The global batch, the reduction order and every example's dropout mask do not depend on the
  device set, so the losses and parameters equal, bit for bit, those of the run without failures.
  A schedule is checked before training starts; naming a device the run does not have is an error.

pipeline parallelism (pipeline.enabled, on in configs/train/tiny_pipeline.yaml):
  pipeline.stages=S pipeline.pipelines=P   S consecutive stages of layers, P data-parallel copies
                    (default as many as fit); pipeline.schedule=gpipe|1f1b,
                    pipeline.partition=[3,1] (layers per stage), pipeline.micro_batches=M.
                    The layout, its bubble fraction and each stage's memory are printed; every
                    metrics line has bubble_fraction. Losses and parameters are bitwise those of the
                    one-stage run for every layout.
  --fail/--join     as above (recovery.fail/recovery.join); after a loss the run continues with
                    recovery.strategy: auto (the performance model's choice per failure), reroute,
                    redundant, replan or checkpoint, bitwise as without the failure. When no layout
                    of the survivors fits (recovery.device_memory_gib), the state is saved to
                    checkpoint.dir and the run stops with how to resume.

activation memory (memory.*; the GSPMD and elastic trainers):
  --memory-policy keep|remat|offload|auto   what the backward pass keeps of each layer's named
                    activations: keep all (default, the step as written), recompute all, offload
                    all to host memory, or auto: per activation, the fastest choice whose modelled
                    peak fits the budget (memory.policy).
  --memory-budget B device memory per device for the step: bytes (4e9, 512MiB, 4GB) or a fraction
                    of the device's memory (0.5, 50%) (memory.budget). auto plans within it; the
                    fixed policies are checked against it. The plan is printed (one table per layer
                    kind) and written into the metrics file; a budget that no plan meets stops the
                    run before training, naming the smallest feasible budget. The elastic trainer
                    re-plans when the device count changes. Peaks are modelled (liveness of the
                    traced step), not measured.

devices:
  On a CPU-only machine JAX has one device. --cpu-devices N gives it N virtual devices; a run whose
  --fail/--join schedule (or devices=N) names devices gets 8 (or as many as it names) unless
  --cpu-devices or XLA_FLAGS=--xla_force_host_platform_device_count says otherwise. On GPU/TPU
  machines the run uses the accelerators and --cpu-devices changes nothing.

examples:
  # lose device 3 at step 20, get it back at step 40 (8 virtual devices on a CPU machine)
  jaxsys train lm --config tiny --fail 3@20 --join 3@40 --metrics-out m.jsonl
  # 2 pipelines x 4 stages (1F1B); lose device 1 at step 5, the model picks the strategy
  jaxsys train lm --config tiny_pipeline --fail 1@5 --metrics-out m.jsonl
  # the GSPMD trainer on a data x fsdp x tensor mesh, bf16 compute, checkpoints every 10 steps
  jaxsys train lm --config tiny --cpu-devices 8 elastic.enabled=false mesh.data=2 mesh.fsdp=2 \\
      mesh.tensor=2 model.dtype=bfloat16 checkpoint.dir=/tmp/ckpt checkpoint.every=10
  # the GSPMD trainer within a per-device memory budget, planned per layer activation
  jaxsys train lm --config tiny --cpu-devices 8 elastic.enabled=false --memory-policy auto \\
      --memory-budget 8MiB
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="NAME_OR_PATH",
                   help="YAML config: a path or a packaged name (tiny)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--steps", type=int, metavar="N", help="total steps (overrides `steps`)")
    p.add_argument("--metrics-out", metavar="FILE",
                   help="append one JSON object per step (step, loss, grad_norm, lr, devices, ...)")
    p.add_argument("--fail", action="append", default=[], metavar="DEV@STEP[,DEV@STEP...]",
                   help="device losses (elastic or pipelined trainer); repeatable")
    p.add_argument("--join", action="append", default=[], metavar="DEV@STEP[,DEV@STEP...]",
                   help="device (re)joins (elastic or pipelined trainer); repeatable")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="Orbax checkpoints (checkpoint.dir)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in DIR")
    p.add_argument("--memory-policy", choices=("keep", "remat", "offload", "auto"),
                   help="activation memory policy (memory.policy; see 'activation memory' below)")
    p.add_argument("--memory-budget", metavar="BYTES|FRACTION",
                   help="device memory per device: 4e9, 512MiB, 0.5 or 50%% (memory.budget)")
    p.add_argument("--cpu-devices", type=int, metavar="N",
                   help="give a CPU-only machine N virtual devices (before JAX starts; see 'devices' below)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def _memory(exe) -> str:
    try:
        m = exe.memory_analysis()
    except Exception:
        return ""
    if m is None:
        return ""
    mb = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    return (f" (per device: arguments {mb(m.argument_size_in_bytes)}, outputs {mb(m.output_size_in_bytes)}, "
            f"temporaries {mb(m.temp_size_in_bytes)})")


def _fail(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def _cpu_devices_for(cfg, explicit: int | None) -> tuple[int | None, str]:
    """(CPU device count to request before JAX starts, or None to leave JAX's count alone; why,
    when it is the default for a run that names devices)."""
    from jaxsys.runtime import DEVICE_COUNT_FLAG
    from jaxsys.train.elastic.events import EventSchedule

    if explicit is not None:
        return explicit, ""
    if DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
        return None, ""
    events = (EventSchedule.from_specs(cfg.elastic.fail, cfg.elastic.join).events
              + EventSchedule.from_specs(cfg.recovery.fail, cfg.recovery.join).events)
    needed = max([e.device + 1 for e in events] + [cfg.devices or 0])
    pc = cfg.pipeline
    grid = pc.stages * (pc.pipelines or 1) if pc.enabled else 0
    if not needed and not grid:
        return None, ""
    if grid > needed:
        return max(DEFAULT_CPU_DEVICES, grid), f"pipeline.stages x pipeline.pipelines = {grid}"
    why = (f"the schedule names device {needed - 1}" if events and needed > (cfg.devices or 0)
           else f"devices={cfg.devices}")
    return max(DEFAULT_CPU_DEVICES, needed), why


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.cpu_devices is not None and args.cpu_devices < 1:
        return _fail("--cpu-devices must be >= 1")

    from jaxsys.train.config import TrainConfigError, load_config
    from jaxsys.train.elastic.events import EventSpecError

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.checkpoint_dir:
        overrides.append(f"checkpoint.dir={args.checkpoint_dir}")
    if args.resume:
        overrides.append("checkpoint.resume=true")
    if args.metrics_out:
        overrides.append(f"metrics_out={args.metrics_out}")
    if args.no_progress:
        overrides.append("progress=false")
    if args.memory_policy:
        overrides.append(f"memory.policy={args.memory_policy}")
    if args.memory_budget:
        overrides.append(f"memory.budget={args.memory_budget}")
    try:
        cfg = load_config(args.config, overrides)
        if args.fail or args.join:
            if not (cfg.elastic.enabled or cfg.pipeline.enabled):
                return _fail("--fail/--join need elastic.enabled=true or pipeline.enabled=true")
            section = "recovery" if cfg.pipeline.enabled else "elastic"  # who recovers from the events
            events = [f"{section}.{kind}={','.join(specs)}" for kind, specs in (("fail", args.fail),
                                                                                 ("join", args.join)) if specs]
            cfg = load_config(args.config, overrides + events)
    except (TrainConfigError, EventSpecError) as e:
        return _fail(str(e))
    if (cfg.elastic.fail or cfg.elastic.join) and not cfg.elastic.enabled:
        return _fail("--fail/--join need elastic.enabled=true")
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0

    from jaxsys.runtime import enable_compilation_cache, request_cpu_devices

    cpu_devices, why = _cpu_devices_for(cfg, args.cpu_devices)
    if cpu_devices is not None:
        try:
            request_cpu_devices(cpu_devices)
        except RuntimeError as e:
            return _fail(f"--cpu-devices {cpu_devices}: {e}")
    enable_compilation_cache()
    import jax

    from jaxsys.train.elastic.planner import UnrecoverableError
    from jaxsys.train.memory import InfeasibleBudgetError
    from jaxsys.train.trainer import make_trainer

    if why and jax.default_backend() == "cpu":
        print(f"{PROG}: {cpu_devices} virtual CPU devices ({why}; --cpu-devices N to choose)", file=sys.stderr,
              flush=True)
    try:
        trainer = make_trainer(cfg)
        mode = "pipelined" if cfg.pipeline.enabled else "elastic" if cfg.elastic.enabled else "gspmd"
        print(f"{PROG}: {mode} trainer, {len(trainer.devices)} {jax.default_backend()} devices, "
              f"{cfg.model.num_params():,} parameters, {cfg.steps} steps of {cfg.data.global_batch} x "
              f"{cfg.data.seq_len} tokens", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        exe = trainer.compile()
        print(f"{PROG}: step compiled in {time.perf_counter() - t0:.1f} s{_memory(exe)}", file=sys.stderr,
              flush=True)
        for line in getattr(trainer.program, "describe", list)():
            print(f"{PROG}: {line}", file=sys.stderr, flush=True)
        result = trainer.run()
        trainer.close()
    except (TrainConfigError, EventSpecError, UnrecoverableError, InfeasibleBudgetError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if result.records:
        first, last = result.records[0], result.records[-1]
        print(f"steps {result.start_step}-{result.end_step - 1}: loss {first.loss:.4f} -> {last.loss:.4f} "
              f"on {last.num_devices} devices")
    for rec in getattr(trainer.program, "recoveries", []):
        print(rec.summary())
    if cfg.metrics_out:
        print(f"metrics: {cfg.metrics_out}")
    if cfg.checkpoint.dir:
        print(f"checkpoints: {cfg.checkpoint.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
