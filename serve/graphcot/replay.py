"""Replaying a recorded Graph-CoT call/token profile through our engine (a second cache workload).

The traces in `../shared/data/glm/graphcot-traces/` are real single-agent Graph-CoT runs with
Qwen3-14B: per question the number of LLM calls (`api_calls`) and the tokens they used in all
(`token_count`). Graph-CoT's calls share one instruction prefix and re-send a scratchpad that grows
every step, so a question of n calls and T tokens is replayed as n prompts

    call k:  shared prefix (S tokens) + the question (Q) + (k - 1) * D tokens of scratchpad

each generating G tokens, with D chosen so that the n calls add up to T:
n (S + Q + G) + D n (n - 1) / 2 = T (D = 0 when T is smaller than the fixed part). Token ids are
drawn at random per question (and once for the shared prefix), so what the radix cache can share is
exactly what Graph-CoT's prompts share. The calls of one question run in order; many questions are
in flight at once, as in serving.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Sequence

from jaxsys.serve.graphcot.cache_policy import Span


@dataclasses.dataclass(frozen=True)
class ReplayShape:
    shared_tokens: int = 1024  # S: instruction, examples, graph definition
    question_tokens: int = 32  # Q
    generated_tokens: int = 48  # G per call (one Thought or Action line)
    max_prompt_tokens: int = 7000  # stay inside the replaying model's context


@dataclasses.dataclass
class ReplayQuestion:
    qid: str
    calls: list[list[int]]  # prompt token ids per call
    spans: list[list[Span]]
    recorded_calls: int
    recorded_tokens: int


def load_profile(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Every traced question's calls, tokens and seconds; with `limit`, that many taken question
    types in turn (the files are sorted by type, so their first rows are all of the lightest)."""
    by_type: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                row = {"calls": int(r["api_calls"]), "tokens": int(r["token_count"]),
                       "seconds": float(r["duration"]), "type": r.get("question_type", "")}
                by_type.setdefault(row["type"], []).append(row)
    if not limit:
        return [row for rows in by_type.values() for row in rows]
    out: list[dict] = []
    for k in range(max(len(rows) for rows in by_type.values())):
        out += [rows[k] for rows in by_type.values() if k < len(rows)]
    return out[:limit]


def build_replay(profile: Sequence[dict], *, vocab_size: int, shape: ReplayShape = ReplayShape(), seed: int = 0,
                 avoid: Sequence[int] = ()) -> list[ReplayQuestion]:
    """Prompts of every call of every profiled question (see the module docstring)."""
    rng = random.Random(seed)
    banned = set(avoid)

    def draw(n: int) -> list[int]:
        out = []
        while len(out) < n:
            t = rng.randrange(vocab_size)
            if t not in banned:
                out.append(t)
        return out

    S, Q, G = shape.shared_tokens, shape.question_tokens, shape.generated_tokens
    shared = draw(S)
    out = []
    for i, p in enumerate(profile):
        n = max(1, p["calls"])
        fixed = n * (S + Q + G)
        growth = (p["tokens"] - fixed) / (n * (n - 1) / 2) if n > 1 and p["tokens"] > fixed else 0.0
        growth = int(min(growth, (shape.max_prompt_tokens - S - Q) / max(1, n - 1)))
        question = draw(Q)
        history = draw(growth * (n - 1))
        calls, spans = [], []
        for k in range(n):
            ids = shared + question + history[:k * growth]
            calls.append(ids)
            spans.append([Span(0, S, "template"), Span(S, len(ids), "private")])
        out.append(ReplayQuestion(f"replay-{i}", calls, spans, p["calls"], p["tokens"]))
    return out


def working_set_pages(questions: Sequence[ReplayQuestion], page_size: int) -> int:
    """Pages the radix tree holds when nothing is evicted: distinct whole-page prefixes."""
    seen = set()
    for q in questions:
        for ids in q.calls:
            h = 0
            for p in range(len(ids) // page_size):
                h = hash((h, tuple(ids[p * page_size:(p + 1) * page_size])))
                seen.add(h)
    return len(seen)


@dataclasses.dataclass
class ReplayRecord:
    qid: str
    calls: int
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    seconds: float


def run_replay(backend, questions: Sequence[ReplayQuestion], *, concurrency: int, generated_tokens: int,
               policy=None) -> tuple[list[ReplayRecord], float]:
    """Replay every question (`concurrency` in flight); returns the records and the wall time."""
    def one(q: ReplayQuestion) -> ReplayRecord:
        rec = ReplayRecord(q.qid, 0, 0, 0, 0, 0.0)
        t0 = time.perf_counter()
        try:
            for ids, spans in zip(q.calls, q.spans):
                out = backend.complete_tokens(ids, spans, max_tokens=generated_tokens, qid=q.qid, agent="replay",
                                              ignore_eos=True)
                rec.calls += 1
                rec.prompt_tokens += out.prompt_tokens
                rec.cached_tokens += out.cached_tokens or 0
                rec.generated_tokens += out.generated_tokens
        finally:
            if policy is not None:
                policy.question_done(q.qid)
        rec.seconds = time.perf_counter() - t0
        return rec

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="replay-q") as pool:
        records = list(pool.map(one, questions))
    return records, time.perf_counter() - t0


def summarize_replay(records: Sequence[ReplayRecord], wall_s: float) -> dict[str, float]:
    secs = sorted(r.seconds for r in records)

    def pct(q: float) -> float:
        return secs[min(len(secs) - 1, int(round(q / 100 * (len(secs) - 1))))]

    prompt = sum(r.prompt_tokens for r in records)
    return {"questions": len(records), "hit_rate": sum(r.cached_tokens for r in records) / prompt if prompt else 0.0,
            "prompt_tokens": statistics.mean(r.prompt_tokens for r in records),
            "cached_tokens": statistics.mean(r.cached_tokens for r in records),
            "llm_calls": statistics.mean(r.calls for r in records), "p50_s": pct(50), "p99_s": pct(99),
            "throughput_qps": len(records) / wall_s if wall_s > 0 else 0.0, "wall_s": wall_s}


def trace_path(data_dir: str | os.PathLike, domain: str) -> Path:
    return Path(data_dir) / "glm" / "graphcot-traces" / f"qwen3-14b_{domain}.jsonl"
