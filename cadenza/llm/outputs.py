"""Turning generated text into predictions and scores: category labels (match rules) and text metrics."""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from ..metrics import category_metrics


# ------------------------------------------------------------------------------------------ category outputs
def extract_label(text: str, labels: list[str], rules: Optional[dict] = None,
                  fallback: Optional[str] = None) -> Optional[str]:
    """The label a generation names. With `match` rules, the first rule (config order) that fires wins:
    `contains` is a case-insensitive substring test, `regex` a case-insensitive search. Without rules, the
    label mentioned earliest (as a whole word, case-insensitive) wins. Nothing found -> fallback_label."""
    text = text or ""
    if rules:
        for label, rule in rules.items():
            kind, value = _rule(rule)
            if kind == "contains" and value.lower() in text.lower():
                return label
            if kind == "regex" and re.search(value, text, flags=re.IGNORECASE):
                return label
        return fallback
    best, best_pos = None, None
    for label in labels:
        m = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text, flags=re.IGNORECASE)
        if m and (best_pos is None or m.start() < best_pos or (m.start() == best_pos and len(label) > len(best))):
            best, best_pos = label, m.start()
    return best if best is not None else fallback


def _rule(rule) -> tuple[str, str]:
    if isinstance(rule, dict):
        return rule.get("type", "contains"), str(rule["value"])
    return rule.type, rule.value


def category_scores(true_labels: list, predicted: list, vocab: list[str], top_k: int = 3,
                    probabilities: Optional[np.ndarray] = None) -> dict[str, float]:
    """Same metrics as ecd's category outputs; a prediction outside the vocabulary (no rule matched and no
    fallback) counts as wrong."""
    index = {label: i for i, label in enumerate(vocab)}
    unknown = len(vocab)
    y_true = np.array([index.get(str(t), unknown) for t in true_labels])
    y_pred = np.array([index.get(p, unknown + 1) if p is not None else unknown + 1 for p in predicted])
    return category_metrics(y_true, y_pred, probabilities, num_classes=len(vocab), top_k=top_k)


# ---------------------------------------------------------------------------------------------- text metrics
def normalize(text: str) -> str:
    return " ".join(str(text).lower().split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of generations equal to the reference after lower-casing and collapsing whitespace."""
    if not references:
        return 0.0
    return float(np.mean([normalize(p) == normalize(r) for p, r in zip(predictions, references)]))


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 from the longest common subsequence of lower-cased whitespace tokens."""
    p, r = normalize(prediction).split(), normalize(reference).split()
    if not p and not r:
        return 1.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def text_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    return {"exact_match": exact_match(predictions, references),
            "rouge_l": float(np.mean([rouge_l(p, r) for p, r in zip(predictions, references)])) if references else 0.0}
