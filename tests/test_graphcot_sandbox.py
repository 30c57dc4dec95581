"""The A-Agent sandbox: RestrictedPython in a worker process, graph functions answered by the parent.

Hostile snippets (imports, dunder escapes, `open`, loops that never end, huge outputs, memory
bombs, a C-level loop that ignores signals) are each refused at compile time or stopped, and the
sandbox keeps serving afterwards. A sentinel file shows that no refused snippet ran anything."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("RestrictedPython")

from graphcot_helpers import small_graph  # noqa: E402

from jaxsys.serve.graphcot.sandbox import Sandbox  # noqa: E402

GOOD = """
b = RetrieveNode("Emma")
names = []
for a in NeighbourCheck(b, "author"):
    names.append(NodeFeature(a, "name"))
print(", ".join(names), NodeDegree(names and NeighbourCheck(b, "author")[0], "book"))
"""


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    graph = small_graph(tmp_path_factory.mktemp("graph"))
    with Sandbox(graph, time_limit=1.0, max_output=2000, grace=1.0) as sb:
        yield sb


def test_graph_functions_run(sandbox):
    r = sandbox.run(GOOD)
    assert r.ok, r.error
    assert r.output == "Jane Austen 3\n"
    assert r.touched == ["book-9", "author-3"] and r.calls == 5


def test_graph_errors_reach_the_agent(sandbox):
    r = sandbox.run('print(NodeFeature("book-1", "genre"))')
    assert r.error.startswith("NodeFeature: book node 'book-1' has no feature 'genre'; its features are: title")
    r = sandbox.run('print(NeighbourCheck("book-404", "author"))')
    assert "node 'book-404' does not exist" in r.error
    r = sandbox.run('print(RetrieveNode("zzqxv"))')
    assert r.error == "RetrieveNode: nothing in the graph matches 'zzqxv'"
    r = sandbox.run('print(NodeDegree("book-1"))')
    assert r.error == "NodeDegree takes 2 arguments, got 1"


@pytest.mark.parametrize("code, refused", [
    ("import os\nos.system('touch {sentinel}')", "Import is not allowed"),
    ("from os import system\nsystem('touch {sentinel}')", "ImportFrom is not allowed"),
    ("__import__('os').system('touch {sentinel}')", '"__import__" is an invalid variable name'),
    ("print(().__class__.__bases__[0].__subclasses__())", '"__class__" is an invalid attribute name'),
    ("x = [c for c in ().__class__.__mro__]", '"__class__" is an invalid attribute name'),
    ("f = lambda: 0\nprint(f.__globals__)", "Lambda is not allowed"),
    ("def f():\n    return 1", "FunctionDef is not allowed"),
    ("class A:\n    pass", "ClassDef is not allowed"),
    ("while True:\n    pass", "While is not allowed"),
    ("try:\n    x = 1\nexcept Exception:\n    pass", "Try is not allowed"),
    ("with open('{sentinel}', 'w') as f:\n    pass", "With is not allowed"),
    ("global x\nx = 1", "Global is not allowed"),
])
def test_hostile_snippets_are_refused(sandbox, tmp_path, code, refused):
    sentinel = tmp_path / "ran"
    r = sandbox.run(code.format(sentinel=sentinel))
    assert r.error.startswith("refused: ") and refused in r.error, r.error
    assert r.calls == 0 and r.output == ""
    assert not sentinel.exists()


@pytest.mark.parametrize("code, error", [
    ("open('{sentinel}', 'w').write('x')", "NameError: name 'open' is not defined"),
    ("print(getattr(1, 'real'))", "NameError: name 'getattr' is not defined"),
    ("eval('1')", "Eval calls are not allowed"),
    ("exec('x = 1')", "Exec calls are not allowed"),
    ("print(type(1))", "NameError: name 'type' is not defined"),
    ("print('{{0.__class__}}'.format(1))", "format*() methods of `str` is not safe"),
    ("print(1, file=None)\nprint(2, file='{sentinel}')", "print(file=...) is not allowed"),
])
def test_hostile_calls_fail_without_effect(sandbox, tmp_path, code, error):
    sentinel = tmp_path / "ran"
    r = sandbox.run(code.format(sentinel=sentinel))
    assert error in r.error, r.error
    assert not sentinel.exists()


@pytest.mark.parametrize("code", [
    "x = 0\nfor i in range(10**12):\n    x += 1",
    "for i in range(10**12):\n    n = RetrieveNode('Emma')",
    "x = sum(range(10**14))",  # one C call: SIGALRM waits for it, the parent's kill does not
])
def test_endless_loops_are_stopped(sandbox, code):
    t0 = time.monotonic()
    r = sandbox.run(code)
    assert "time limit exceeded" in r.error, r.error
    assert time.monotonic() - t0 < sandbox.time_limit + sandbox.grace + 1.0
    assert sandbox.run("print(1 + 1)").output == "2\n"  # a fresh or the same worker serves again


def test_huge_output_and_memory_are_stopped(sandbox):
    r = sandbox.run("for i in range(10**9):\n    print('spam' * 100)")
    assert r.error.startswith("output limit exceeded") and len(r.output) <= sandbox.max_output
    r = sandbox.run("x = 'a' * (10**10)")
    assert r.error == "memory limit exceeded"
    r = sandbox.run("x = [0] * (10**9)")
    assert r.error == "memory limit exceeded"
    assert sandbox.run(GOOD).output == "Jane Austen 3\n"


def test_concurrent_runs(sandbox):
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(sandbox.run, [GOOD] * 8))
    assert all(o.output == "Jane Austen 3\n" for o in outs)
