"""`jaxsys train lm`: causal-LM training, elastic on device loss/join."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

PROG = "jaxsys train lm"

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

examples:
  # 8 virtual CPU devices: lose device 3 at step 20, get it back at step 40
  jaxsys train lm --config tiny --cpu-devices 8 --fail 3@20 --join 3@40 --metrics-out m.jsonl
  # the GSPMD trainer on a data x fsdp x tensor mesh, bf16 compute, checkpoints every 10 steps
  jaxsys train lm --config tiny --cpu-devices 8 elastic.enabled=false mesh.data=2 mesh.fsdp=2 \\
      mesh.tensor=2 model.dtype=bfloat16 checkpoint.dir=/tmp/ckpt checkpoint.every=10
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
                   help="device losses (elastic mode); repeatable")
    p.add_argument("--join", action="append", default=[], metavar="DEV@STEP[,DEV@STEP...]",
                   help="device (re)joins (elastic mode); repeatable")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="Orbax checkpoints (checkpoint.dir)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in DIR")
    p.add_argument("--cpu-devices", type=int, metavar="N",
                   help="run on N virtual CPU devices (sets XLA_FLAGS before jax starts)")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.cpu_devices is not None:
        if args.cpu_devices < 1:
            return _fail("--cpu-devices must be >= 1")
        flag = f"--xla_force_host_platform_device_count={args.cpu_devices}"
        if "jax" in sys.modules:
            import jax

            if jax.device_count() != args.cpu_devices:
                return _fail(f"--cpu-devices {args.cpu_devices}: jax is already running with "
                             f"{jax.device_count()} devices in this process")
        else:
            flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count")]
            os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
            os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from jaxsys.train.config import TrainConfigError, load_config
    from jaxsys.train.elastic.events import EventSpecError

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.fail:
        overrides.append(f"elastic.fail={','.join(args.fail)}")
    if args.join:
        overrides.append(f"elastic.join={','.join(args.join)}")
    if args.checkpoint_dir:
        overrides.append(f"checkpoint.dir={args.checkpoint_dir}")
    if args.resume:
        overrides.append("checkpoint.resume=true")
    if args.metrics_out:
        overrides.append(f"metrics_out={args.metrics_out}")
    if args.no_progress:
        overrides.append("progress=false")
    try:
        cfg = load_config(args.config, overrides)
    except (TrainConfigError, EventSpecError) as e:
        return _fail(str(e))
    if (cfg.elastic.fail or cfg.elastic.join) and not cfg.elastic.enabled:
        return _fail("--fail/--join need elastic.enabled=true")
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0

    from jaxsys.runtime import enable_compilation_cache

    enable_compilation_cache()
    import jax

    from jaxsys.train.elastic.planner import UnrecoverableError
    from jaxsys.train.trainer import make_trainer

    try:
        trainer = make_trainer(cfg)
        mode = "elastic" if cfg.elastic.enabled else "gspmd"
        print(f"{PROG}: {mode} trainer, {len(trainer.devices)} {jax.default_backend()} devices, "
              f"{cfg.model.num_params():,} parameters, {cfg.steps} steps of {cfg.data.global_batch} x "
              f"{cfg.data.seq_len} tokens", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        exe = trainer.compile()
        print(f"{PROG}: step compiled in {time.perf_counter() - t0:.1f} s{_memory(exe)}", file=sys.stderr,
              flush=True)
        result = trainer.run()
        trainer.close()
    except (TrainConfigError, EventSpecError, UnrecoverableError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if result.records:
        first, last = result.records[0], result.records[-1]
        print(f"steps {result.start_step}-{result.end_step - 1}: loss {first.loss:.4f} -> {last.loss:.4f} "
              f"on {last.num_devices} devices")
    for rec in getattr(trainer, "recoveries", []):
        print(rec.summary())
    if cfg.metrics_out:
        print(f"metrics: {cfg.metrics_out}")
    if cfg.checkpoint.dir:
        print(f"checkpoints: {cfg.checkpoint.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
