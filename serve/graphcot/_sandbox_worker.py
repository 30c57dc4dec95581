"""The sandbox worker process: compiles and runs A-Agent snippets with RestrictedPython.

Runs as `python -m jaxsys.serve.graphcot._sandbox_worker` and imports nothing but the standard
library and RestrictedPython (never jax, never the graph). It talks to its parent over stdin/stdout,
one JSON object per line:

    parent -> worker  {"code": str, "time_limit": float, "max_output": int}
    worker -> parent  {"call": name, "args": [...]}          a graph function call
    parent -> worker  {"ok": value} | {"error": message}      its answer
    worker -> parent  {"done": true, "output": str, "error": str | null}

The snippet sees only the graph functions (stubs that ask the parent), `print` (into a capped
buffer) and a few pure builtins. The policy on top of RestrictedPython's transformer also refuses
every statement outside literals, arithmetic, comparisons, assignments, if/for and calls: no
while, def, lambda, class, try, with, import, global, raise, del, yield. RestrictedPython itself
refuses names and attributes that start with an underscore (so no `__class__` walks to `object`),
and `open`, `eval`, `exec`, `getattr`, `type`, `__import__` are simply not there. A time limit
(SIGALRM in here, a hard kill by the parent after a grace period) and an address-space limit stop
loops and memory bombs.
"""

from __future__ import annotations

import ast
import json
import signal
import sys

GRAPH_FUNCTIONS = ("RetrieveNode", "NodeFeature", "NodeDegree", "NeighbourCheck")
ALIASES = {"NeighborCheck": "NeighbourCheck"}
MEMORY_LIMIT_BYTES = 1 << 30
SAFE_BUILTINS = ("len", "range", "sorted", "min", "max", "sum", "set", "list", "dict", "tuple", "str", "int", "float",
                 "bool", "abs", "round", "enumerate", "zip", "any", "all", "reversed")


class SnippetError(Exception):
    """An error the agent reads: time or output limit, a graph function's error."""


class _TimeLimit(BaseException):  # BaseException: nothing in a snippet can swallow it anyway
    pass


def _policy():
    from RestrictedPython.transformer import RestrictingNodeTransformer

    refused = ("While", "FunctionDef", "AsyncFunctionDef", "Lambda", "ClassDef", "Try", "TryStar", "With",
               "AsyncWith", "AsyncFor", "Import", "ImportFrom", "Global", "Nonlocal", "Raise", "Assert", "Delete",
               "Yield", "YieldFrom", "Await", "Return", "NamedExpr")

    def refuse(self, node):
        self.error(node, f"{type(node).__name__} is not allowed here: use only graph functions, literals, "
                         f"arithmetic, comparisons, if/for and print")

    return type("GraphSnippetPolicy", (RestrictingNodeTransformer,), {f"visit_{n}": refuse for n in refused})


class _Printer:
    """`print` of a snippet: text into a buffer that refuses to grow past `limit` characters."""

    def __init__(self, limit: int):
        self.parts: list[str] = []
        self.size = 0
        self.limit = limit

    def __call__(self, _getattr_=None):  # RestrictedPython calls _print_(_getattr_) per scope
        return self

    def _call_print(self, *objects, sep=" ", end="\n", file=None, flush=False):
        if file is not None:
            raise SnippetError("print(file=...) is not allowed")
        text = str(sep).join(str(o) for o in objects) + str(end)
        self.size += len(text)
        if self.size > self.limit:
            raise SnippetError(f"output limit exceeded: a snippet may print at most {self.limit} characters")
        self.parts.append(text)

    def text(self) -> str:
        return "".join(self.parts)


def _restricted_globals(call, printer: _Printer) -> dict:
    from RestrictedPython.Guards import (full_write_guard, guarded_iter_unpack_sequence, guarded_unpack_sequence,
                                         safer_getattr)

    def inplace(op, x, y):
        ops = {"+=": lambda: x + y, "-=": lambda: x - y, "*=": lambda: x * y, "/=": lambda: x / y,
               "//=": lambda: x // y, "%=": lambda: x % y}
        if op not in ops:
            raise SnippetError(f"operator {op} is not allowed")
        return ops[op]()

    import builtins as python_builtins

    builtins = {name: getattr(python_builtins, name) for name in SAFE_BUILTINS}
    env = {"__builtins__": builtins, "_print_": printer, "_getattr_": safer_getattr,
           "_getitem_": lambda obj, key: obj[key], "_getiter_": iter, "_write_": full_write_guard,
           "_inplacevar_": inplace, "_unpack_sequence_": guarded_unpack_sequence,
           "_iter_unpack_sequence_": guarded_iter_unpack_sequence}
    for name in GRAPH_FUNCTIONS:
        env[name] = (lambda n: lambda *args: call(n, args))(name)
    for alias, name in ALIASES.items():
        env[alias] = env[name]
    return env


def compile_snippet(code: str):
    """(code object, None) or (None, the reasons it is refused)."""
    from RestrictedPython import compile_restricted_exec

    try:
        ast.parse(code)
    except SyntaxError as e:
        return None, f"SyntaxError: {e.msg} (line {e.lineno})"
    result = compile_restricted_exec(code, filename="<snippet>", policy=_policy())
    if result.errors:
        return None, "refused: " + "; ".join(result.errors)
    return result.code, None


def _run(request: dict, send, receive) -> dict:
    printer = _Printer(int(request.get("max_output", 4000)))

    def call(name, args):
        # the clock stops while the parent answers (the parent's own deadline still counts it), so
        # the alarm never fires between a call and its answer and the pipe stays in step
        remaining, _ = signal.setitimer(signal.ITIMER_REAL, 0)
        send({"call": name, "args": [a if isinstance(a, (str, int, float, bool)) or a is None else str(a)
                                     for a in args]})
        reply = receive()
        signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-3))
        if "error" in reply:
            raise SnippetError(reply["error"])
        return reply["ok"]

    code, error = compile_snippet(str(request.get("code", "")))
    if code is None:
        return {"done": True, "output": "", "error": error}

    def alarm(_signum, _frame):
        raise _TimeLimit()

    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, float(request.get("time_limit", 5.0)))
    try:
        exec(code, _restricted_globals(call, printer))
        error = None
    except _TimeLimit:
        error = f"time limit exceeded: the snippet ran longer than {request.get('time_limit')} s"
    except SnippetError as e:
        error = str(e)
    except MemoryError:
        error = "memory limit exceeded"
    except RecursionError:
        error = "recursion limit exceeded"
    except Exception as e:  # noqa: BLE001 - the snippet's own errors go back to the agent
        error = f"{type(e).__name__}: {e}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return {"done": True, "output": printer.text(), "error": error}


def main() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    stdin, stdout = sys.stdin, sys.stdout
    sys.stdout = sys.stderr  # nothing but the protocol goes to the parent

    def send(obj):
        stdout.write(json.dumps(obj) + "\n")
        stdout.flush()

    def receive():
        line = stdin.readline()
        if not line:
            raise SystemExit(0)
        return json.loads(line)

    import RestrictedPython  # noqa: F401 - import before the first request, not inside its time limit

    send({"ready": True})
    while True:
        request = receive()
        if "code" in request:
            send(_run(request, send, receive))


if __name__ == "__main__":
    main()
