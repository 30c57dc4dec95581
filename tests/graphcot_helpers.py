"""Shared builders for the GLM / Graph-CoT tests: a small goodbooks-format CSV written on the fly,
and a tiny random model that carries the real SmolLM2 tokenizer (the agents speak text)."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

# (goodreads id, authors, year, title, language, rating, ratings count)
BOOKS = [
    (1, "Suzanne Collins", 2008, "The Hunger Games (The Hunger Games, #1)", "eng", 4.34, 4780653),
    (2, "Suzanne Collins", 2009, "Catching Fire (The Hunger Games, #2)", "eng", 4.30, 1831039),
    (3, "Suzanne Collins", 2010, "Mockingjay (The Hunger Games, #3)", "eng", 4.03, 1719760),
    (4, "Suzanne Collins", 2003, "Gregor the Overlander (Underland Chronicles, #1)", "eng", 4.0, 70000),
    (5, "J.K. Rowling, Mary GrandPré", 1997, "Harry Potter and the Sorcerer's Stone (Harry Potter, #1)", "eng",
     4.44, 4602479),
    (6, "J.K. Rowling, Mary GrandPré", 1998, "Harry Potter and the Chamber of Secrets (Harry Potter, #2)", "eng",
     4.37, 1779331),
    (7, "J.K. Rowling", 2012, "The Casual Vacancy", "en-GB", 3.27, 142090),
    (8, "Jane Austen", 1813, "Pride and Prejudice", "eng", 4.24, 2035490),
    (9, "Jane Austen", 1815, "Emma", "eng", 3.99, 475634),
    (10, "Jane Austen", 1818, "Northanger Abbey", "fre", 3.82, 240000),
    (11, "Leo Tolstoy", 1869, "War and Peace", "rus", 4.11, 181428),
    (12, "Leo Tolstoy", 1877, "Anna Karenina", "eng", 4.05, 577563),
]
COLUMNS = ["book_id", "goodreads_book_id", "best_book_id", "work_id", "books_count", "isbn", "isbn13", "authors",
           "original_publication_year", "original_title", "title", "language_code", "average_rating",
           "ratings_count", "work_ratings_count", "work_text_reviews_count", "ratings_1", "ratings_2", "ratings_3",
           "ratings_4", "ratings_5", "image_url", "small_image_url"]


def write_books_csv(path: Path) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for i, (gid, authors, year, title, lang, rating, count) in enumerate(BOOKS, 1):
            w.writerow({"book_id": i, "goodreads_book_id": gid, "best_book_id": gid, "work_id": gid, "books_count": 1,
                        "isbn": f"{gid:09d}", "isbn13": f"97800000{gid:05d}", "authors": authors,
                        "original_publication_year": f"{year}.0", "original_title": title.split(" (")[0],
                        "title": title, "language_code": lang, "average_rating": rating, "ratings_count": count,
                        "work_ratings_count": count, "work_text_reviews_count": 0, "ratings_1": 0, "ratings_2": 0,
                        "ratings_3": 0, "ratings_4": 0, "ratings_5": 0, "image_url": "", "small_image_url": ""})
    return path


def small_graph(tmp_path: Path):
    from jaxsys.serve.graphcot.goodbooks import build_goodbooks

    return build_goodbooks(write_books_csv(tmp_path / "books.csv"))


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The SmolLM2 tokenizer from the GGUF's metadata (no weights are read)."""
    from helpers import smollm2_path

    from jaxsys.models.tokenizer import Tokenizer
    from jaxsys.models.weights import gguf_metadata, read_gguf

    return Tokenizer.from_gguf_metadata(gguf_metadata(read_gguf(smollm2_path())))


def tiny_text_model(seed: int = 0):
    """A tiny random Llama (2 layers, hidden 64) over SmolLM2's vocabulary and tokenizer: a real
    model whose text is noise, fast enough for end-to-end runs of the agents on the real engine."""
    from serve_helpers import tiny_params

    from jaxsys.models import LoadedModel
    from serve_helpers import tiny_config

    tok = smollm2_tokenizer()
    overrides = dict(vocab_size=49152, max_position_embeddings=4096)
    cfg = tiny_config(**overrides).replace(eos_token_ids=tuple(tok.eos_token_ids))
    return LoadedModel(name="tiny-smollm2-vocab", config=cfg, params=tiny_params(seed, **overrides), tokenizer=tok,
                       path=Path("tiny"))
