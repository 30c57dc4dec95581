"""`jaxsys graphcot`: questions / traces / show, and the clear errors (schema, unknown node or
feature, unreachable backend, bad question file)."""

from __future__ import annotations

import json
import socket

import pytest

pytest.importorskip("bm25s")

from graphcot_helpers import write_books_csv  # noqa: E402

from jaxsys.cli import main  # noqa: E402


@pytest.fixture
def books(tmp_path):
    return str(write_books_csv(tmp_path / "books.csv"))


def test_help_is_listed(capsys):
    assert main(["--help"]) == 0
    assert "graphcot" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["graphcot", "--help"])
    assert e.value.code == 0 and "--backend URL" in capsys.readouterr().out


def test_questions_traces_show(tmp_path, books, capsys):
    qpath = tmp_path / "q.jsonl"
    assert main(["graphcot", "questions", "--graph", books, "--out", str(qpath), "--per-template", "3"]) == 0
    qs = [json.loads(line) for line in qpath.read_text().splitlines()]
    assert qs and {"qid", "question", "answer", "split", "difficulty"} <= set(qs[0])
    tpath = tmp_path / "t.jsonl"
    assert main(["graphcot", "traces", "--graph", books, "--questions", str(qpath), "--out", str(tpath)]) == 0
    n_train = sum(q["split"] == "train" for q in qs)
    assert f"oracle correct: graphcot {n_train}/{n_train}, glm {n_train}/{n_train}" in capsys.readouterr().out
    assert main(["graphcot", "show", "--graph", books, "book-9", "--feature", "title"]) == 0
    assert capsys.readouterr().out == "Emma\n"


@pytest.mark.parametrize("args, message", [
    (["show", "book-404"], "node 'book-404' does not exist in the graph"),
    (["show", "book-9", "--feature", "genre"], "book node 'book-9' has no feature 'genre'; its features are: title"),
])
def test_unknown_node_or_feature(books, capsys, args, message):
    assert main(["graphcot", args[0], "--graph", books, *args[1:]]) == 2
    assert message in capsys.readouterr().err


def test_graph_file_not_matching_the_schema(tmp_path, capsys):
    bad = tmp_path / "graph.json"
    bad.write_text(json.dumps({"book_nodes": {"b1": {"features": {"title": "x"}, "neighbors": {"author": "a1"}}}}))
    q = tmp_path / "q.jsonl"
    q.write_text('{"qid": "0", "question": "?", "answer": "x"}\n')
    assert main(["graphcot", "--graph", str(bad), "--questions", str(q)]) == 2
    assert "graph: book_nodes['b1'].neighbors['author'] must be a list of node ids" in capsys.readouterr().err
    assert main(["graphcot", "--graph", str(tmp_path / "none.json"), "--questions", str(q)]) == 2
    assert "no graph file at" in capsys.readouterr().err


def test_bad_question_file_and_unreachable_backend(tmp_path, books, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text('{"qid": "0", "question": "?"}\n')
    assert main(["graphcot", "--graph", books, "--questions", str(q)]) == 2
    assert "q.jsonl:1: a question is an object with 'qid', 'question' and 'answer'" in capsys.readouterr().err
    q.write_text('{"qid": "0", "question": "Who wrote Emma?", "answer": "Jane Austen"}\n')
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    assert main(["graphcot", "--graph", books, "--questions", str(q), "--backend", f"http://127.0.0.1:{port}",
                 "--no-progress"]) == 2
    assert f"cannot reach an OpenAI-compatible server at http://127.0.0.1:{port}/v1" in capsys.readouterr().err
