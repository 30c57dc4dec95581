"""goodbooks-10k (a real Goodreads graph) in GRBench's schema: book, author and series nodes.

`books.csv` holds 10,000 books with their authors (comma-separated), publication year, language,
ratings and ISBN. Series are parsed from titles: "Catching Fire (The Hunger Games, #2)" belongs to
the series "The Hunger Games"; "(A, #1; B, #3)" to two series. Every book carries both neighbor
types (possibly empty), so `NodeDegree[book, series]` is 0 rather than an error for a standalone
book, as in GRBench's goodreads graph.

Node ids: `book-<goodreads_book_id>`, `author-<n>` and `series-<n>` numbered in order of first
appearance in the file, so the same file always gives the same graph.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from jaxsys.serve.graphcot.graph import Graph, GraphSchemaError

REQUIRED_COLUMNS = ("goodreads_book_id", "authors", "original_publication_year", "original_title", "title",
                    "language_code", "average_rating", "ratings_count", "isbn", "isbn13")
_NUMBER = re.compile(r"^\s*#?\s*([\d.]+(?:\s*-\s*[\d.]+)?)\s*$")


def parse_series(title: str) -> list[tuple[str, str]]:
    """[(series name, number)] from a trailing "(Name, #n)" / "(Name #n)" / "(A, #1; B, #2)"."""
    title = title.rstrip()
    if not title.endswith(")"):
        return []
    depth = 0
    for i in range(len(title) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(title[i], 0)
        if depth == 0:
            break
    else:
        return []
    inner = title[i + 1:-1]
    out = []
    for part in inner.split(";"):
        if "#" not in part:
            continue
        name, _, number = part.rpartition("#")
        name = name.strip().rstrip(",").strip()
        if name and _NUMBER.match(number):
            out.append((name, number.strip()))
    return out


def _year(raw: str) -> str:
    raw = raw.strip()
    if not raw:
        return ""
    try:
        return str(int(float(raw)))
    except ValueError:
        return raw


def build_goodbooks(csv_path: str | os.PathLike) -> Graph:
    """The goodbooks graph from `books.csv` (columns as in zygmuntz/goodbooks-10k)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"no goodbooks file at {csv_path}")
    with open(csv_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise GraphSchemaError(f"{csv_path}: not a goodbooks books.csv; missing columns {missing}")
        rows = list(reader)
    books: dict[str, dict] = {}
    authors: dict[str, dict] = {}
    series: dict[str, dict] = {}
    author_ids: dict[str, str] = {}
    series_ids: dict[str, str] = {}
    for row in rows:
        bid = f"book-{row['goodreads_book_id'].strip()}"
        if bid in books:
            raise GraphSchemaError(f"{csv_path}: goodreads_book_id {row['goodreads_book_id']} appears twice")
        book = {"features": {"title": row["title"].strip(), "original_title": row["original_title"].strip(),
                             "publication_year": _year(row["original_publication_year"]),
                             "language_code": row["language_code"].strip(),
                             "average_rating": row["average_rating"].strip(),
                             "ratings_count": row["ratings_count"].strip(), "isbn": row["isbn"].strip(),
                             "isbn13": row["isbn13"].strip()},
                "neighbors": {"author": [], "series": []}}
        for name in dict.fromkeys(a.strip() for a in row["authors"].split(",") if a.strip()):
            aid = author_ids.setdefault(name, f"author-{len(author_ids)}")
            authors.setdefault(aid, {"features": {"name": name}, "neighbors": {"book": []}})
            authors[aid]["neighbors"]["book"].append(bid)
            book["neighbors"]["author"].append(aid)
        for name, _number in parse_series(row["title"]):
            sid = series_ids.setdefault(name, f"series-{len(series_ids)}")
            series.setdefault(sid, {"features": {"title": name}, "neighbors": {"book": []}})
            if bid not in series[sid]["neighbors"]["book"]:
                series[sid]["neighbors"]["book"].append(bid)
                book["neighbors"]["series"].append(sid)
        books[bid] = book
    return Graph({"book_nodes": books, "author_nodes": authors, "series_nodes": series}, name="goodbooks")
