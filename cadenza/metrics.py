"""Evaluation metrics: one table says which metrics each output type reports and which way is better.

The table (`METRICS`) is the single source for the metric functions below, for what `trainer.validation_metric`
may name (checked when the config is loaded), for the training loop's "is this better?" and for the generated
docs. Names follow Ludwig's (precision, recall, f1, roc_auc, ...); Ludwig's long names for the number metrics
(mean_squared_error, ...) are accepted as aliases.
"""

from __future__ import annotations

import difflib
import math
from typing import NamedTuple, Optional

import numpy as np

OUTPUT_TYPES = ("category", "binary", "number", "set", "text")
COMBINED = "combined"  # the validation field whose only metric is the weighted sum of the output losses
# An llm scores every output (text or category) as tokens under teacher forcing; those metrics are the only ones
# an llm computes while training, since the others need generated text.
LLM_TOKENS = "llm"
# An llm's preference trainers (trainer.type dpo / orpo / kto) score pairs of completions instead: their validation
# rounds compute the preference loss and these reward metrics (TRL's names; the underscore spellings work too).
PREFERENCE = "preference"
PREFERENCE_TRAINERS = ("dpo", "orpo", "kto")


class Metric(NamedTuple):
    name: str
    applies_to: frozenset[str]  # output types, plus COMBINED and LLM_TOKENS
    higher_is_better: bool
    description: str
    aliases: tuple[str, ...] = ()


def _for(*kinds: str) -> frozenset[str]:
    return frozenset(kinds)


METRICS: tuple[Metric, ...] = (
    Metric("loss", _for(*OUTPUT_TYPES, COMBINED, LLM_TOKENS, PREFERENCE), False,
           "The output's loss, averaged over rows (llm: over target tokens; preference trainers: over pairs, kto: "
           "examples); combined: the loss-weighted sum."),
    Metric("accuracy", _for("category", "binary"), True, "Share of rows whose predicted label is right."),
    Metric("hits_at_k", _for("category"), True, "Share of rows whose label is among the top_k most probable."),
    Metric("precision", _for("category", "binary", "set"), True,
           "Right predictions among predicted positives; category: averaged over classes; set: over all labels."),
    Metric("recall", _for("category", "binary", "set"), True,
           "Found positives among actual positives; category: averaged over classes; set: over all labels."),
    Metric("specificity", _for("binary"), True, "Found negatives among actual negatives."),
    Metric("f1", _for("category", "binary", "set"), True,
           "Harmonic mean of precision and recall; category: per class, then averaged (macro).",
           aliases=("macro_f1",)),
    Metric("roc_auc", _for("category", "binary"), True,
           "Area under the ROC curve; category: one class against the rest, averaged. NaN with a single class."),
    Metric("mae", _for("number"), False, "Mean absolute error, in the output's own units.",
           aliases=("mean_absolute_error",)),
    Metric("mse", _for("number"), False, "Mean squared error.", aliases=("mean_squared_error",)),
    Metric("rmse", _for("number"), False, "Root mean squared error.", aliases=("root_mean_squared_error",)),
    Metric("r2", _for("number"), True, "Coefficient of determination (1: perfect, 0: no better than the mean)."),
    Metric("jaccard", _for("set"), True, "Intersection over union of predicted and true labels, per row, averaged."),
    Metric("perplexity", _for(LLM_TOKENS), False, "exp(loss) of the target tokens."),
    Metric("token_accuracy", _for(LLM_TOKENS), True, "Share of target tokens predicted right under teacher forcing."),
    Metric("exact_match", _for("text"), True,
           "Share of generations equal to the reference (case and whitespace ignored)."),
    Metric("rouge_l", _for("text"), True, "ROUGE-L F1 of generation and reference (longest common subsequence)."),
    Metric("rewards/accuracies", _for(PREFERENCE), True, "Share of pairs whose chosen completion gets the higher "
           "reward (dpo/orpo/kto; none for kto on unpaired rows).", aliases=("rewards_accuracies",)),
    Metric("rewards/margins", _for(PREFERENCE), True, "Mean reward of the chosen completions minus that of the "
           "rejected ones.", aliases=("rewards_margins",)),
    Metric("rewards/chosen", _for(PREFERENCE), True, "Mean reward of the chosen completions: beta (log pi - log "
           "pi_ref) (orpo: beta times the mean token log-probability).", aliases=("rewards_chosen",)),
    Metric("rewards/rejected", _for(PREFERENCE), False, "Mean reward of the rejected completions.",
           aliases=("rewards_rejected",)),
    Metric("logps/chosen", _for(PREFERENCE), True, "Mean log-probability (summed over its tokens) of a chosen "
           "completion.", aliases=("logps_chosen",)),
    Metric("logps/rejected", _for(PREFERENCE), False, "Mean log-probability of a rejected completion.",
           aliases=("logps_rejected",)),
)

_BY_NAME = {m.name: m for m in METRICS}
_ALIASES = {alias: m.name for m in METRICS for alias in m.aliases}


# ------------------------------------------------------------------------------------------ the table's answers
def canonical_name(name: str) -> Optional[str]:
    """The table's name for a metric name or alias; None when it is neither."""
    return name if name in _BY_NAME else _ALIASES.get(name)


def metric_names(output_type: str, model_type: str = "ecd", trainer_type: str = "finetune") -> list[str]:
    """What evaluation reports for an output of this type (or for COMBINED), in table order."""
    preference = model_type == "llm" and trainer_type in PREFERENCE_TRAINERS and output_type != COMBINED

    def applies(m: Metric) -> bool:
        return output_type in m.applies_to or (model_type == "llm" and output_type != COMBINED
                                               and LLM_TOKENS in m.applies_to) or (preference and
                                                                                   PREFERENCE in m.applies_to)
    return [m.name for m in METRICS if applies(m)]


def validation_metric_names(output_type: str, model_type: str = "ecd", trainer_type: str = "finetune") -> list[str]:
    """What a validation round during training computes: everything for ecd, the token metrics for an llm, the
    preference loss and rewards for an llm's preference trainers."""
    names = metric_names(output_type, model_type, trainer_type)
    if model_type == "llm":
        kind = PREFERENCE if trainer_type in PREFERENCE_TRAINERS else LLM_TOKENS
        return [n for n in names if kind in _BY_NAME[n].applies_to]
    return names


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` (a name or alias from METRICS) is an improvement."""
    name = canonical_name(metric)
    if name is None:
        hint = difflib.get_close_matches(metric, list(_BY_NAME) + list(_ALIASES), n=1)
        raise ValueError(f"unknown metric {metric!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    return _BY_NAME[name].higher_is_better


def is_better(metric: str, value: float, best: Optional[float]) -> bool:
    """Whether `value` improves on `best` (None: nothing yet). A NaN (metric undefined on this split) never
    improves, and any number improves on a NaN best, so one undefined round cannot freeze the best weights."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if higher_is_better(metric) else value < best


# ------------------------------------------------------------------------------------------ per output type
# Each returns exactly metric_names(type) minus "loss" (the model computes the loss with its own loss function).
# A metric that is undefined on the given rows (roc_auc with one class, hits_at_k without scores) is NaN, so every
# evaluation has the same keys.
def category_metrics(y_true: np.ndarray, y_pred: np.ndarray, probabilities: Optional[np.ndarray] = None,
                     num_classes: Optional[int] = None, top_k: int = 3) -> dict[str, float]:
    """y_true/y_pred: class indices; probabilities: (n, num_classes) or None (llm output without scores)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    precision, recall, f1 = _macro_precision_recall_f1(y_true, y_pred)
    out = {"accuracy": _mean(y_true == y_pred), "hits_at_k": math.nan, "precision": precision, "recall": recall,
           "f1": f1, "roc_auc": math.nan}
    if probabilities is not None and len(y_true):
        k = min(top_k, probabilities.shape[1])
        top = np.argsort(-probabilities, axis=1)[:, :k]
        out["hits_at_k"] = float(np.mean((top == y_true[:, None]).any(axis=1)))
        out["roc_auc"] = _one_vs_rest_roc_auc(y_true, probabilities)
    return out


def binary_metrics(y_true: np.ndarray, probability: np.ndarray, threshold: float) -> dict[str, float]:
    y_true = np.asarray(y_true).astype(bool)
    y_pred = np.asarray(probability) >= threshold
    tp, fp = int(np.sum(y_pred & y_true)), int(np.sum(y_pred & ~y_true))
    tn, fn = int(np.sum(~y_pred & ~y_true)), int(np.sum(~y_pred & y_true))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    auc = roc_auc(y_true, probability)
    return {"accuracy": _mean(y_true == y_pred), "precision": precision, "recall": recall,
            "specificity": _ratio(tn, tn + fp), "f1": _f1(precision, recall),
            "roc_auc": math.nan if auc is None else auc}


def number_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    y_true, y_pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    err = y_pred - y_true
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2)) if len(y_true) else 0.0
    mse = _mean(err**2)
    return {"mae": _mean(np.abs(err)), "mse": mse, "rmse": math.sqrt(mse),
            "r2": float(1 - np.sum(err**2) / ss_tot) if ss_tot > 0 else 0.0}


def set_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """y_true/y_pred: (n, num_labels) 0/1 matrices. Jaccard per row (two empty sets count as 1), averaged;
    precision/recall/f1 over all (row, label) pairs."""
    y_true, y_pred = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    inter = (y_true & y_pred).sum(axis=1)
    union = (y_true | y_pred).sum(axis=1)
    jaccard = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    tp = int((y_true & y_pred).sum())
    precision, recall = _ratio(tp, int(y_pred.sum())), _ratio(tp, int(y_true.sum()))
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "jaccard": _mean(jaccard)}


# ------------------------------------------------------------------------------------------ building blocks
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


def _one_vs_rest_roc_auc(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Macro average over the classes that occur both as the label and not as the label."""
    per_class = [roc_auc(y_true == c, probabilities[:, c]) for c in range(probabilities.shape[1])]
    defined = [auc for auc in per_class if auc is not None]
    return float(np.mean(defined)) if defined else math.nan


def _macro_precision_recall_f1(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float, float]:
    """Per class (every class that is a label or a prediction), then averaged, as sklearn's average='macro'."""
    classes = np.union1d(y_true, y_pred)
    if len(classes) == 0:
        return 0.0, 0.0, 0.0
    scores = []
    for c in classes:
        tp = int(np.sum((y_pred == c) & (y_true == c)))
        precision = _ratio(tp, int(np.sum(y_pred == c)))
        recall = _ratio(tp, int(np.sum(y_true == c)))
        scores.append((precision, recall, _f1(precision, recall)))
    return tuple(float(v) for v in np.mean(scores, axis=0))  # type: ignore[return-value]


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else 0.0
