"""The oracle: follows each protocol exactly, as a perfect model would, and writes training traces.

For a generated question (its `template` and `params`) the oracle knows the right moves:

- Graph-CoT: a plan of (Thought, Action) steps in Graph-CoT's syntax. The plan is built by walking
  the graph with the same four functions the protocol calls; the Finish answer is computed from
  what those calls returned, not copied from the gold answer.
- GLM: the C-Agent's class (easy templates are one lookup: deterministic), the R-Agent's request
  for what is missing, the A-Agent's code for the template, and the R-Agent's answer read off the
  notebook, i.e. off what the sandbox printed when it ran that code.

`Oracle.respond` answers the protocol's `LLMCall`s, so the protocols run unchanged and every prompt
in a trace is byte for byte the prompt the model sees at inference. `write_traces` runs the oracle
over questions (the train split, for fine-tuning: part D of the issue) and writes one JSON line per
LLM call: `{"system", "qid", "agent", "messages", "completion"}`, chat messages ready for SFT.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

from jaxsys.serve.graphcot import prompts
from jaxsys.serve.graphcot.graph import Graph, render_vertex
from jaxsys.serve.graphcot.protocols import (LLMCall, ProtocolOutcome, drive, glm_protocol, graph_handler,
                                             graphcot_protocol)

_NEEDS = {
    "authors": "the names of the authors of the book {book_title}",
    "series": "the title of the series of the book {book_title}",
    "year": "the publication year of the book {book_title}",
    "language": "the language code of the book {book_title}",
    "rating": "the average rating of the book {book_title}",
    "author_count": "the number of books of the author {author_name}",
    "series_count": "the number of books in the series {series_title}",
    "earliest": "the title of the earliest book by the author of the book {book_title}",
    "other_series": "the titles of the other series of the author of the book {book_title}",
    "same_author_language": "the titles of the books by the same author in the same language as {book_title}",
    "common_language": "the most common language code of the books of {author_name}",
    "top_rated": "the title of the book by {author_name} with the highest average rating",
    "series_most_ratings": "the title of the book in the series {series_title} with the most ratings",
}

_CODE = {
    "authors": '''book = RetrieveNode({book_title!r})
names = []
for a in NeighbourCheck(book, "author"):
    names.append(NodeFeature(a, "name"))
print(", ".join(names))''',
    "series": '''book = RetrieveNode({book_title!r})
print(NodeFeature(NeighbourCheck(book, "series")[0], "title"))''',
    "year": '''print(NodeFeature(RetrieveNode({book_title!r}), "publication_year"))''',
    "language": '''print(NodeFeature(RetrieveNode({book_title!r}), "language_code"))''',
    "rating": '''print(NodeFeature(RetrieveNode({book_title!r}), "average_rating"))''',
    "author_count": '''print(NodeDegree(RetrieveNode({author_name!r}), "book"))''',
    "series_count": '''print(NodeDegree(RetrieveNode({series_title!r}), "book"))''',
    "earliest": '''book = RetrieveNode({book_title!r})
author = NeighbourCheck(book, "author")[0]
best = None
best_year = 0
for b in NeighbourCheck(author, "book"):
    year = NodeFeature(b, "publication_year")
    if year != "" and (best is None or int(year) < best_year):
        best = b
        best_year = int(year)
print(NodeFeature(best, "title"))''',
    "other_series": '''book = RetrieveNode({book_title!r})
own = NeighbourCheck(book, "series")
found = []
for a in NeighbourCheck(book, "author"):
    for b in NeighbourCheck(a, "book"):
        for s in NeighbourCheck(b, "series"):
            if s not in own and s not in found:
                found.append(s)
print(", ".join(sorted([NodeFeature(s, "title") for s in found])))''',
    "same_author_language": '''book = RetrieveNode({book_title!r})
language = NodeFeature(book, "language_code")
titles = []
for a in NeighbourCheck(book, "author"):
    for b in NeighbourCheck(a, "book"):
        if b != book and NodeFeature(b, "language_code") == language:
            title = NodeFeature(b, "title")
            if title not in titles:
                titles.append(title)
print(", ".join(sorted(titles)))''',
    "common_language": '''author = RetrieveNode({author_name!r})
counts = {{}}
for b in NeighbourCheck(author, "book"):
    language = NodeFeature(b, "language_code")
    if language != "":
        counts[language] = counts.get(language, 0) + 1
best = None
for language in counts:
    if best is None or counts[language] > counts[best]:
        best = language
print(best)''',
    "top_rated": '''author = RetrieveNode({author_name!r})
best = None
best_rating = -1.0
for b in NeighbourCheck(author, "book"):
    rating = float(NodeFeature(b, "average_rating"))
    if rating > best_rating:
        best = b
        best_rating = rating
print(NodeFeature(best, "title"))''',
    "series_most_ratings": '''series = RetrieveNode({series_title!r})
best = None
most = -1
for b in NeighbourCheck(series, "book"):
    count = int(NodeFeature(b, "ratings_count"))
    if count > most:
        best = b
        most = count
print(NodeFeature(best, "title"))''',
}


MAX_CALLS_PER_STEP = 12


class OracleError(ValueError):
    pass


class _Plan:
    """Graph-CoT steps written while walking the graph: each `step` is one Thought and one Action
    line (possibly several calls, as Graph-CoT allows); the calls run on the real graph."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.steps: list[tuple[str, str]] = []

    def step(self, thought: str, calls: list[tuple[str, tuple[str, ...]]]) -> list[Any]:
        """Steps of at most MAX_CALLS_PER_STEP calls, so every Action line fits one call's tokens."""
        fns = {"RetrieveNode": self.graph.retrieve_node, "NodeFeature": self.graph.node_feature,
               "NodeDegree": self.graph.node_degree, "NeighbourCheck": self.graph.neighbour_check}
        for i in range(0, len(calls), MAX_CALLS_PER_STEP):
            chunk = calls[i:i + MAX_CALLS_PER_STEP]
            self.steps.append((thought, ", ".join(f"{fn}[{', '.join(args)}]" for fn, args in chunk)))
        return [fns[fn](*args) for fn, args in calls]

    def finish(self, answer: str) -> None:
        self.steps.append((f"The answer is {answer}.", f"Finish[{answer}]"))


def graphcot_plan(graph: Graph, template: str, params: dict[str, str]) -> list[tuple[str, str]]:
    p = _Plan(graph)
    g = graph

    def find(kind: str, text: str) -> str:
        return p.step(f"The question is about the {kind} {text}. We need to find its node in the graph.",
                      [("RetrieveNode", (text,))])[0]

    def feature_each(ids: list[str], feature: str) -> list[Any]:
        return p.step(f"We need the {feature} feature of each of these nodes.",
                      [("NodeFeature", (i, feature)) for i in ids]) if ids else []

    def neighbours_each(ids: list[str], rel: str) -> list[list[str]]:
        return p.step(f"We need the {rel} neighbors of these nodes.",
                      [("NeighbourCheck", (i, rel)) for i in ids]) if ids else []

    if template in ("authors", "series", "year", "language", "rating", "earliest", "other_series",
                    "same_author_language"):
        book = find("book", params["book_title"])
    if template == "authors":
        [authors] = neighbours_each([book], "author")
        p.finish(", ".join(str(n) for n in feature_each(authors, "name")))
    elif template == "series":
        [series] = neighbours_each([book], "series")
        p.finish(str(feature_each(series[:1], "title")[0]))
    elif template in ("year", "language", "rating"):
        feature = {"year": "publication_year", "language": "language_code", "rating": "average_rating"}[template]
        p.finish(str(feature_each([book], feature)[0]))
    elif template in ("author_count", "series_count"):
        kind, key = ("author", "author_name") if template == "author_count" else ("series", "series_title")
        node = find(kind, params[key])
        [n] = p.step(f"We need the number of book neighbors of the {kind} node.", [("NodeDegree", (node, "book"))])
        p.finish(str(n))
    elif template == "earliest":
        [authors] = neighbours_each([book], "author")
        [books] = neighbours_each(authors[:1], "book")
        years = feature_each(books, "publication_year")
        dated = [(int(y), b) for y, b in zip(years, books) if str(y).lstrip("-").isdigit()]
        best = min(dated)[1]
        p.finish(str(feature_each([best], "title")[0]))
    elif template == "other_series":
        [own] = neighbours_each([book], "series")
        [authors] = neighbours_each([book], "author")
        books = list(dict.fromkeys(b for bs in neighbours_each(authors, "book") for b in bs))
        found = list(dict.fromkeys(s for ss in neighbours_each(books, "series") for s in ss if s not in own))
        p.finish(", ".join(sorted(str(t) for t in feature_each(found, "title"))))
    elif template == "same_author_language":
        [language] = feature_each([book], "language_code")
        [authors] = neighbours_each([book], "author")
        books = [b for b in dict.fromkeys(b for bs in neighbours_each(authors, "book") for b in bs) if b != book]
        same = [b for b, lang in zip(books, feature_each(books, "language_code")) if lang == language]
        p.finish(", ".join(sorted(set(str(t) for t in feature_each(same, "title")))))
    elif template in ("common_language", "top_rated", "series_most_ratings"):
        kind, key = ("series", "series_title") if template == "series_most_ratings" else ("author", "author_name")
        node = find(kind, params[key])
        [books] = neighbours_each([node], "book")
        if template == "common_language":
            counts: dict[str, int] = {}
            for lang in feature_each(books, "language_code"):
                if lang:
                    counts[lang] = counts.get(lang, 0) + 1
            p.finish(max(counts, key=lambda k: counts[k]))
        else:
            feature, cast = ("average_rating", float) if template == "top_rated" else ("ratings_count", int)
            values = [cast(v) for v in feature_each(books, feature)]
            best = books[values.index(max(values))]
            p.finish(str(feature_each([best], "title")[0]))
    else:
        raise OracleError(f"the oracle has no plan for template {template!r}")
    return p.steps


class Oracle:
    """Answers one question's `LLMCall`s perfectly (see the module docstring)."""

    def __init__(self, graph: Graph, question: dict[str, Any]):
        template = question.get("template")
        if template not in _CODE:
            raise OracleError(f"question {question.get('qid')!r} has no known template ({template!r}); the oracle "
                              f"follows generated questions only")
        self.question = question
        self.params = question["params"]
        self.template = template
        self.deterministic = question["difficulty"] == "easy"
        self.plan = graphcot_plan(graph, template, self.params)

    @property
    def code(self) -> str:
        return _CODE[self.template].format(**self.params)

    @property
    def need(self) -> str:
        return _NEEDS[self.template].format(**self.params)

    def respond(self, call: LLMCall) -> str:
        if call.agent in ("graphcot-thought", "graphcot-action"):
            step = call.notes["step"]
            if step > len(self.plan):
                raise OracleError(f"Graph-CoT asked for step {step}; the plan has {len(self.plan)}")
            thought, action = self.plan[step - 1]
            return thought if call.agent == "graphcot-thought" else action
        if call.agent == "c":
            return "deterministic" if self.deterministic else "non-deterministic"
        if call.agent == "a":
            return self.code
        if call.agent == "r":
            notebook = call.notes["notebook"]
            if not notebook or notebook[-1].error is not None:
                return f"Missing: {self.need}"
            return "Answer: " + notebook[-1].output.strip().splitlines()[0] if notebook[-1].output.strip() \
                else f"Missing: {self.need}"
        raise OracleError(f"unknown agent {call.agent!r}")


def run_oracle(system: str, graph: Graph, question: dict[str, Any], *, sandbox=None, sharing: bool = True,
               max_steps: int = 10) -> tuple[ProtocolOutcome, list[tuple[LLMCall, str]]]:
    """Run one protocol with the oracle as the model: (outcome, [(call, completion)])."""
    oracle = Oracle(graph, question)
    calls: list[tuple[LLMCall, str]] = []

    def on_llm(call: LLMCall) -> str:
        text = oracle.respond(call)
        calls.append((call, text))
        return text

    if system == "graphcot":
        protocol = graphcot_protocol(question["question"], graph.definition(), max_steps=max_steps)
    elif system == "glm":
        if sandbox is None:
            raise ValueError("the GLM oracle runs its code in a sandbox: pass sandbox=")
        protocol = glm_protocol(question["question"], graph.definition(), lambda v: render_vertex(graph, v),
                                sharing=sharing)
    else:
        raise ValueError(f"unknown system {system!r}")
    outcome = drive(protocol, on_llm, graph_handler(graph), lambda ex: sandbox.run(ex.code))
    return outcome, calls


def write_traces(path: str | os.PathLike, graph: Graph, questions: Iterable[dict[str, Any]], *, systems=("graphcot", "glm"),
                 sandbox=None, progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Oracle traces of every question for each system, one JSON line per LLM call. Returns the
    number of questions the oracle answered correctly per system (all, unless the graph changed)."""
    from jaxsys.serve.graphcot.metrics import exact_match

    correct = {s: 0 for s in systems}
    with open(path, "w", encoding="utf-8") as f:
        for n, q in enumerate(questions):
            for system in systems:
                outcome, calls = run_oracle(system, graph, q, sandbox=sandbox)
                correct[system] += exact_match(outcome.answer, q["answer"])
                for call, completion in calls:
                    f.write(json.dumps({"system": system, "qid": q["qid"], "agent": call.agent,
                                        "messages": prompts.messages(call.segments), "completion": completion},
                                       ensure_ascii=False) + "\n")
            if progress is not None:
                progress(n + 1)
    return correct
