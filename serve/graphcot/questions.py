"""Questions over a graph from GRBench's goodreads templates, with exact answers from the graph.

GRBench's goodreads questions (`data/processed_data/goodreads/design_questions.ipynb` and the
paraphrases in `data.json`) come in three levels: easy (one hop: a book's authors, series, year,
language), medium (several hops or a count: the author's earliest book, the author's other series,
books of the same author and language, how many books an author wrote) and hard (an aggregate over
a neighbourhood: an author's most common language, highest-rated book). The templates here are the
ones a graph with book, author and series nodes and year / language / rating features supports,
worded as GRBench words them.

Answers are computed from the graph, never sampled: a candidate whose answer is not unique (a tie
for "the earliest book") or whose name does not lead back to it (two books with the same title, a
series named like a book) is skipped, so every question has one correct answer. Generation is deterministic by seed; each template's instances are split
train/dev/test by fraction, so every split holds every template and no entity appears twice within
a template. Files are GRBench's JSON lines `{"qid", "question", "answer"}` plus our own fields
(`difficulty`, `template`, `split`, `params`), so GRBench's own `data.json` loads as well.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from jaxsys.serve.graphcot.graph import Graph

DIFFICULTIES = ("easy", "medium", "hard")
SPLITS = ("train", "dev", "test")
# Neighbourhoods a question may aggregate over, at most (GRBench's generator skips answers of more
# than 30 books); it also keeps every question solvable within Graph-CoT's 10 steps.
MAX_BOOKS = 24


class QuestionFileError(ValueError):
    pass


Solution = tuple[dict[str, str], str]  # (wording parameters, answer)


@dataclasses.dataclass(frozen=True)
class Template:
    id: str
    difficulty: str
    entity_type: str  # the node type the question is about
    wordings: tuple[str, ...]
    solve: Callable[[Graph, str, "_Index"], Solution | None]


class _Index:
    """Lookups the solvers share: title multiplicity, per-book features."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.title_count = collections.Counter(graph.text(b) for b in graph.node_ids("book"))

    def feature(self, node: str, name: str) -> str:
        return str(self.graph.node_feature(node, name)).strip()

    def unique_book(self, book: str) -> bool:
        title = self.graph.text(book)
        return bool(title) and self.title_count[title] == 1

    def titles(self, books: Iterable[str]) -> list[str]:
        return sorted({self.graph.text(b) for b in books})

    def author_books(self, book: str) -> list[str]:
        g = self.graph
        return list(dict.fromkeys(o for a in g.neighbour_check(book, "author") for o in g.neighbour_check(a, "book")))


def _unique_best(items: Sequence[tuple[Any, str]], *, largest: bool) -> str | None:
    """The item with the unique largest (or smallest) key; None on a tie or when empty."""
    if not items:
        return None
    best = max(k for k, _ in items) if largest else min(k for k, _ in items)
    winners = [v for k, v in items if k == best]
    return winners[0] if len(winners) == 1 else None


def _unique_mode(values: Sequence[str]) -> str | None:
    counts = collections.Counter(v for v in values if v)
    if not counts:
        return None
    (top, n), *rest = counts.most_common()
    return None if rest and rest[0][1] == n else top


# ------------------------------------------------------------------------------ easy

def _authors(g: Graph, b: str, ix: _Index) -> Solution | None:
    if not ix.unique_book(b):
        return None
    names = [ix.feature(a, "name") for a in g.neighbour_check(b, "author")]
    return ({"book_title": g.text(b)}, ", ".join(names)) if names else None


def _series(g: Graph, b: str, ix: _Index) -> Solution | None:
    series = g.neighbour_check(b, "series")
    if not ix.unique_book(b) or len(series) != 1:
        return None
    return {"book_title": g.text(b)}, g.text(series[0])


def _book_feature(name: str) -> Callable[[Graph, str, _Index], Solution | None]:
    def solve(g: Graph, b: str, ix: _Index) -> Solution | None:
        value = ix.feature(b, name)
        return ({"book_title": g.text(b)}, value) if ix.unique_book(b) and value else None

    return solve


# ------------------------------------------------------------------------------ medium

def _author_count(g: Graph, a: str, ix: _Index) -> Solution | None:
    return {"author_name": g.text(a)}, str(g.node_degree(a, "book"))


def _series_count(g: Graph, s: str, ix: _Index) -> Solution | None:
    return {"series_title": g.text(s)}, str(g.node_degree(s, "book"))


def _earliest(g: Graph, b: str, ix: _Index) -> Solution | None:
    authors = g.neighbour_check(b, "author")
    if not ix.unique_book(b) or len(authors) != 1:
        return None
    books = g.neighbour_check(authors[0], "book")
    if len(books) > MAX_BOOKS:
        return None
    dated = [(int(ix.feature(o, "publication_year")), o) for o in books
             if ix.feature(o, "publication_year").lstrip("-").isdigit()]
    if len(dated) < 2:
        return None
    first = _unique_best(dated, largest=False)
    if first is None or first == b:
        return None
    return {"book_title": g.text(b)}, g.text(first)


def _other_series(g: Graph, b: str, ix: _Index) -> Solution | None:
    if not ix.unique_book(b):
        return None
    own = set(g.neighbour_check(b, "series"))
    books = ix.author_books(b)
    if len(books) > MAX_BOOKS:
        return None
    other = {s for o in books for s in g.neighbour_check(o, "series")} - own
    if not 1 <= len(other) <= 5:
        return None
    return {"book_title": g.text(b)}, ", ".join(sorted(g.text(s) for s in other))


def _same_author_language(g: Graph, b: str, ix: _Index) -> Solution | None:
    lang = ix.feature(b, "language_code")
    if not ix.unique_book(b) or not lang:
        return None
    books = ix.author_books(b)
    if len(books) > MAX_BOOKS:
        return None
    same = [o for o in books if o != b and ix.feature(o, "language_code") == lang]
    titles = ix.titles(same)
    if not 1 <= len(titles) <= 10 or g.text(b) in titles:
        return None
    return {"book_title": g.text(b)}, ", ".join(titles)


# ------------------------------------------------------------------------------ hard

def _common_language(g: Graph, a: str, ix: _Index) -> Solution | None:
    books = g.neighbour_check(a, "book")
    if not 3 <= len(books) <= MAX_BOOKS:
        return None
    mode = _unique_mode([ix.feature(o, "language_code") for o in books])
    return ({"author_name": g.text(a)}, mode) if mode else None


def _top_rated(g: Graph, a: str, ix: _Index) -> Solution | None:
    books = g.neighbour_check(a, "book")
    if not 3 <= len(books) <= MAX_BOOKS:
        return None
    best = _unique_best([(float(ix.feature(o, "average_rating") or 0), o) for o in books], largest=True)
    if best is None or not ix.unique_book(best):
        return None
    return {"author_name": g.text(a)}, g.text(best)


def _series_most_ratings(g: Graph, s: str, ix: _Index) -> Solution | None:
    books = g.neighbour_check(s, "book")
    if not 3 <= len(books) <= MAX_BOOKS:
        return None
    best = _unique_best([(int(ix.feature(o, "ratings_count") or 0), o) for o in books], largest=True)
    if best is None or not ix.unique_book(best):
        return None
    return {"series_title": g.text(s)}, g.text(best)


TEMPLATES: tuple[Template, ...] = (
    Template("authors", "easy", "book", (
        "Who are the authors of the book {book_title}?", "Who penned the book {book_title}?",
        "Do you know who penned the book {book_title}?"), _authors),
    Template("series", "easy", "book", (
        "In which series is the book {book_title} included?", "Which series includes the book {book_title}?"),
        _series),
    Template("year", "easy", "book", (
        "What is the publication year of the book {book_title}?",
        "In what year was the book {book_title} published?"), _book_feature("publication_year")),
    Template("language", "easy", "book", (
        "What language is the book {book_title} written in?",
        "The book {book_title} is written in what language?"), _book_feature("language_code")),
    Template("rating", "easy", "book", (
        "What is the average rating of the book {book_title}?",
        "How is the book {book_title} rated on average?"), _book_feature("average_rating")),
    Template("author_count", "medium", "author", (
        "How many books has author {author_name} written?",
        "What is the total number of books written by {author_name}?",
        "Can you tell me the number of books {author_name} has penned?"), _author_count),
    Template("series_count", "medium", "series", (
        "How many books are part of the series {series_title}?",
        "How many books does the series {series_title} contain?"), _series_count),
    Template("earliest", "medium", "book", (
        "Find the earliest book written by the author of the book {book_title}?",
        "Can you tell me the earliest book that the author of {book_title} wrote?"), _earliest),
    Template("other_series", "medium", "book", (
        "Find the series in which the same author as the book {book_title} has contributed, but the series "
        "is different from the book's series.",
        "What are the other series by the same author as the book {book_title} but not the same as the "
        "book's series?"), _other_series),
    Template("same_author_language", "medium", "book", (
        "Find books written by the same author and in the same language as the book {book_title}?",
        "Can you identify books with the same author and language as the book {book_title}?"),
        _same_author_language),
    Template("common_language", "hard", "author", (
        "What is the most common language among the books written by author {author_name}?",
        "What is the primary language of the books that {author_name} has written?"), _common_language),
    Template("top_rated", "hard", "author", (
        "Which book by author {author_name} has the highest average rating?",
        "What is the highest-rated book written by {author_name}?"), _top_rated),
    Template("series_most_ratings", "hard", "series", (
        "Which book in the series {series_title} has the most ratings?",
        "What is the most rated book of the series {series_title}?"), _series_most_ratings),
)
TEMPLATE_BY_ID = {t.id: t for t in TEMPLATES}


def generate_questions(graph: Graph, *, per_template: int = 40, seed: int = 0,
                       fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                       templates: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Questions for every template (up to `per_template` each), split train/dev/test.

    The same graph, seed and arguments give the same questions in the same order."""
    if per_template <= 0:
        raise ValueError("per_template must be positive")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    chosen = [TEMPLATE_BY_ID[t] for t in templates] if templates is not None else list(TEMPLATES)
    missing = {t.entity_type for t in chosen} - set(graph.types)
    if missing:
        raise ValueError(f"the graph has no {sorted(missing)} nodes, which these templates ask about")
    ix = _Index(graph)
    out: list[dict[str, Any]] = []
    for t in chosen:
        rng = random.Random(f"{seed}:{t.id}")
        candidates = sorted(graph.node_ids(t.entity_type))
        rng.shuffle(candidates)
        instances = []
        for node in candidates:
            text = graph.text(node)
            if "[" in text or "]" in text or graph.retrieve_node(text) != node:  # unquotable, or names another node
                continue
            solved = t.solve(graph, node, ix)
            if solved is None:
                continue
            params, answer = solved
            instances.append((node, params, answer, rng.choice(t.wordings)))
            if len(instances) == per_template:
                break
        n_train = round(len(instances) * fractions[0])
        n_dev = round(len(instances) * fractions[1])
        for k, (node, params, answer, wording) in enumerate(instances):
            split = "train" if k < n_train else "dev" if k < n_train + n_dev else "test"
            out.append({"qid": f"{t.id}-{k:03d}", "question": wording.format(**params), "answer": answer,
                        "difficulty": t.difficulty, "template": t.id, "split": split, "params": params,
                        "entity": node})
    return out


def split(questions: Iterable[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; splits: {', '.join(SPLITS)}")
    return [q for q in questions if q.get("split") == name]


def spread(questions: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first `n` questions, stratified: difficulties in turn (easy, medium, hard, easy, ...) and,
    within a difficulty, its templates in turn. Any `n >= 3` covers every difficulty, and a larger
    `n` every template about equally often within its difficulty; each template's questions keep
    their order. Questions without a difficulty or template (GRBench's own files) are one group."""
    levels: dict[str, dict[str, list[dict[str, Any]]]] = {level: {} for level in DIFFICULTIES}
    for q in questions:
        levels.setdefault(q.get("difficulty") or "", {}).setdefault(q.get("template") or "", []).append(q)
    stream = _round_robin([_round_robin(list(templates.values())) for templates in levels.values()])
    return [q for q, _ in zip(stream, range(n))]


def _round_robin(streams: Sequence[Iterable[Any]]) -> Iterator[Any]:
    """One item of each stream in turn, dropping the streams that run out."""
    iters = [iter(s) for s in streams]
    while iters:
        for it in list(iters):
            try:
                yield next(it)
            except StopIteration:
                iters.remove(it)


def write_questions(path: str | os.PathLike, questions: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")


def load_questions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """GRBench JSON lines: every line an object with `qid`, `question` and `answer` (extra fields kept)."""
    path = Path(path)
    if not path.is_file():
        raise QuestionFileError(f"no question file at {path}")
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuestionFileError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(q, dict) or not {"qid", "question", "answer"} <= set(q):
                raise QuestionFileError(f"{path}:{n}: a question is an object with 'qid', 'question' and 'answer'")
            q = dict(q, qid=str(q["qid"]), question=str(q["question"]), answer=str(q["answer"]))
            if q["qid"] in seen:
                raise QuestionFileError(f"{path}:{n}: qid {q['qid']!r} appears twice")
            seen.add(q["qid"])
            out.append(q)
    if not out:
        raise QuestionFileError(f"{path}: no questions")
    return out
