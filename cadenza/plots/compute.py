"""What the plots show, computed with numpy alone: learning-curve series, confusion matrices, per-class F1, ROC and
precision-recall points, calibration bins and Brier scores. Nothing here draws, so the tests can check every
number against the statistics Cadenza writes (and against scikit-learn) without matplotlib."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..metrics import canonical_name

# split → output feature ("combined" for the weighted sum) → metric → [(epoch, value)]
Series = dict[str, dict[str, dict[str, list[tuple[float, float]]]]]


# ------------------------------------------------------------------------------------------ learning curves
def learning_series(statistics: dict) -> Series:
    """The curves in one training_statistics.json, in Cadenza's layout (one entry per epoch) or Ludwig's (one
    list per metric). x is in epochs: Cadenza's evaluations every trainer.eval_steps land between them."""
    if isinstance(statistics.get("training"), dict):
        return _ludwig_series(statistics)
    series: Series = {}
    for epoch, entry in enumerate(statistics.get("training") or [], 1):
        _add(series, "training", "combined", "loss", epoch, entry.get("loss"))  # the epoch's mean training loss
        _add_features(series, "training", epoch, entry.get("metrics") or {})  # trainer.evaluate_training_set
    for epoch, entry in enumerate(statistics.get("validation") or [], 1):
        _add_features(series, "validation", epoch, entry)
    steps_per_epoch = _steps_per_epoch(statistics)
    for entry in statistics.get("validation_steps") or []:
        if steps_per_epoch:
            _add_features(series, "validation", entry["step"] / steps_per_epoch, entry)
    for features in series.get("validation", {}).values():
        for points in features.values():
            points.sort()  # step evaluations were appended after the epoch ends
    return series


def _ludwig_series(statistics: dict) -> Series:
    series: Series = {}
    for split in ("training", "validation"):  # what learning curves show (Ludwig's "test" curves too are not)
        for feature, metrics in (statistics.get(split) or {}).items():
            for metric, values in metrics.items():
                if isinstance(values, list):
                    for epoch, value in enumerate(values, 1):
                        _add(series, split, feature, metric, epoch, value)
    return series


def _add_features(series: Series, split: str, x: float, entry: dict) -> None:
    for feature, metrics in entry.items():
        if isinstance(metrics, dict):  # skips "epoch"/"step" of a validation_steps entry
            for metric, value in metrics.items():
                _add(series, split, feature, metric, x, value)


def _add(series: Series, split: str, feature: str, metric: str, x: float, value) -> None:
    # only the metrics of cadenza.metrics (timings and throughput are not learning curves); a null value is a
    # metric that was undefined on that split (written as null, see artifacts.write_json)
    if canonical_name(metric) is None or not is_number(value):
        return
    series.setdefault(split, {}).setdefault(feature, {}).setdefault(metric, []).append((float(x), float(value)))


def _steps_per_epoch(statistics: dict) -> Optional[float]:
    epochs, steps = len(statistics.get("training") or []), statistics.get("steps")
    return steps / epochs if epochs and steps else None


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------ classification
def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true class, predicted class] over class indices 0..num_classes-1."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(truth), np.asarray(predicted)), 1)
    return counts


def normalize_rows(counts: np.ndarray) -> np.ndarray:
    """Each true class's row as shares of its rows; a class without rows stays all zeros."""
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)


def per_class_f1(counts: np.ndarray) -> np.ndarray:
    """F1 of each class (one against the rest) from a confusion matrix; 0 where precision and recall are 0."""
    hits = np.diag(counts).astype(float)
    predicted, actual = counts.sum(axis=0), counts.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    both = precision + recall
    return np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)


def roc_points(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates), one point per distinct score from the highest down, starting
    at (0, 0). Tied scores make one point, so the trapezoid area is the tie-averaged AUC cadenza.metrics reports."""
    true_positives, false_positives = _cumulative_hits(positive, scores)
    tpr = true_positives / max(true_positives[-1], 1)
    fpr = false_positives / max(false_positives[-1], 1)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def precision_recall_points(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recalls, precisions) with each distinct score as the threshold (a row is positive when its score is at
    least the threshold), from the highest down; starts at recall 0, precision 1, as scikit-learn's curve does."""
    true_positives, false_positives = _cumulative_hits(positive, scores)
    recall = true_positives / max(true_positives[-1], 1)
    precision = true_positives / (true_positives + false_positives)
    return np.concatenate([[0.0], recall]), np.concatenate([[1.0], precision])


def _cumulative_hits(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positives and negatives scored at or above each distinct score, highest score first."""
    positive, scores = np.asarray(positive, dtype=bool), np.asarray(scores, dtype=float)
    order = np.argsort(-scores, kind="mergesort")
    positive, scores = positive[order], scores[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_positives = np.cumsum(positive)[last_of_each_score].astype(float)
    return true_positives, (last_of_each_score + 1) - true_positives


def area_under(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def calibration_bins(positive: np.ndarray, scores: np.ndarray, bins: int = 21) -> tuple[np.ndarray, np.ndarray]:
    """(mean predicted probability, share of positives) in each non-empty bin of equal width: Ludwig's 21 bins,
    binned as scikit-learn's calibration_curve does."""
    positive, scores = np.asarray(positive, dtype=float), np.asarray(scores, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges[1:-1], scores)
    rows = np.bincount(which, minlength=bins)
    filled = rows > 0
    mean_score = np.bincount(which, weights=scores, minlength=bins)[filled] / rows[filled]
    share = np.bincount(which, weights=positive, minlength=bins)[filled] / rows[filled]
    return mean_score, share


def brier_score(positive: np.ndarray, scores: np.ndarray) -> float:
    """Mean squared distance between the predicted probability and the 0/1 outcome (lower is better)."""
    return float(np.mean((np.asarray(scores, dtype=float) - np.asarray(positive, dtype=float)) ** 2))


# ------------------------------------------------------------------------------------------ hyperopt
def pair_means(values_a: list, values_b: list, scores: list) -> tuple[list, list, np.ndarray]:
    """Mean score for each pair of (binned) parameter values: (a's values, b's values, means[a, b]; NaN where no
    trial tried that pair)."""
    a_values, b_values = sorted(set(values_a), key=_order), sorted(set(values_b), key=_order)
    sums, counts = np.zeros((len(a_values), len(b_values))), np.zeros((len(a_values), len(b_values)))
    for a, b, score in zip(values_a, values_b, scores):
        i, j = a_values.index(a), b_values.index(b)
        sums[i, j] += score
        counts[i, j] += 1
    return a_values, b_values, np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)


def bin_numbers(values: list, most: int = 10) -> tuple[list, bool]:
    """(values, whether they were binned). Numbers with more than `most` distinct values are replaced by the lower
    edge of their quantile bin: a pair heatmap of raw floats would hold one trial per cell."""
    if not values or not all(is_number(v) for v in values) or len(set(values)) <= most:
        return list(values), False
    edges = np.unique(np.quantile(np.asarray(values, dtype=float), np.linspace(0, 1, most + 1)))
    which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    return [float(edges[i]) for i in which], True


def _order(value):
    # numbers in numeric order, then anything else (categories, bin labels) by text
    return (0, float(value), "") if is_number(value) else (1, 0.0, str(value))
