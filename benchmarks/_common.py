"""Shared benchmark plumbing: device description, medians, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def device_info() -> dict[str, Any]:
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "num_devices": jax.device_count(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
            "python": platform.python_version()}


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def write_results(name: str, records: list[dict[str, Any]], out: str | os.PathLike | None = None,
                  **header: Any) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device_info(), **header, "records": records}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    return path
