"""One function per visualization of cadenza.plots.catalog.VISUALIZATIONS, named as it is: each reads its inputs,
computes what it shows (cadenza.plots.compute) and returns {file name without extension: Figure}.

Where Ludwig reads curve points, confusion matrices or per-class statistics from test statistics, so does Cadenza
when the files hold them (Ludwig's keys); Cadenza's own test_statistics.json holds scalar metrics only, so those
are then computed from the predictions (-pred/-prob) and the ground truth (-g)."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Optional

import numpy as np

from . import compute, draw
from .catalog import Request, flag
from .inputs import (UNSEEN, Classified, classified, model_labels, read_json_input, read_outputs,
                     select_features)
from ..errors import CadenzaError


# ------------------------------------------------------------------------------------------ learning curves
def learning_curves(request: Request) -> dict:
    runs = _training_runs(request)
    figures = {}
    for feature, metric in _feature_metrics(runs, request.output_feature_name):
        figure, (ax,) = draw.new_figure()
        draw.learning_curve_panel(ax, feature, metric, _curves(runs, feature, metric))
        figures[f"learning_curves_{feature}_{metric}"] = figure
    return figures


def learning_curves_overview(statistics: dict):
    """Every curve of one run in one figure (the run folder's learning_curves.png); None without any."""
    runs = [("", compute.learning_series(statistics))]
    pairs = _feature_metrics(runs, None, required=False)
    if not pairs:
        return None
    figure, axes = draw.new_figure(len(pairs), fixed_margins=True)
    for ax, (feature, metric) in zip(axes, pairs):
        draw.learning_curve_panel(ax, feature, metric, _curves(runs, feature, metric))
    return figure


def _training_runs(request: Request) -> list[tuple[str, compute.Series]]:
    files = request.training_statistics
    return [(model, compute.learning_series(read_json_input(path, "training_statistics")))
            for path, model in zip(files, model_labels(files, request.model_names))]


def _feature_metrics(runs, wanted: Optional[str], required: bool = True) -> list[tuple[str, str]]:
    """(output, metric) pairs with a curve in any run, in the order first met (the combined loss first)."""
    pairs: dict[tuple[str, str], None] = {}
    for _, series in runs:
        for split in series.values():
            for feature, metrics in split.items():
                pairs.update(((feature, metric), None) for metric in metrics)
    if not required and not pairs:
        return []
    features = select_features(list(dict.fromkeys(f for f, _ in pairs)), wanted, flag("training_statistics"))
    return [(f, m) for f, m in pairs if f in features]


def _curves(runs, feature: str, metric: str) -> list[tuple[str, list, list]]:
    def points(series, split):
        return series.get(split, {}).get(feature, {}).get(metric, [])
    return [(model, points(series, "training"), points(series, "validation")) for model, series in runs]


# ------------------------------------------------------------------------------------------ test metrics
def compare_performance(request: Request) -> dict:
    files = request.test_statistics
    statistics = [read_json_input(path, "test_statistics") for path in files]
    models = model_labels(files, request.model_names)
    common = [f for f in statistics[0] if all(isinstance(s.get(f), dict) for s in statistics)]
    figures = {}
    for feature in select_features(common, request.output_feature_name, flag("test_statistics")):
        metrics = _comparable_metrics([s[feature] for s in statistics])
        if not metrics:
            continue  # "combined" holds the loss alone
        figure, (ax,) = draw.new_figure(size=(max(4.8, 0.5 * len(metrics) * (len(models) + 1)), 3.8))
        draw.bars_panel(ax, metrics, {m: [s[feature][k] for k in metrics] for m, s in zip(models, statistics)},
                        f"performance comparison on {feature}", "value")
        figures[f"compare_performance_{feature}"] = figure
    return figures


def _comparable_metrics(per_model: list[dict]) -> list[str]:
    """Metrics with a number in every model's statistics, but the loss (as Ludwig: its scale is not the others').
    A metric undefined in a model (null: roc_auc with one class) is left out for all."""
    return [k for k in per_model[0]
            if k != "loss" and all(compute.is_number(stats.get(k)) for stats in per_model)]


# ------------------------------------------------------------------------------------------ confusion matrix
def confusion_matrix(request: Request) -> dict:
    figures = {}
    for model, output, counts, labels in _confusion_matrices(request):
        for k in request.top_n_classes:
            top = min(k, len(labels)) if k > 0 else len(labels)
            values = counts[:top, :top]
            values = compute.normalize_rows(values) if request.normalize else values
            figure, (ax,) = draw.new_figure(size=_matrix_size(top))
            draw.confusion_matrix_panel(ax, values, labels[:top], _title(model, output), request.normalize)
            figures[f"confusion_matrix_{model}_{output}_top{top}"] = figure
    return figures


def confusion_matrices_overview(request: Request):
    """One panel per category output of one run (the run folder's confusion_matrix.png); None without any."""
    if not any(o.type == "category" for o in read_outputs(request.ground_truth_metadata).values()):
        return None
    items = classified(request, "predictions", kinds=("category",))
    matrices = [_counts(c) for c in items]
    figure, axes = draw.new_figure(len(items), size=_matrix_size(max(len(labels) for _, labels in matrices)))
    for ax, c, (counts, labels) in zip(axes, items, matrices):
        draw.confusion_matrix_panel(ax, counts, labels, c.output.name, normalized=False)
    return figure


def _confusion_matrices(request: Request):
    """(model, output, counts[true, predicted], class labels) per model and output."""
    stored = _from_statistics(request, "confusion_matrix", "category or binary")
    if stored is not None:
        outputs = read_outputs(request.ground_truth_metadata)
        for model, output, statistics in stored:
            counts = np.asarray(statistics["confusion_matrix"], dtype=float)
            yield model, output, counts, _stored_labels(outputs.get(output), len(counts))
        return
    for c in classified(request, "predictions"):
        counts, labels = _counts(c)
        yield c.model, c.output.name, counts, labels


def _counts(c: Classified) -> tuple[np.ndarray, list[str]]:
    """The confusion matrix in the model's class order, plus an UNSEEN class when the truth holds labels the
    model never saw in training: evaluation counts them as errors, and so does the matrix."""
    labels = list(c.output.labels)
    truth, predicted = c.truth, c.predicted
    if (truth < 0).any() or (predicted < 0).any():
        labels.append(UNSEEN)
        truth, predicted = np.where(truth < 0, len(labels) - 1, truth), np.where(predicted < 0, len(labels) - 1,
                                                                                 predicted)
    return compute.confusion_matrix(truth, predicted, len(labels)), labels


def _stored_labels(output, size: int) -> list[str]:
    labels = list(output.labels) if output is not None else []
    return labels if len(labels) == size else [str(i) for i in range(size)]


def _matrix_size(classes: int) -> tuple[float, float]:
    side = min(3.0 + 0.45 * classes, 14.0)
    return side + 1.2, side


# ------------------------------------------------------------------------------------------ curves
def roc_curves_from_test_statistics(request: Request) -> dict:
    def from_statistics(statistics):
        curve = statistics["roc_curve"]
        return np.asarray(curve["false_positive_rate"]), np.asarray(curve["true_positive_rate"])

    lines = _curve_lines(request, "roc_curve", from_statistics, compute.roc_points, with_auc=True)
    return {f"roc_curves_{output}": _lines_figure(found, f"ROC curves: {output}", "false positive rate",
                                                  "true positive rate", diagonal=((0, 1), (0, 1)))
            for output, found in lines.items()}


def precision_recall_curves_from_test_statistics(request: Request) -> dict:
    def from_statistics(statistics):
        curve = statistics["precision_recall_curve"]
        return np.asarray(curve["recalls"]), np.asarray(curve["precisions"])

    lines = _curve_lines(request, "precision_recall_curve", from_statistics, compute.precision_recall_points)
    return {f"precision_recall_curves_{output}": _lines_figure(found, f"precision-recall curves: {output}",
                                                               "recall", "precision")
            for output, found in lines.items()}


def _curve_lines(request: Request, key: str, from_statistics, from_scores, with_auc: bool = False) -> dict:
    """{output: [(label, x, y)]}: the curve points in the test statistics (Ludwig's `key`) or, where those have
    none, computed from the predicted probabilities against the truth for each positive class."""
    lines = defaultdict(list)
    stored = _from_statistics(request, key, "binary")
    if stored is not None:
        for model, output, statistics in stored:
            x, y = from_statistics(statistics)
            lines[output].append((_with_auc(model, x, y) if with_auc else model, x, y))
        return lines
    for c in classified(request, "probabilities"):
        scores = c.probabilities()
        for cls in _positive_classes(c, request.top_n_classes):
            positive = c.truth == cls
            if positive.all() or not positive.any():
                continue  # one class only: no curve exists
            x, y = from_scores(positive, scores[:, cls])
            label = c.model if c.output.type == "binary" else _join(c.model, c.output.labels[cls])
            lines[c.output.name].append((_with_auc(label, x, y) if with_auc else label, x, y))
    return lines


def _positive_classes(c: Classified, top_n: list[int]) -> list[int]:
    """binary: the true class; category: each of the most frequent top_n[0] classes against the rest."""
    return [1] if c.output.type == "binary" else _top_classes(len(c.output.labels), top_n)


def _top_classes(classes: int, top_n: list[int]) -> list[int]:
    return list(range(min(top_n[0], classes) if top_n[0] > 0 else classes))


def _with_auc(label: str, x: np.ndarray, y: np.ndarray) -> str:
    return _join(label, f"(AUC {compute.area_under(x, y):.3f})")


def _lines_figure(lines, title: str, xlabel: str, ylabel: str, diagonal=None):
    figure, (ax,) = draw.new_figure(size=(5.2, 4.4))
    draw.lines_panel(ax, lines, title, xlabel, ylabel, diagonal=diagonal)
    return figure


def calibration_1_vs_all(request: Request) -> dict:
    by_output = defaultdict(list)
    for c in classified(request, "probabilities"):
        by_output[c.output.name].append(c)
    figures = {}
    for output, models in by_output.items():
        labels = models[0].output.labels
        classes = _top_classes(len(labels), request.top_n_classes)
        brier = {c.model: [] for c in models}
        for cls in classes:
            lines = []
            for c in models:
                positive, scores = c.truth == cls, c.probabilities()[:, cls]
                lines.append((c.model, *compute.calibration_bins(positive, scores)))
                brier[c.model].append(compute.brier_score(positive, scores))
            figures[f"calibration_1_vs_all_{output}_{cls}"] = _lines_figure(
                lines, f"calibration {output}: {labels[cls]} against the rest", "mean predicted probability",
                "share of positives", diagonal=((0, 1), (0, 1)))
        figure, (ax,) = draw.new_figure(size=(max(4.8, 0.6 * len(classes) * (len(models) + 1)), 3.8))
        draw.bars_panel(ax, [labels[c] for c in classes], brier, f"Brier score per class: {output}",
                        "Brier score (lower is better)")
        figures[f"calibration_1_vs_all_{output}_brier"] = figure
    return figures


# ------------------------------------------------------------------------------------------ per class
F1_COLOUR, FREQUENCY_COLOUR = "C0", "C1"  # the same in both panels, whichever axis each one is on


def frequency_vs_f1(request: Request) -> dict:
    figures = {}
    for model, output, f1, frequency, frequency_name in _per_class(request):
        top = len(_top_classes(len(f1), request.top_n_classes))
        labels, f1, frequency = np.array(output.labels[:top]), f1[:top], frequency[:top]
        figure, (by_f1, by_frequency) = draw.new_figure(2, size=(max(4.8, 0.4 * top + 2), 3.8))
        order = np.argsort(-f1, kind="stable")
        draw.two_scales_panel(by_f1, labels[order], ("F1", f1[order], F1_COLOUR),
                              (frequency_name, frequency[order], FREQUENCY_COLOUR),
                              f"{_title(model, output.name)}: classes by F1")
        order = np.argsort(-frequency, kind="stable")
        draw.two_scales_panel(by_frequency, labels[order], (frequency_name, frequency[order], FREQUENCY_COLOUR),
                              ("F1", f1[order], F1_COLOUR), f"{_title(model, output.name)}: classes by frequency")
        figures[f"frequency_vs_f1_{model}_{output.name}"] = figure
    return figures


def _per_class(request: Request):
    """(model, Output, F1 per class, frequency per class, what the frequency counts), in the model's class order.
    Frequencies are the training set's (from -gm) where the metadata has them (ecd), else the ground truth's."""
    outputs = read_outputs(request.ground_truth_metadata)
    stored = _from_statistics(request, "per_class_stats", "category")
    if stored is not None:
        for model, name, statistics in stored:
            output = outputs.get(name)
            if output is None or not output.counts:
                raise CadenzaError(f"frequency_vs_f1: {flag('ground_truth_metadata')} has no training counts for "
                                   f"{name!r}")
            f1 = [(statistics["per_class_stats"].get(label) or {}).get("f1_score") for label in output.labels]
            yield model, output, np.nan_to_num(np.array(f1, dtype=float)), _training_counts(output), "frequency"
        return
    for c in classified(request, "predictions", kinds=("category",)):
        f1 = compute.per_class_f1(_counts(c)[0])[:len(c.output.labels)]
        if c.output.counts:
            yield c.model, c.output, f1, _training_counts(c.output), "frequency"
        else:
            in_truth = np.bincount(c.truth[c.truth >= 0], minlength=len(c.output.labels)).astype(float)
            yield c.model, c.output, f1, in_truth, f"frequency in {flag('ground_truth')}"


def _training_counts(output) -> np.ndarray:
    return np.array([output.counts.get(label, 0) for label in output.labels], dtype=float)


# ------------------------------------------------------------------------------------------ hyperopt
def hyperopt_report(request: Request) -> dict:
    """Ludwig's hyperopt_statistics.json: hyperopt_config {parameters: {name: {space, ...}}, metric} and
    hyperopt_results [{parameters, metric_score, ...}]."""
    path = request.hyperopt_stats_path
    statistics = read_json_input(path, "hyperopt_stats_path")
    config = statistics.get("hyperopt_config") or {}
    parameters, metric = config.get("parameters") or {}, config.get("metric") or "metric_score"
    trials = [t for t in statistics.get("hyperopt_results") or [] if compute.is_number(t.get("metric_score"))]
    if not parameters or not trials:
        raise CadenzaError(f"{flag('hyperopt_stats_path')} {path}: needs hyperopt_config.parameters and "
                           "hyperopt_results with a metric_score (no finished trial found)")
    scores = [t["metric_score"] for t in trials]
    values = {name: [_plain((t.get("parameters") or {}).get(name)) for t in trials] for name in parameters}
    figures = {}
    for name, space in parameters.items():
        figure, (ax,) = draw.new_figure()
        draw.scatter_panel(ax, values[name], scores, name, metric, f"hyperopt: {name}",
                           log_x=_log_space(space))
        figures[f"hyperopt_{name}"] = figure
    if len(parameters) > 1:
        figures["hyperopt_pair_plot"] = _pair_plot(values, scores, metric)
    return figures


def _pair_plot(values: dict[str, list], scores: list[float], metric: str):
    """The mean metric over each pair of parameters (numbers with many distinct values in quantile bins)."""
    names = sorted(values)
    binned = {name: compute.bin_numbers(values[name]) for name in names}
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    figure, axes = draw.new_figure(len(pairs))
    for ax, (a, b) in zip(axes, pairs):
        rows, columns, means = compute.pair_means(binned[a][0], binned[b][0], scores)
        draw.heatmap_panel(ax, rows, columns, means, _binned_name(a, binned[a][1]), _binned_name(b, binned[b][1]),
                           f"mean {metric}")
    return figure


def _binned_name(name: str, binned: bool) -> str:
    return f"{name} (quantile bins, lower edge)" if binned else name


def _log_space(space) -> bool:
    space = space if isinstance(space, dict) else {}
    return space.get("scale") == "log" or str(space.get("space", "")).startswith(("log", "qlog"))


def _plain(value):
    # a choice among lists or dicts (e.g. layer sizes) is one category: compare it by its JSON text
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)


# ------------------------------------------------------------------------------------------ shared
def _from_statistics(request: Request, key: str, kinds: str) -> Optional[list[tuple[str, str, dict]]]:
    """(model, output, its statistics) for each output holding `key` in every -tes file; None when they hold none
    (Cadenza's evaluation writes scalar metrics only) and the predictions can stand in. Without -pred/-prob, a
    CadenzaError says which flags compute it instead."""
    files = request.test_statistics
    if files:
        statistics = [read_json_input(path, "test_statistics") for path in files]
        names = [name for name, values in statistics[0].items()
                 if all(key in (s.get(name) or {}) for s in statistics)]
        if names:
            chosen = select_features(names, request.output_feature_name, f"{flag('test_statistics')} ({key})")
            models = model_labels(files, request.model_names)
            return [(model, name, s[name]) for model, s in zip(models, statistics) for name in chosen]
    if not (request.given("predictions") and request.given("ground_truth") and request.given("ground_truth_metadata")):
        raise CadenzaError(f"the test statistics hold no {key} of a {kinds} output (Cadenza's evaluation writes "
                           f"scalar metrics only): give {flag('probabilities')} (or {flag('predictions')}) "
                           f"predictions.csv, {flag('ground_truth')} the data set and {flag('ground_truth_metadata')}"
                           " training_set_metadata.json to compute it")
    return None


def _title(model: str, output: str) -> str:
    return _join(model, output)


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)
