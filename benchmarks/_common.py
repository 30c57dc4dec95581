"""Shared benchmark plumbing: device description, medians, geometric means, targets, JSON records.

Every record written by `write_results` carries, at the top level: `commit` (the git hash the code
ran at, and `dirty` if the tree had uncommitted changes), `device`, `loadavg` (`start`, `end`: the
1/5/15-minute load averages when the benchmark started and when it wrote the record),
`foreign_cpu` (how many cores' worth of CPU time processes other than this benchmark and its
children used while it ran, from /proc/stat minus our own CPU time), `noisy` (true when that
exceeded NOISY_FOREIGN_CORES, or, where /proc/stat is unavailable, when the start load average
exceeded the core count: such a record must not back a README number), `targets` (a list of
`{name, value, target, met}`), and the benchmark's `records`.

Why not the load average alone: it counts runnable threads, and a benchmark running XLA on 8
virtual devices is itself many threads, so on 2 cores its own load reads 4-6 with nothing else
running. The machine was quiet when the CPU time of everything else stayed near zero.

The start values are read when this module is imported (a benchmark imports it first thing);
a benchmark that runs several phases may pass its own `loadavg_start`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
LOADAVG_AT_IMPORT: tuple[float, float, float] = os.getloadavg()
NOISY_FOREIGN_CORES = 0.2


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine spent busy since boot (None without /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


_CPU_AT_IMPORT = (_busy_cpu_seconds(), _own_cpu_seconds(), time.monotonic())


def foreign_cpu() -> dict[str, float] | None:
    """Cores' worth of CPU used by other processes since this module was imported."""
    busy0, own0, t0 = _CPU_AT_IMPORT
    busy1 = _busy_cpu_seconds()
    if busy0 is None or busy1 is None:
        return None
    wall = max(time.monotonic() - t0, 1e-9)
    other = max(0.0, (busy1 - busy0) - (_own_cpu_seconds() - own0))
    return {"cores": other / wall, "wall_s": wall}


def device_info() -> dict[str, Any]:
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "num_devices": jax.device_count(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
            "python": platform.python_version()}


def git_commit() -> tuple[str, bool]:
    """(HEAD's hash, whether tracked files other than the records differ from it); ("unknown", True)
    outside a checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":!benchmarks/results"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
        return head, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def geomean(values: Iterable[float]) -> float:
    vals = [float(v) for v in values]
    if not vals or any(v <= 0 for v in vals):
        raise ValueError(f"geometric mean needs positive values, got {vals}")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def target(name: str, value: float, goal: float, *, higher_is_better: bool = True) -> dict[str, Any]:
    """One entry of a record's `targets`: met when value >= goal (or <= goal when lower is better)."""
    value = float(value)
    met = value >= goal if higher_is_better else value <= goal
    return {"name": name, "value": value, "target": goal,
            "direction": ">=" if higher_is_better else "<=", "met": bool(met)}


def is_noisy(loadavg_start: Sequence[float], foreign: dict[str, float] | None) -> bool:
    if foreign is not None:
        return foreign["cores"] > NOISY_FOREIGN_CORES
    return loadavg_start[0] > (os.cpu_count() or 1)


def write_results(name: str, records: list[dict[str, Any]], out: str | os.PathLike | None = None, *,
                  targets: list[dict[str, Any]], loadavg_start: Sequence[float] | None = None,
                  **header: Any) -> Path:
    """Write `benchmarks/results/<name>.json` (or `out`) with the top-level fields described above."""
    for t in targets:
        missing = {"name", "value", "target", "met"} - set(t)
        if missing:
            raise ValueError(f"target {t} lacks {sorted(missing)}")
    start = tuple(loadavg_start or LOADAVG_AT_IMPORT)
    end = os.getloadavg()
    foreign = foreign_cpu()
    commit, dirty = git_commit()
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "commit": commit, "dirty": dirty,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device_info(), "loadavg": {"start": list(start), "end": list(end)},
           "foreign_cpu": foreign, "noisy": is_noisy(start, foreign), "targets": targets, **header,
           "records": records}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    flag = " (NOISY: other processes used the CPU during the run; do not cite)" if doc["noisy"] else ""
    print(f"wrote {path}{flag}")
    return path
