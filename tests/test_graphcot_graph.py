"""Part A of GLM: the GRBench graph schema and loader, the goodbooks builder, the graph functions
(BM25 RetrieveNode), the question generator and the answer metrics."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("bm25s")

from graphcot_helpers import small_graph  # noqa: E402

from jaxsys.serve.graphcot.goodbooks import build_goodbooks, parse_series  # noqa: E402
from jaxsys.serve.graphcot.graph import (Graph, GraphSchemaError, UnknownFeatureError,  # noqa: E402
                                         UnknownNeighborTypeError, UnknownNodeError, render_vertex)
from jaxsys.serve.graphcot.metrics import exact_match, normalize_answer, rouge_l  # noqa: E402
from jaxsys.serve.graphcot.questions import (TEMPLATES, QuestionFileError, generate_questions,  # noqa: E402
                                             load_questions, spread, write_questions)

DBLP_LIKE = {
    "paper_nodes": {"p1": {"features": {"title": "Attention is all you need", "year": 2017},
                           "neighbors": {"author": ["a1", "a2"], "venue": ["v1"]}},
                    "p2": {"features": {"title": "Graph chain of thought", "year": 2024},
                           "neighbors": {"author": ["a2"], "venue": []}}},
    "author_nodes": {"a1": {"features": {"name": "Ashish Vaswani"}, "neighbors": {"paper": ["p1"]}},
                     "a2": {"features": {"name": "Noam Shazeer"}, "neighbors": {"paper": ["p1", "p2"]}}},
    "venue_nodes": {"v1": {"features": {"name": "NeurIPS"}, "neighbors": {"paper": ["p1"]}}},
}


# ------------------------------------------------------------------------------ schema and loader

@pytest.mark.parametrize("data, message", [
    ([], "expected a JSON object"),
    ({}, "expected a JSON object"),
    ({"papers": {}}, "is not of the form '<type>_nodes'"),
    ({"paper_nodes": []}, "must map node ids to nodes"),
    ({"paper_nodes": {"p": {"features": {}}}}, "exactly 'features' and 'neighbors'"),
    ({"paper_nodes": {"p": {"features": [], "neighbors": {}}}}, "features must be an object"),
    ({"paper_nodes": {"p": {"features": {}, "neighbors": {"author": "a1"}}}}, "must be a list of node ids"),
    ({"paper_nodes": {"x": {"features": {}, "neighbors": {}}}, "author_nodes": {"x": {"features": {},
                                                                                     "neighbors": {}}}},
     "must be unique across types"),
])
def test_schema_errors_name_the_problem(data, message):
    with pytest.raises(GraphSchemaError, match=message):
        Graph(data)


def test_load_grbench_graph_json(tmp_path):
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(DBLP_LIKE))
    g = Graph.load(path)
    assert g.types == ["paper", "author", "venue"] and len(g) == 5
    assert g.node_feature("p1", "title") == "Attention is all you need"
    assert g.neighbour_check("p1", "author") == ["a1", "a2"]
    assert g.node_degree("a2", "paper") == 2 and g.node_degree("p2", "venue") == 0
    assert g.retrieve_node("graph chain-of-thought") == "p2"
    assert g.retrieve_node("Noam Shazeer") == "a2"
    assert g.retrieve_node("zzqx") is None
    assert "There are 3 types of nodes in the graph: paper, author and venue." in g.definition()
    assert "Paper nodes are linked to their author nodes, venue nodes." in g.definition()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GraphSchemaError, match="not valid JSON"):
        Graph.load(bad)
    with pytest.raises(FileNotFoundError):
        Graph.load(tmp_path / "absent.json")


def test_graph_function_errors_say_what_exists():
    g = Graph(DBLP_LIKE)
    with pytest.raises(UnknownNodeError, match="node 'p9' does not exist"):
        g.node_feature("p9", "title")
    with pytest.raises(UnknownFeatureError, match="its features are: title, year"):
        g.node_feature("p1", "abstract")
    with pytest.raises(UnknownNeighborTypeError, match="its neighbor types are: author, venue"):
        g.neighbour_check("p1", "cited_by")
    assert g.node_feature("'p1'", " year ") == 2017  # Graph-CoT's remove_quotes + stripped arguments


# ------------------------------------------------------------------------------ goodbooks

def test_parse_series():
    assert parse_series("The Hunger Games (The Hunger Games, #1)") == [("The Hunger Games", "1")]
    assert parse_series("One Thousand White Women (One Thousand White Women#1)") == [("One Thousand White Women", "1")]
    assert parse_series("Wintersmith (Discworld, #35; Tiffany Aching, #3)") == [("Discworld", "35"),
                                                                                 ("Tiffany Aching", "3")]
    assert parse_series("Ranma ½, Vol. 1 (Ranma ½ (US 2nd), #1)") == [("Ranma ½ (US 2nd)", "1")]
    assert parse_series("The Harry Potter Collection 1-4 (Harry Potter, #1-4)") == [("Harry Potter", "1-4")]
    assert parse_series("Pride and Prejudice (Penguin Classics)") == []
    assert parse_series("Emma") == []


def test_small_goodbooks_graph(tmp_path):
    g = small_graph(tmp_path)
    assert g.types == ["book", "author", "series"]
    hg = g.retrieve_node("The Hunger Games (The Hunger Games, #1)")
    assert hg == "book-1"
    [author] = g.neighbour_check(hg, "author")
    assert g.node_feature(author, "name") == "Suzanne Collins" and g.node_degree(author, "book") == 4
    [series] = g.neighbour_check(hg, "series")
    assert g.text(series) == "The Hunger Games" and g.node_degree(series, "book") == 3
    assert g.neighbour_check("book-8", "series") == []  # a standalone book: degree 0, not an error
    assert [g.text(a) for a in g.neighbour_check("book-5", "author")] == ["J.K. Rowling", "Mary GrandPré"]
    assert g.node_feature("book-8", "publication_year") == "1813"
    line = render_vertex(g, "book-1")
    assert line.startswith("book-1 (book) title: The Hunger Games (The Hunger Games, #1); ")
    assert line == render_vertex(g, "book-1")


def test_goodbooks_matches_the_csv(shared_data):
    path = shared_data / "glm" / "goodbooks-10k" / "books.csv"
    g = build_goodbooks(path)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(g.node_ids("book")) == len(rows) == 10_000
    books_of = {}
    for row in rows:
        for name in {a.strip() for a in row["authors"].split(",")}:
            books_of.setdefault(name, set()).add(f"book-{row['goodreads_book_id']}")
    assert len(g.node_ids("author")) == len(books_of)
    for aid in g.node_ids("author")[::97]:  # every author's books, as the CSV lists them
        assert set(g.neighbour_check(aid, "book")) == books_of[g.text(aid)]
    hp = g.retrieve_node("Harry Potter and the Sorcerer's Stone (Harry Potter, #1)")
    assert g.node_feature(hp, "publication_year") == "1997"
    [series] = g.neighbour_check(hp, "series")
    assert g.text(series) == "Harry Potter" and g.node_degree(series, "book") >= 7
    assert 1000 < len(g.node_ids("series")) < 4500


# ------------------------------------------------------------------------------ questions

def test_questions_are_deterministic_split_and_cover_every_template(tmp_path):
    g = small_graph(tmp_path)
    a = generate_questions(g, per_template=5, seed=3)
    assert a == generate_questions(g, per_template=5, seed=3)
    templates = {q["template"] for q in a}
    assert {"authors", "series", "year", "author_count", "earliest", "top_rated", "series_most_ratings"} <= templates
    assert templates <= {t.id for t in TEMPLATES}
    assert len({q["qid"] for q in a}) == len(a)
    by = {q["qid"]: q for q in a}
    assert by["series_count-000"]["difficulty"] == "medium"
    path = tmp_path / "q.jsonl"
    write_questions(path, a)
    assert load_questions(path) == a


def test_spread_stratifies_by_difficulty_then_template():
    per = {"easy": ["e1", "e2", "e3"], "medium": ["m1", "m2"], "hard": ["h1"]}
    qs = [{"qid": f"{t}-{k}", "difficulty": level, "template": t}
          for level, templates in per.items() for t in templates for k in range(3)]
    picked = [q["qid"] for q in spread(qs, 8)]
    # difficulties in turn, templates in turn within each, each template's own order kept
    assert picked == ["e1-0", "m1-0", "h1-0", "e2-0", "m2-0", "h1-1", "e3-0", "m1-1"]
    assert {q["difficulty"] for q in spread(qs, 3)} == {"easy", "medium", "hard"}
    assert [q["qid"] for q in spread(qs, 100)] == [q["qid"] for q in spread(qs, len(qs))] and len(spread(qs, 100)) == 18
    assert spread(qs, 0) == []
    plain = [{"qid": str(k), "question": "?", "answer": "!"} for k in range(4)]  # GRBench's own files
    assert spread(plain, 3) == plain[:3]


def test_question_answers_against_the_raw_csv(shared_data):
    """Recompute answers of four templates straight from books.csv, without the graph."""
    path = shared_data / "glm" / "goodbooks-10k" / "books.csv"
    g = build_goodbooks(path)
    qs = generate_questions(g, per_template=30, seed=0)
    assert qs == generate_questions(g, per_template=30, seed=0)
    assert qs != generate_questions(g, per_template=30, seed=1)
    assert {q["split"] for q in qs} == {"train", "dev", "test"}
    assert {q["difficulty"] for q in qs} == {"easy", "medium", "hard"}
    assert all(sum(q["template"] == t.id for q in qs) == 30 for t in TEMPLATES)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    by_title = {r["title"].strip(): r for r in rows}
    count_of: dict[str, int] = {}
    for r in rows:
        for name in dict.fromkeys(a.strip() for a in r["authors"].split(",")):
            count_of[name] = count_of.get(name, 0) + 1
    checked = 0
    for q in qs:
        p = q["params"]
        if q["template"] == "authors":
            assert q["answer"] == ", ".join(dict.fromkeys(a.strip() for a in by_title[p["book_title"]]["authors"]
                                                          .split(",")))
        elif q["template"] == "year":
            assert q["answer"] == str(int(float(by_title[p["book_title"]]["original_publication_year"])))
        elif q["template"] == "language":
            assert q["answer"] == by_title[p["book_title"]]["language_code"]
        elif q["template"] == "author_count":
            assert q["answer"] == str(count_of[p["author_name"]])
        else:
            continue
        checked += 1
    assert checked == 120


def test_real_grbench_questions_load(shared_data):
    qs = load_questions(shared_data / "glm" / "grbench" / "goodreads.jsonl")
    assert len(qs) == 240 and qs[0]["qid"] == "0" and qs[0]["question"].startswith("Who penned the book")


@pytest.mark.parametrize("text, message", [
    ("not json\n", "not valid JSON"),
    ('{"qid": 1, "question": "q"}\n', "'qid', 'question' and 'answer'"),
    ('{"qid": 1, "question": "q", "answer": 2}\n{"qid": "1", "question": "q", "answer": "2"}\n', "appears twice"),
    ("\n", "no questions"),
])
def test_question_file_errors(tmp_path, text, message):
    path = tmp_path / "q.jsonl"
    path.write_text(text)
    with pytest.raises(QuestionFileError, match=message):
        load_questions(path)


# ------------------------------------------------------------------------------ metrics

def test_metrics():
    assert normalize_answer("The  Hunger Games!") == "hunger games"
    assert exact_match("the hunger games", "Hunger Games.") and not exact_match("Hunger", "Hunger Games")
    assert rouge_l("Suzanne Collins", "Suzanne Collins") == 1.0
    assert 0.0 < rouge_l("Collins", "Suzanne Collins") < 1.0
    assert rouge_l("", "Suzanne Collins") == 0.0
