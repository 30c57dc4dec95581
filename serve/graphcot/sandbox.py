"""The graph retriever's sandbox: A-Agent code runs in worker processes, the graph stays here.

A snippet is compiled and executed by RestrictedPython inside a separate worker process
(`_sandbox_worker`, which never imports jax or the graph). Its only way out is the four graph
functions, which are stubs: each call travels to this process as JSON, is answered by `Graph`
(nothing else is dispatched: the call's name must be one of the four), and the answer travels
back as JSON (strings, numbers, lists of ids: no object the snippet could walk). So even a snippet
that broke out of RestrictedPython would hold nothing but a pipe to a process that only answers
graph questions.

Limits: `time_limit` seconds per snippet (SIGALRM inside the worker; the worker is killed when it
overruns by `grace` seconds, e.g. in a C-level loop), `max_output` printed characters, and an
address-space limit inside the worker. A killed or crashed worker is replaced on the next run.
Workers are reused (a pool, one per concurrent caller): starting one costs a Python start-up.

`run` is thread-safe: the GLM runner calls it from many question threads at once, so one question's
code execution overlaps other questions' decoding.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from jaxsys.serve.graphcot.graph import Graph, GraphError

WORKER_MODULE = "jaxsys.serve.graphcot._sandbox_worker"


@dataclasses.dataclass
class ExecResult:
    output: str
    error: str | None
    touched: list[str]  # node ids the snippet retrieved or asked about, in first-touch order
    calls: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None


class _Worker:
    def __init__(self):
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
        self.proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
                                     bufsize=1)
        ready = self.read(deadline=time.monotonic() + 60, limit=1 << 10)
        if ready != {"ready": True}:
            self.kill()
            raise RuntimeError(f"the sandbox worker did not start (got {ready!r})")

    def send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def read(self, *, deadline: float, limit: int) -> dict | None:
        """The next message, or None when the deadline passes or the worker dies."""
        fd = self.proc.stdout
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        line = fd.readline(limit + 1)
        if not line or len(line) > limit:
            return None
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class Sandbox:
    def __init__(self, graph: Graph, *, time_limit: float = 5.0, max_output: int = 4000, grace: float = 2.0):
        if time_limit <= 0 or max_output <= 0:
            raise ValueError("time_limit and max_output must be positive")
        self.graph = graph
        self.time_limit = time_limit
        self.max_output = max_output
        self.grace = grace
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self.functions: dict[str, Callable[..., Any]] = {
            "RetrieveNode": graph.retrieve_node, "NodeFeature": graph.node_feature,
            "NodeDegree": graph.node_degree, "NeighbourCheck": graph.neighbour_check}

    # ------------------------------------------------------------------ workers
    def _take(self) -> _Worker:
        try:
            while True:
                w = self._idle.get_nowait()
                if w.alive():
                    return w
                w.kill()
        except queue.Empty:
            pass
        w = _Worker()
        with self._lock:
            if self._closed:
                w.kill()
                raise RuntimeError("the sandbox is closed")
            self._all.append(w)
        return w

    def _drop(self, w: _Worker) -> None:
        w.kill()
        with self._lock:
            if w in self._all:
                self._all.remove(w)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for w in workers:
            w.kill()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ running a snippet
    def _answer(self, name: str, args: list, touched: dict[str, None]) -> dict:
        fn = self.functions.get(name)
        if fn is None:
            return {"error": f"unknown function {name}"}
        arity = 1 if name == "RetrieveNode" else 2
        if len(args) != arity:
            return {"error": f"{name} takes {arity} argument{'s' * (arity > 1)}, got {len(args)}"}
        try:
            value = fn(*args)
        except GraphError as e:
            return {"error": f"{name}: {e}"}
        if name == "RetrieveNode":
            if value is None:
                return {"error": f"RetrieveNode: nothing in the graph matches {args[0]!r}"}
            touched.setdefault(value)
        else:
            touched.setdefault(str(args[0]).strip().strip("'\""))
        return {"ok": value if isinstance(value, (str, int, float, bool, list)) else str(value)}

    def run(self, code: str) -> ExecResult:
        t0 = time.monotonic()
        touched: dict[str, None] = {}
        calls = 0
        w = self._take()
        limit = 4 * self.max_output + (1 << 16)
        deadline = t0 + self.time_limit + self.grace
        try:
            w.send({"code": code, "time_limit": self.time_limit, "max_output": self.max_output})
            while True:
                msg = w.read(deadline=deadline, limit=limit)
                if msg is None:
                    reason = ("time limit exceeded: the snippet was stopped" if w.alive()
                              else "the snippet's worker died (memory limit?)")
                    self._drop(w)
                    w = None
                    return ExecResult("", reason, list(touched), calls, time.monotonic() - t0)
                if msg.get("done"):
                    return ExecResult(str(msg.get("output", ""))[:self.max_output], msg.get("error"),
                                      list(touched), calls, time.monotonic() - t0)
                calls += 1
                w.send(self._answer(str(msg.get("call")), list(msg.get("args") or []), touched))
        except (OSError, ValueError) as e:  # a broken pipe or a garbled line: the worker is not trusted again
            if w is not None:
                self._drop(w)
                w = None
            return ExecResult("", f"the snippet's worker failed: {type(e).__name__}", list(touched), calls,
                              time.monotonic() - t0)
        finally:
            if w is not None:
                self._idle.put(w)
