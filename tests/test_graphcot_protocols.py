"""The protocols' parsers and state machines (scripted model outputs), the prompt layout, and the
oracle: on every generated question both protocols, played by the oracle through the real graph
functions and the real sandbox, reach the gold answer."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("RestrictedPython")

from graphcot_helpers import small_graph  # noqa: E402

from jaxsys.serve.graphcot import prompts  # noqa: E402
from jaxsys.serve.graphcot.graph import render_vertex  # noqa: E402
from jaxsys.serve.graphcot.metrics import exact_match  # noqa: E402
from jaxsys.serve.graphcot.oracle import Oracle, run_oracle, write_traces  # noqa: E402
from jaxsys.serve.graphcot.protocols import (GraphCall, LLMCall, drive, extract_code, format_step,  # noqa: E402
                                             get_action_list, glm_protocol, graph_handler, graphcot_protocol,
                                             parse_action, parse_classification, parse_reasoning)
from jaxsys.serve.graphcot.questions import generate_questions, split  # noqa: E402
from jaxsys.serve.graphcot.sandbox import Sandbox  # noqa: E402


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    return small_graph(tmp_path_factory.mktemp("g"))


@pytest.fixture(scope="module")
def sandbox(graph):
    with Sandbox(graph) as sb:
        yield sb


# ------------------------------------------------------------------------------ parsers

def test_graphcot_parsers():
    assert format_step("  Action 3: RetrieveNode[Emma]\nObservation 3: x") == "RetrieveNode[Emma]"
    assert format_step("\n\n") == ""
    assert get_action_list("NodeFeature[a, name], NodeFeature[b, name]") == ["NodeFeature[a, name]",
                                                                              "NodeFeature[b, name]"]
    assert get_action_list("Finish[Coq De Combat, Tome 3 [Shamo]]") == ["Finish[Coq De Combat, Tome 3 [Shamo]]"]
    assert parse_action("Finish[Coq De Combat, Tome 3 [Shamo]]") == ("Finish", "Coq De Combat, Tome 3 [Shamo]")
    assert parse_action("RetrieveNode Emma") is None and parse_action("[x]") is None


def test_glm_parsers():
    assert parse_classification("Class: non-deterministic") is False
    assert parse_classification("Non deterministic.") is False
    assert parse_classification(" deterministic") is True
    assert parse_classification("I think it is hard") is None
    assert parse_reasoning("Well.\nAnswer: Jane Austen") == ("answer", "Jane Austen")
    assert parse_reasoning("missing : the book node") == ("missing", "the book node")
    assert parse_reasoning("The answer is: Jane Austen") == ("answer", "Jane Austen")
    assert parse_reasoning("The answer is 4") is None
    assert extract_code("Here:\n```python\nprint(1)\n```\nDone.") == "print(1)"
    assert extract_code("```\nprint(2)") == "print(2)"
    assert extract_code("\nprint(3)\n") == "print(3)"


# ------------------------------------------------------------------------------ state machines

def scripted(replies):
    it = iter(replies)
    seen = []

    def on_llm(call: LLMCall) -> str:
        seen.append(call)
        return next(it)

    return on_llm, seen


def test_graphcot_protocol_with_malformed_outputs(graph):
    on_llm, seen = scripted([
        "I should look.", "", "ok", "RetrieveNode Emma", "look", "RetrieveNode[Emma]",
        "then", "NodeFeature[book-9]", "then", "Frobnicate[x]", "then", "NeighbourCheck[book-9, author]",
        "done", "Finish['Jane Austen']"])
    out = drive(graphcot_protocol("Who wrote Emma?", graph.definition()), on_llm, graph_handler(graph),
                lambda ex: pytest.fail("Graph-CoT never executes code"))
    assert out.answer == "Jane Austen" and out.finished and out.steps == 7
    assert out.parse_failures == 4  # empty action, no brackets, one argument, unknown action
    last = seen[-1].segments[-1].text
    assert "Observation 1: You action is filtered" in last
    assert "Observation 2: Invalid Action." in last
    assert "Observation 3: The ID of this retrieval target node is book-9." in last
    assert "Make sure that NodeFeature take two value as input" in last
    assert "Observation 6: The author neighbors of book-9 are: ['author-3']. " in last
    assert all(c.stop == ("\n",) for c in seen)


def test_graphcot_step_limit(graph):
    on_llm, seen = scripted(["hmm"] * 100)
    out = drive(graphcot_protocol("Who wrote Emma?", graph.definition(), max_steps=4), on_llm,
                graph_handler(graph), lambda ex: None)
    assert not out.finished and out.answer == "" and len(seen) == 8 and out.parse_failures == 4


def test_glm_protocol_with_garbage_stops_after_max_iters(graph, sandbox):
    on_llm, seen = scripted(["banana"] * 100)
    out = drive(glm_protocol("Who wrote Emma?", graph.definition(), lambda v: render_vertex(graph, v),
                             max_iters=3), on_llm, graph_handler(graph), lambda ex: sandbox.run(ex.code))
    assert not out.finished and out.answer == ""
    assert [c.agent for c in seen] == ["c", "r"] + ["a", "r"] * 3
    assert out.parse_failures == 1 + 1 + 3 * 2  # class, first R, then each round's code error and R reply


def test_glm_protocol_deterministic_path(graph, sandbox):
    code = 'b = RetrieveNode("Emma")\nprint(NodeFeature(NeighbourCheck(b, "author")[0], "name"))'
    on_llm, seen = scripted(["deterministic", f"```python\n{code}\n```", "Answer: Jane Austen"])
    out = drive(glm_protocol("Who wrote Emma?", graph.definition(), lambda v: render_vertex(graph, v)), on_llm,
                graph_handler(graph), lambda ex: sandbox.run(ex.code))
    assert out.answer == "Jane Austen" and out.parse_failures == 0 and [c.agent for c in seen] == ["c", "a", "r"]
    r_prompt = "".join(s.text for s in seen[-1].segments)
    assert "- Who wrote Emma? -> Jane Austen" in r_prompt
    assert render_vertex(graph, "book-9") in r_prompt and render_vertex(graph, "author-3") in r_prompt


# ------------------------------------------------------------------------------ prompt layout

def test_sharing_layout(graph):
    system = prompts.glm_system(graph.definition())
    facts = {v: render_vertex(graph, v) for v in ("book-9", "author-3", "book-1")}
    on = prompts.r_prompt(system, "Q1?", facts, [], sharing=True)
    assert [s.kind for s in on] == ["system", "template", "template", "vertex", "vertex", "vertex", "question",
                                    "private"]
    assert [s.vertex for s in on if s.kind == "vertex"] == ["author-3", "book-1", "book-9"]
    other = prompts.r_prompt(system, "Q2?", dict(reversed(facts.items())), [], sharing=True)
    assert on[:6] == other[:6]  # another question over the same vertices: same prefix up to the question
    off = prompts.r_prompt(system, "Q1?", facts, [], sharing=False)
    assert [s.kind for s in off] == ["system", "template", "question", "private"]
    assert off[-1].text.index("book-9 (book)") < off[-1].text.index("author-3 (author)")  # discovery order
    msgs = prompts.messages(on)
    assert [m["role"] for m in msgs] == ["system", "user"] and msgs[1]["content"].endswith("Reply:")


# ------------------------------------------------------------------------------ oracle

def test_oracle_answers_every_small_question(graph, sandbox, tmp_path):
    qs = generate_questions(graph, per_template=4, seed=0)
    assert len(qs) >= 20
    for q in qs:
        for system in ("graphcot", "glm"):
            out, calls = run_oracle(system, graph, q, sandbox=sandbox)
            assert exact_match(out.answer, q["answer"]), (system, q, out)
            assert out.parse_failures == 0 and out.finished
    path = tmp_path / "traces.jsonl"
    correct = write_traces(path, graph, qs[:6], sandbox=sandbox)
    assert correct == {"graphcot": 6, "glm": 6}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["system"] for r in rows} == {"graphcot", "glm"}
    glm_first = next(r for r in rows if r["system"] == "glm")
    assert glm_first["agent"] == "c" and glm_first["messages"][0]["role"] == "system"
    assert any(r["agent"] == "a" and "RetrieveNode(" in r["completion"] for r in rows)
    assert any(r["agent"] == "graphcot-action" and r["completion"].startswith("Finish[") for r in rows)


def test_oracle_answers_the_goodbooks_train_split(shared_data):
    from jaxsys.serve.graphcot.goodbooks import build_goodbooks

    graph = build_goodbooks(shared_data / "glm" / "goodbooks-10k" / "books.csv")
    train = split(generate_questions(graph, per_template=20, seed=0), "train")
    with Sandbox(graph) as sb:
        for q in train:
            plan = Oracle(graph, q).plan
            assert len(plan) <= 10 and max(len(action) for _, action in plan) < 600  # fits Graph-CoT's limits
            for system in ("graphcot", "glm"):
                out, _ = run_oracle(system, graph, q, sandbox=sb)
                assert exact_match(out.answer, q["answer"]) and out.parse_failures == 0, (system, q, out)


def test_graph_calls_report_errors(graph):
    handle = graph_handler(graph)
    assert handle(GraphCall("NodeDegree", ("author-3", "book"))).value == 3
    assert "does not exist" in handle(GraphCall("NodeDegree", ("nope", "book"))).error
