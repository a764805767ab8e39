"""Metrics: accuracy for classification, SQuAD-style exact match and token F1 for generation.

Answers are compared after the standard SQuAD normalisation (lower case, punctuation and the
articles a/an/the removed, whitespace collapsed); against several gold answers the best one counts.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

__all__ = ["normalize_answer", "exact_match", "f1_score", "accuracy", "qa_metrics"]

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Token-overlap F1, the maximum over the gold answers."""
    if not golds:
        raise ValueError("f1_score needs at least one gold answer")
    pred_tokens = normalize_answer(prediction).split()
    return max(_token_f1(pred_tokens, normalize_answer(g).split()) for g in golds)


def accuracy(predictions: Sequence[int], golds: Sequence[Sequence[int]]) -> float:
    """Fraction of predictions that are among their example's correct candidates."""
    if len(predictions) != len(golds) or not predictions:
        raise ValueError(f"accuracy needs as many predictions as golds (>0), got {len(predictions)}/{len(golds)}")
    return sum(p in g for p, g in zip(predictions, golds)) / len(predictions)


def qa_metrics(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    if len(predictions) != len(golds) or not predictions:
        raise ValueError(f"qa_metrics needs as many predictions as golds (>0), got {len(predictions)}/{len(golds)}")
    n = len(predictions)
    return {
        "em": sum(exact_match(p, g) for p, g in zip(predictions, golds)) / n,
        "f1": sum(f1_score(p, g) for p, g in zip(predictions, golds)) / n,
    }
