"""Evaluation metrics, in numpy: accuracy, macro-F1, hits@k, ROC-AUC, MAE/RMSE/R², Jaccard."""

from __future__ import annotations

from typing import Optional

import numpy as np


def category_metrics(y_true: np.ndarray, y_pred: np.ndarray, probabilities: Optional[np.ndarray] = None,
                     num_classes: Optional[int] = None, top_k: int = 3) -> dict[str, float]:
    """y_true/y_pred: class indices; probabilities: (n, num_classes)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out = {"accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0, "macro_f1": macro_f1(y_true, y_pred)}
    if probabilities is not None and len(y_true):
        k = min(top_k, probabilities.shape[1])
        top = np.argsort(-probabilities, axis=1)[:, :k]
        out["hits_at_k"] = float(np.mean((top == y_true[:, None]).any(axis=1)))
    return out


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    classes = np.union1d(y_true, y_pred)
    if len(classes) == 0:
        return 0.0
    scores = []
    for c in classes:
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """Mann-Whitney form with ties averaged; None when only one class is present."""
    y_true = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=float)
    sorted_scores = np.asarray(scores)[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(y_true: np.ndarray, probability: np.ndarray, threshold: float) -> dict[str, float]:
    y_true = np.asarray(y_true).astype(int)
    y_pred = (np.asarray(probability) >= threshold).astype(int)
    out = {"accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0, "macro_f1": macro_f1(y_true, y_pred)}
    tp = np.sum((y_pred == 1) & (y_true == 1))
    out["precision"] = float(tp / max(1, y_pred.sum()))
    out["recall"] = float(tp / max(1, y_true.sum()))
    auc = roc_auc(y_true, probability)
    if auc is not None:
        out["roc_auc"] = auc
    return out


def number_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    y_true, y_pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    err = y_pred - y_true
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2)) if len(y_true) else 0.0
    return {"mae": float(np.mean(np.abs(err))), "mse": float(np.mean(err**2)), "rmse": float(np.sqrt(np.mean(err**2))),
            "r2": float(1 - np.sum(err**2) / ss_tot) if ss_tot > 0 else 0.0}


def set_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """y_true/y_pred: (n, num_labels) 0/1 matrices. Jaccard per row (two empty sets count as 1), averaged."""
    y_true, y_pred = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    inter = (y_true & y_pred).sum(axis=1)
    union = (y_true | y_pred).sum(axis=1)
    jaccard = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    tp = (y_true & y_pred).sum()
    return {"jaccard": float(jaccard.mean()) if len(jaccard) else 0.0,
            "precision": float(tp / max(1, y_pred.sum())), "recall": float(tp / max(1, y_true.sum()))}
