"""Answer scoring: Graph-CoT's exact match after normalisation, and Rouge-L (`rouge-score`).

`normalize_answer` is Graph-CoT's (`GraphAgent.py`, after SQuAD's): lower case, punctuation and the
articles a/an/the removed, whitespace collapsed. Rouge-L is the F-measure of `rouge_score`'s
RougeScorer; its tokenizer keeps only ASCII letters and digits, so answers in other scripts score
0 for every system alike (exact match still counts them).
"""

from __future__ import annotations

import functools
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the|usd)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: object) -> str:
    s = str(text).lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: object, gold: object) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: object, gold: object) -> float:
    return float(_scorer().score(str(gold), str(prediction))["rougeL"].fmeasure)
