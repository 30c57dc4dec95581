"""Calibrate the simulator's step-time model on our own serving engine.

`measure_engine` drives `jaxsys.serve.ServingLLM` (its public API only) with batches of B
same-length prompts and greedy decoding that ignores EOS, so every request decodes the same
number of steps; once all B requests decode together, the time between two tokens of a request
is one decode step at batch B over B * (prompt + generated) KV tokens. Each (B, context) point is
run twice and the second run's median interval is kept (the first compiles). Single-request
time-to-first-token over several prompt lengths gives the prefill model.

`cpu_calibrated(calibration)` turns the fitted coefficients into a `HardwareParams` for the
simulator, with the fit's error recorded in it.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxsys.serve.cluster.hardware import HardwareParams, LinearFit, fit_linear, step_features

__all__ = ["Calibration", "StepMeasurement", "cpu_calibrated", "measure_engine"]


@dataclasses.dataclass(frozen=True)
class StepMeasurement:
    batch: int
    context: int  # prompt tokens of every request
    kv_tokens: float  # mean KV tokens of the batch over the measured steps
    step_s: float  # median decode-step time


@dataclasses.dataclass
class Calibration:
    device: str
    model: str
    steps: list[StepMeasurement]
    prefill: list[tuple[int, float]]  # (prompt tokens, seconds to the first token)
    step_fit: LinearFit
    prefill_fit: LinearFit
    engine: dict
    kv_bytes_per_token: int  # of the measured model's cache (what a migration moves)
    seconds: float

    def to_dict(self) -> dict:
        return {"device": self.device, "model": self.model, "engine": self.engine, "seconds": self.seconds,
                "kv_bytes_per_token": self.kv_bytes_per_token,
                "steps": [dataclasses.asdict(s) for s in self.steps], "prefill": self.prefill,
                "step_fit": self.step_fit.to_dict(), "prefill_fit": self.prefill_fit.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(device=d["device"], model=d["model"], engine=d["engine"], seconds=d["seconds"],
                   kv_bytes_per_token=d["kv_bytes_per_token"],
                   steps=[StepMeasurement(**s) for s in d["steps"]], prefill=[tuple(p) for p in d["prefill"]],
                   step_fit=LinearFit(tuple(d["step_fit"]["coef"]), d["step_fit"]["mape"],
                                      d["step_fit"]["max_rel_error"], d["step_fit"]["n"]),
                   prefill_fit=LinearFit(tuple(d["prefill_fit"]["coef"]), d["prefill_fit"]["mape"],
                                         d["prefill_fit"]["max_rel_error"], d["prefill_fit"]["n"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _engine_config(num_pages: int, max_batch: int):
    from jaxsys.serve import EngineConfig

    return EngineConfig(num_pages=num_pages, max_decode_batch=max_batch, shared_attention=False)


def measure_engine(model="smollm2-135m-instruct", *, batches: Sequence[int] = (1, 4, 16, 32),
                   contexts: Sequence[int] = (128, 512, 1024), decode_tokens: int = 24,
                   prefill_lengths: Sequence[int] = (64, 256, 512, 1024), num_pages: int = 4096,
                   max_batch: int = 64, progress: bool = True) -> Calibration:
    """Measure decode-step and prefill times of our engine and fit the step-time model.

    model: a registry name or a `jaxsys.LoadedModel`. Plain paged attention (no shared prefix:
    the prompts are distinct token sequences, so there is nothing to share).
    """
    import jax

    from jaxsys.models import load_model
    from jaxsys.models.kv_cache import cache_bytes
    from jaxsys.sampling import SamplingParams
    from jaxsys.serve import ServingLLM

    t_start = time.perf_counter()
    loaded = load_model(model) if isinstance(model, str) else model
    engine_cfg = _engine_config(num_pages, max_batch)
    llm = ServingLLM(loaded, config=engine_cfg)
    vocab = loaded.config.vocab_size
    rng = np.random.default_rng(0)
    sp = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    skip = 4  # intervals that may still include another request's prefill
    steps: list[StepMeasurement] = []
    for ctx in contexts:
        for B in batches:
            if B * (ctx + decode_tokens) > (num_pages - 1) * engine_cfg.page_size or B > max_batch:
                continue
            med = None
            for _ in range(2):  # the first run compiles this shape
                prompts = [rng.integers(1, vocab, ctx).tolist() for _ in range(B)]
                outs = llm.generate(prompts, sp)
                med = statistics.median(x for o in outs for x in o.tpot_s[skip:])
            steps.append(StepMeasurement(B, ctx, B * (ctx + skip + (decode_tokens - skip) / 2), float(med)))
            if progress:
                print(f"  decode step B={B:3d} context={ctx:5d}: {med * 1e3:8.2f} ms", flush=True)
    prefill: list[tuple[int, float]] = []
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for n in prefill_lengths:
        times = []
        for _ in range(3):
            outs = llm.generate([rng.integers(1, vocab, n).tolist()], one)
            times.append(outs[0].ttft_s)
        prefill.append((n, float(statistics.median(times[1:]))))
        if progress:
            print(f"  prefill {n:5d} tokens: {prefill[-1][1] * 1e3:8.2f} ms", flush=True)
    step_fit = fit_linear(step_features([s.batch for s in steps], [s.kv_tokens for s in steps]),
                          [s.step_s for s in steps])
    pre_X = np.stack([np.ones(len(prefill)), [p[0] for p in prefill]], axis=1)
    prefill_fit = fit_linear(pre_X, [p[1] for p in prefill])
    d = jax.devices()[0]
    kv_bytes = cache_bytes(loaded.config, 1, 1)
    return Calibration(kv_bytes_per_token=kv_bytes, device=f"{d.platform}:{d.device_kind}", model=str(loaded.name), steps=steps, prefill=prefill,
                       step_fit=step_fit, prefill_fit=prefill_fit,
                       engine={"num_pages": num_pages, "page_size": engine_cfg.page_size, "max_decode_batch": max_batch,
                               "shared_attention": False},
                       seconds=time.perf_counter() - t_start)


def cpu_calibrated(cal: Calibration, *, link_bytes_per_s: float = 5e9,
                   migration_latency_s: float = 5e-3) -> HardwareParams:
    """A `HardwareParams` from a calibration of our engine: the fitted step and prefill models, the
    engine's KV capacity and batch limit. SLOs: TPOT 2x the fitted step at a half-full batch over
    600-token requests, TTFT 5x a 512-token prefill. link_bytes_per_s: host-memory copy between
    two CPU devices (stated, not measured)."""
    a, b, c = cal.step_fit.coef
    p0, p1 = cal.prefill_fit.coef
    half = cal.engine["max_decode_batch"] // 2
    tpot_slo = 2.0 * (a + b * half + c * half * 600)
    return HardwareParams(
        name="cpu-calibrated",
        calibrated_on=f"our engine ({cal.model}, plain paged decode) measured on {cal.device}",
        step_a=a, step_b=b, step_c=c, prefill_p0=p0, prefill_p1=p1,
        kv_capacity_tokens=(cal.engine["num_pages"] - 1) * cal.engine["page_size"], page_size=cal.engine["page_size"],
        max_batch=cal.engine["max_decode_batch"], kv_bytes_per_token=cal.kv_bytes_per_token,
        link_bytes_per_s=link_bytes_per_s, migration_latency_s=migration_latency_s,
        ttft_slo_s=5.0 * (p0 + p1 * 512), tpot_slo_s=tpot_slo,
        step_fit=cal.step_fit.to_dict(), prefill_fit=cal.prefill_fit.to_dict())
