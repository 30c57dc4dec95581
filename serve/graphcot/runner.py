"""Running questions: many in flight, each a protocol driven on its own thread.

`GraphQA.run` gives each question a thread (at most `concurrency` at once) that drives its protocol
(`protocols.py`): LLM calls go to the backend, graph calls to the graph, A-Agent code to the
sandbox. With the engine backend every thread's calls join the scheduler's continuous batch, so
one question's retrieval and code execution overlap other questions' prefill and decode: that is
the pipelining. With `pipelining=False` a `PhaseGate` keeps the same concurrency but never lets
tool work and LLM work overlap (the stage-synchronous way: all in-flight LLM calls finish, then
the waiting tool calls run, then the LLM again), which is what the ablation compares against.

Each question yields one `QuestionRecord` (the CLI's JSON line): answer, correctness (exact match
after normalisation, and Rouge-L), LLM calls, prompt / cached / generated tokens, seconds, and the
outputs that could not be parsed. `GraphQA.timeline` keeps when each LLM call and each piece of tool
work ran (inside the phase gate), so whether tool work really overlapped other questions' LLM work
is measured (`tool_overlap`), not assumed from the configuration.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import json
import threading
import time
from typing import Any, Callable, Iterable, Sequence

from jaxsys.serve.graphcot.backends import BackendError, PromptTooLong
from jaxsys.serve.graphcot.graph import Graph, render_vertex
from jaxsys.serve.graphcot.metrics import exact_match, rouge_l
from jaxsys.serve.graphcot.protocols import (LLMCall, ProtocolOutcome, drive, glm_protocol, graph_handler,
                                             graphcot_protocol)
from jaxsys.serve.graphcot.questions import DIFFICULTIES
from jaxsys.serve.graphcot.sandbox import Sandbox

SYSTEMS = ("glm", "graphcot")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    system: str = "glm"
    concurrency: int = 16
    sharing: bool = True  # GLM's vertex-centric prompt layout
    pipelining: bool = True
    max_steps: int = 10  # Graph-CoT's step limit (its run script's max_steps)
    graphcot_max_tokens: int = 300  # per Thought / Action call, as Graph-CoT's (each stops at a newline)
    max_iters: int = 4  # GLM's rounds of code
    c_tokens: int = 8
    r_tokens: int = 64
    a_tokens: int = 192
    max_vertices: int = 8
    time_limit: float = 5.0  # per A-Agent snippet

    def __post_init__(self):
        if self.system not in SYSTEMS:
            raise ValueError(f"unknown system {self.system!r}; systems: {', '.join(SYSTEMS)}")
        for name in ("concurrency", "max_steps", "graphcot_max_tokens", "max_iters", "c_tokens", "r_tokens",
                     "a_tokens", "max_vertices"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclasses.dataclass
class QuestionRecord:
    qid: str
    answer: str
    correct: bool
    llm_calls: int
    prompt_tokens: int
    cached_tokens: int | None
    generated_tokens: int
    seconds: float
    gold: str = ""
    rouge_l: float = 0.0
    parse_failures: int = 0
    steps: int = 0
    finished: bool = False
    llm_seconds: float = 0.0
    tool_seconds: float = 0.0
    error: str | None = None
    difficulty: str | None = None
    template: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class Interval:
    """One LLM call or one piece of tool work of a question, in `time.perf_counter()` seconds."""

    qid: str
    kind: str  # "llm" | "tool"
    start: float
    end: float


def tool_overlap(timeline: Sequence[Interval]) -> float:
    """The fraction of all tool seconds during which another question had an LLM call in flight
    (0 when there was no tool work)."""
    llm: dict[str, list[Interval]] = {}
    for iv in timeline:
        if iv.kind == "llm":
            llm.setdefault(iv.qid, []).append(iv)
    total = covered = 0.0
    for tool in timeline:
        if tool.kind != "tool":
            continue
        total += tool.end - tool.start
        cuts = sorted((max(iv.start, tool.start), min(iv.end, tool.end)) for qid, ivs in llm.items()
                      if qid != tool.qid for iv in ivs if iv.start < tool.end and iv.end > tool.start)
        reach = tool.start
        for lo, hi in cuts:  # the length of the union of the clipped LLM intervals
            covered += max(0.0, hi - max(lo, reach))
            reach = max(reach, hi)
    return covered / total if total > 0 else 0.0


class PhaseGate:
    """With `overlap=False`: LLM work and tool work never run at the same time (either phase admits
    any number of holders; a waiting phase blocks new arrivals of the running one, so neither
    starves). With `overlap=True` it lets everything through."""

    def __init__(self, overlap: bool):
        self.overlap = overlap
        self._cv = threading.Condition()
        self._phase: str | None = None
        self._active = 0
        self._waiting = {"llm": 0, "tool": 0}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.overlap:
            yield
            return
        other = "tool" if phase == "llm" else "llm"
        with self._cv:
            self._waiting[phase] += 1
            while not (self._active == 0 or (self._phase == phase and self._waiting[other] == 0)):
                self._cv.wait()
            self._waiting[phase] -= 1
            self._phase = phase
            self._active += 1
        try:
            yield
        finally:
            with self._cv:
                self._active -= 1
                if self._active == 0:
                    self._cv.notify_all()


class GraphQA:
    """Answer questions about `graph` with GLM or Graph-CoT on `backend` (see the module docstring)."""

    def __init__(self, graph: Graph, backend, config: RunConfig = RunConfig(), *, policy=None):
        self.graph = graph
        self.backend = backend
        self.config = config
        self.policy = policy
        self.definition = graph.definition()
        self.timeline: list[Interval] = []  # every run's LLM calls and tool work (list.append is atomic)
        self.sandbox = Sandbox(graph, time_limit=config.time_limit) if config.system == "glm" else None
        graph.warm()

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()

    def __enter__(self) -> "GraphQA":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def protocol(self, question: str):
        c = self.config
        if c.system == "graphcot":
            return graphcot_protocol(question, self.definition, max_steps=c.max_steps,
                                     max_tokens=c.graphcot_max_tokens)
        return glm_protocol(question, self.definition, lambda v: render_vertex(self.graph, v), max_iters=c.max_iters,
                            sharing=c.sharing, max_vertices=c.max_vertices, c_tokens=c.c_tokens,
                            r_tokens=c.r_tokens, a_tokens=c.a_tokens)

    def answer(self, question: dict[str, Any], gate: PhaseGate | None = None) -> QuestionRecord:
        """One question, on the calling thread."""
        gate = gate or PhaseGate(overlap=True)
        qid = str(question["qid"])
        rec = QuestionRecord(qid, "", False, 0, 0, 0, 0, 0.0, gold=str(question.get("answer", "")),
                             difficulty=question.get("difficulty"), template=question.get("template"))
        graph_call = graph_handler(self.graph)
        t0 = time.perf_counter()

        def on_llm(call: LLMCall) -> str:
            t = time.perf_counter()
            with gate("llm"):
                start = time.perf_counter()
                out = self.backend.complete(call.segments, max_tokens=call.max_tokens, stop=call.stop, qid=qid,
                                            agent=call.agent)
                self.timeline.append(Interval(qid, "llm", start, time.perf_counter()))
            rec.llm_seconds += time.perf_counter() - t
            rec.llm_calls += 1
            rec.prompt_tokens += out.prompt_tokens
            rec.generated_tokens += out.generated_tokens
            rec.cached_tokens = None if out.cached_tokens is None or rec.cached_tokens is None \
                else rec.cached_tokens + out.cached_tokens
            return out.text

        def on_tool(fn: Callable[[], Any]) -> Any:
            t = time.perf_counter()
            with gate("tool"):
                start = time.perf_counter()
                result = fn()
                self.timeline.append(Interval(qid, "tool", start, time.perf_counter()))
            rec.tool_seconds += time.perf_counter() - t
            return result

        try:
            outcome: ProtocolOutcome = drive(
                self.protocol(str(question["question"])), on_llm,
                lambda call: on_tool(lambda: graph_call(call)),
                lambda ex: on_tool(lambda: self.sandbox.run(ex.code)))
            rec.answer, rec.parse_failures = outcome.answer, outcome.parse_failures
            rec.steps, rec.finished = outcome.steps, outcome.finished
        except PromptTooLong as e:  # Graph-CoT's own halting rule: the prompt outgrew the context
            rec.error = f"halted: {e}"
        except BackendError as e:
            rec.error = f"backend: {e}"
        finally:
            if self.policy is not None:
                self.policy.question_done(qid)
        rec.seconds = time.perf_counter() - t0
        rec.correct = exact_match(rec.answer, rec.gold) if rec.answer else False
        rec.rouge_l = rouge_l(rec.answer, rec.gold) if rec.answer else 0.0
        return rec

    def run(self, questions: Sequence[dict[str, Any]], *, progress: bool = False,
            on_record: Callable[[QuestionRecord], None] | None = None) -> list[QuestionRecord]:
        """Every question, `concurrency` at a time; records in the questions' order."""
        gate = PhaseGate(overlap=self.config.pipelining)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(questions), desc=f"{self.config.system}", unit="q", dynamic_ncols=True)
        records: list[QuestionRecord | None] = [None] * len(questions)
        lock = threading.Lock()
        with cf.ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="graphcot-q") as pool:
            futures = {pool.submit(self.answer, q, gate): i for i, q in enumerate(questions)}
            for fut in cf.as_completed(futures):
                rec = fut.result()
                records[futures[fut]] = rec
                with lock:
                    if on_record is not None:
                        on_record(rec)
                    if bar is not None:
                        n = sum(r is not None and r.correct for r in records)
                        bar.set_postfix(correct=n, refresh=False)
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [r for r in records if r is not None]


def summarize(records: Iterable[QuestionRecord]) -> dict[str, float]:
    """Per-question means, latency percentiles and accuracy of a run (and per difficulty, for the
    questions that carry one)."""
    import statistics

    recs = list(records)
    if not recs:
        return {}
    secs = sorted(r.seconds for r in recs)

    def pct(q: float) -> float:
        return secs[min(len(secs) - 1, int(round(q / 100 * (len(secs) - 1))))]

    cached = [r.cached_tokens for r in recs]
    levels = {}
    for level in DIFFICULTIES:
        sub = [r for r in recs if r.difficulty == level]
        if sub:
            levels[f"accuracy_{level}"] = sum(r.correct for r in sub) / len(sub)
            levels[f"questions_{level}"] = len(sub)
    return {"questions": len(recs), "accuracy": sum(r.correct for r in recs) / len(recs), **levels,
            "rouge_l": statistics.mean(r.rouge_l for r in recs),
            "llm_calls": statistics.mean(r.llm_calls for r in recs),
            "prompt_tokens": statistics.mean(r.prompt_tokens for r in recs),
            "cached_tokens": statistics.mean(cached) if None not in cached else None,
            "generated_tokens": statistics.mean(r.generated_tokens for r in recs),
            "tokens": statistics.mean(r.prompt_tokens + r.generated_tokens for r in recs),
            "p50_s": pct(50), "p99_s": pct(99), "parse_failures": statistics.mean(r.parse_failures for r in recs),
            "finished": sum(r.finished for r in recs) / len(recs), "errors": sum(r.error is not None for r in recs)}
