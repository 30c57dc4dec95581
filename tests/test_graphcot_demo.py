"""The GLM section of `make demo` (`jaxsys.serve.graphcot.demo`) on a tiny configuration: the same
comparison code, limits and engine set-up, with a tiny random model over SmolLM2's tokenizer and a
12-book graph (its text is noise: no question is answered, every call runs to its limit)."""

from __future__ import annotations

import pytest

pytest.importorskip("bm25s")
pytest.importorskip("RestrictedPython")

from graphcot_helpers import small_graph, tiny_text_model  # noqa: E402


def test_demo_questions_are_fixed_and_answerable_within_the_limits(tmp_path):
    from jaxsys.serve.graphcot.demo import DEMO_TEMPLATES, demo_questions
    from jaxsys.serve.graphcot.questions import generate_questions, split

    graph = small_graph(tmp_path)
    questions = demo_questions(graph)
    assert questions == demo_questions(graph)
    assert [q["template"] for q in questions] == list(DEMO_TEMPLATES)
    test = split(generate_questions(graph, per_template=40, seed=0), "test")
    for q in questions:
        assert q == next(t for t in test if t["template"] == q["template"])


@pytest.mark.slow  # 37 s of CPU (95 s wall at load 13): the tiny model still compiles 11 programs, 20 calls
def test_demo_comparison_runs_both_systems_on_one_engine(tmp_path):
    from jaxsys.serve.graphcot.demo import DEMO_LIMITS, demo_questions, run_comparison

    graph = small_graph(tmp_path)
    questions = demo_questions(graph)
    lines: list[str] = []
    result = run_comparison(tiny_text_model(), graph, questions, out=lines.append)
    text = "\n".join(lines)
    assert result["ok"]
    for k, q in enumerate(questions, 1):
        assert f"Q{k} ({q['difficulty']}): {q['question']}   gold: {q['answer']}" in text
    assert sum(line.lstrip().startswith("GLM ") for line in lines) == len(questions)
    assert sum(line.lstrip().startswith("Graph-CoT ") for line in lines) == len(questions)
    glm, graphcot = result["glm"], result["graphcot"]
    # noise never finishes: Graph-CoT runs every step (a Thought and an Action call each); GLM's
    # C-Agent gives no class, so the R-Agent asks, the A-Agent writes one snippet, the R-Agent reads
    assert graphcot["llm_calls"] == 2 * DEMO_LIMITS["max_steps"]
    assert glm["llm_calls"] == 4
    for means in (glm, graphcot):
        assert 0 < means["cached_tokens"] < means["prompt_tokens"]  # prefixes shared within a system
        assert 0 < means["generated_tokens"] and 0 < means["latency_s"] < result["seconds"]
        assert means["accuracy"] == 0.0
    assert glm["compiles"] > 0  # the engine is new: GLM's first calls compile its programs
    row = next(line for line in lines if line.strip().startswith("LLM calls"))
    assert row.split()[-3:] == [f"{glm['llm_calls']:.1f}", f"{graphcot['llm_calls']:.1f}",
                                f"{glm['llm_calls'] / graphcot['llm_calls']:.2f}x"]
