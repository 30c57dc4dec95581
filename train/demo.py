"""`make demo`: an elastic run that loses a device and gets it back, next to the run without the
failure; the two loss curves (and all parameters) are the same, bit for bit.

    from jaxsys.train.demo import run_demo
    summary = run_demo()
"""

from __future__ import annotations

import time
from typing import Any, Callable

_BARS = "▁▂▃▄▅▆▇█"


def _sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    step = max(1, len(values) // width)
    vals = values[::step]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(_BARS[min(len(_BARS) - 1, int((v - lo) / span * (len(_BARS) - 1) + 0.5))] for v in vals)


def run_demo(*, steps: int = 60, fail_step: int = 20, join_step: int = 40, device: int = 3,
             out: Callable[[str], Any] = print) -> dict[str, Any]:
    """Train configs/train/tiny.yaml twice on all devices: without failures, and losing `device`
    at `fail_step` and getting it back at `join_step`. Prints both loss curves and whether every
    loss and every parameter is bitwise equal; returns a summary dict."""
    import jax
    import numpy as np

    from jaxsys.train.config import load_config
    from jaxsys.train.elastic.runtime import ElasticStep
    from jaxsys.train.trainer import Trainer

    t0 = time.perf_counter()
    n = jax.device_count()
    if n < 2:
        from jaxsys.runtime import cpu_devices_hint

        out(f"elastic demo: needs at least 2 devices; {cpu_devices_hint(8)}")
        return {"skipped": True}
    device = min(device, n - 1)
    cfg = load_config("tiny", [f"steps={steps}", "elastic.precompile=scheduled", "progress=false"])
    events: list[str] = []
    clean = Trainer(cfg, program=ElasticStep(cfg, log=lambda m: None))
    failing_cfg = cfg.replace(**{"elastic.fail": f"{device}@{fail_step}", "elastic.join": f"{device}@{join_step}"})
    failing = Trainer(failing_cfg, program=ElasticStep(failing_cfg, log=events.append))
    out(f"== elastic training: lose device {device} at step {fail_step}, get it back at step "
        f"{join_step} ({n} {jax.default_backend()} devices, {cfg.model.num_params():,}-parameter model, "
        f"dropout {cfg.dropout}, {cfg.data.micro_batches} micro-batches of {cfg.data.micro_size})")
    failing.setup()
    failing.program.precompile()  # compile the survivors' programs while the failure-free run trains
    res_a = clean.run()
    failing.program.cache.wait()  # as in a long run, the survivors' executables are ready before a failure
    res_b = failing.run()
    state_equal = bool(np.array_equal(clean.program.flat_state(), failing.program.flat_state()))
    la, lb = res_a.losses, res_b.losses
    same = [x == y for x, y in zip(la, lb)]
    by_step = {r.step: r for r in failing.program.recoveries}
    out(f"{'step':>4}  {'devices':>7}  {'loss, no failure':>18}  {'loss, fail+rejoin':>18}  equal")
    show = sorted({0, steps - 1, fail_step - 1, fail_step, join_step - 1, join_step}
                  | set(range(0, steps, 10)))
    for s in show:
        if s >= len(la):
            continue
        ra, rb = res_a.records[s], res_b.records[s]
        note = ""
        if s in by_step:
            r = by_step[s]
            what = "lost" if r.kind == "fail" else "back"
            note = (f"  <- device {device} {what}: recovered in {r.recovery_s:.2f} s "
                    f"(compile {r.compile_s:.2f} s, {r.compile_how}), {r.lost_steps} steps lost")
        out(f"{s:>4}  {ra.num_devices:>3} {rb.num_devices:>3}  {ra.loss!r:>18}  {rb.loss!r:>18}  "
            f"{'yes' if ra.loss == rb.loss else 'NO'}{note}")
    out(f"loss, no failure   {_sparkline(la)}  {la[0]:.3f} -> {la[-1]:.3f}")
    out(f"loss, fail+rejoin  {_sparkline(lb)}  {lb[0]:.3f} -> {lb[-1]:.3f}")
    ok = all(same) and len(la) == len(lb) == steps and state_equal and res_a.checksums == res_b.checksums
    verdict = (f"{sum(same)}/{steps} losses, every step's parameter checksum and the final parameters "
               f"and Adam moments are bitwise equal" if ok else "MISMATCH: the runs differ")
    out(f"result: {verdict} ({time.perf_counter() - t0:.1f} s)")
    return {"ok": ok, "steps": steps, "losses_equal": sum(same), "state_equal": state_equal,
            "recoveries": [r.to_json() for r in failing.program.recoveries], "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    import sys

    sys.exit(0 if run_demo().get("ok", True) else 1)
