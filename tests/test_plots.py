"""cadenza visualize and the experiment's plots: the plotted data (line points, matrix cells, bar heights read back
from the Figures' artists) against the statistics Cadenza writes and against scikit-learn.

Most tests need no training: `hand_made_run` writes a run folder by hand in the layout Cadenza writes, with test
statistics computed by cadenza.metrics from the same predictions. One test trains a tiny ecd model through
`experiment` and plots its run folder."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

from cadenza import metrics  # noqa: E402
from cadenza.artifacts import write_json  # noqa: E402
from cadenza.cli import main  # noqa: E402
from cadenza.errors import CadenzaError  # noqa: E402
from cadenza.plots import Request, figures, visualize, write_run_plots  # noqa: E402
from cadenza.plots import compute  # noqa: E402

LABELS = ["neg", "pos", "mid"]               # the model's vocabulary: most frequent in training first
TRAINING_COUNTS = {"neg": 30, "pos": 25, "mid": 10}
ROWS = 40


# ------------------------------------------------------------------------------------------ a run, by hand
def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def run(tmp_path):
    """A run folder in Cadenza's layout: category `sentiment` (one true label the model never saw), binary
    `liked` (true labels written yes/no; probabilities with ties), number `rating`."""
    rng = np.random.default_rng(0)
    truth = rng.choice(LABELS, ROWS)
    truth[0] = "meh"  # not in the vocabulary: evaluation counts it as an error
    truth_index = np.array([LABELS.index(t) if t in LABELS else -1 for t in truth])
    probabilities = _softmax(rng.normal(size=(ROWS, 3)) + 1.5 * np.eye(3)[np.maximum(truth_index, 0)])
    liked = rng.random(ROWS) < 0.4
    p_true = np.round(np.clip(0.3 + 0.4 * liked + rng.normal(0, 0.2, ROWS), 0, 1), 1)  # rounded: tied scores
    rating = rng.normal(size=ROWS)

    data = pd.DataFrame({"review": [f"review {i}" for i in range(ROWS)], "sentiment": truth,
                         "liked": np.where(liked, "yes", "no"), "rating": rating})
    predictions = pd.DataFrame({"sentiment_predictions": [LABELS[i] for i in probabilities.argmax(1)],
                                "sentiment_probability": probabilities.max(1),
                                **{f"sentiment_probabilities_{label}": probabilities[:, j]
                                   for j, label in enumerate(LABELS)},
                                "liked_predictions": p_true >= 0.5, "liked_probability": np.where(
                                    p_true >= 0.5, p_true, 1 - p_true), "liked_probabilities_true": p_true,
                                "rating_predictions": rating + rng.normal(0, 0.5, ROWS)})
    test_statistics = {
        "sentiment": {"loss": 0.9, **metrics.category_metrics(truth_index, probabilities.argmax(1), probabilities)},
        "liked": {"loss": 0.6, **metrics.binary_metrics(liked, p_true, 0.5)},
        "rating": {"loss": 0.3, **metrics.number_metrics(rating, predictions["rating_predictions"])},
        "combined": {"loss": 1.8}}
    metadata = {
        "review": {"type": "text", "column": "review"},
        "genre": {"type": "category", "column": "genre", "vocab": ["<UNK>", "a", "b"]},  # an input feature
        "sentiment": {"type": "category", "column": "sentiment", "fill_value": "<UNK>", "vocab": LABELS,
                      "counts": TRAINING_COUNTS},
        "liked": {"type": "binary", "column": "liked", "fill_value": None, "fallback_true_label": None,
                  "labels": []},
        "rating": {"type": "number", "column": "rating", "mean": 0.0, "std": 1.0}}
    config = {"model_type": "ecd", "input_features": [{"name": "review", "type": "text"},
                                                      {"name": "genre", "type": "category"}],
              "output_features": [{"name": "sentiment", "type": "category", "column": None,
                                   "preprocessing": {"lowercase": False}},
                                  {"name": "liked", "type": "binary"}, {"name": "rating", "type": "number"}]}

    folder = tmp_path / "experiment_run"
    (folder / "model").mkdir(parents=True)
    write_json(folder / "training_statistics.json", _training_statistics())
    write_json(folder / "test_statistics.json", test_statistics)
    predictions.to_csv(folder / "predictions.csv", index=False)
    write_json(folder / "model" / "training_set_metadata.json", metadata)
    write_json(folder / "model" / "model_hyperparameters.json", config)
    data.to_csv(tmp_path / "data.csv", index=False)
    return {"dir": folder, "trs": folder / "training_statistics.json", "tes": folder / "test_statistics.json",
            "pred": folder / "predictions.csv", "gm": folder / "model" / "training_set_metadata.json",
            "g": tmp_path / "data.csv", "stats": test_statistics, "truth": truth, "liked": liked, "p_true": p_true,
            "probabilities": probabilities}


def _training_statistics(shift: float = 0.0) -> dict:
    """Cadenza's layout: per epoch, the training loss (with timings) and validation metrics per output; one
    evaluation inside epoch 2 (trainer.eval_steps); roc_auc undefined (null) in epoch 1."""
    losses, accuracies = [1.2 + shift, 0.9 + shift, 0.7 + shift], [0.5, 0.6, 0.8]
    return {"training": [{"loss": loss, "seconds": 0.1, "rows_per_second": 900.0} for loss in losses],
            "validation": [{"sentiment": {"loss": loss + 0.1, "accuracy": acc, "roc_auc": None if i == 0 else acc},
                            "combined": {"loss": loss + 0.1}} for i, (loss, acc) in enumerate(zip(losses, accuracies))],
            "validation_steps": [{"epoch": 2, "step": 6, "sentiment": {"loss": 1.5, "accuracy": 0.55, "roc_auc": 0.6},
                                  "combined": {"loss": 1.5}}],
            "best_epoch": 3, "best_step": 12, "steps": 12, "precision": {"precision": "fp32"}, "seconds": 1.0}


def _line(ax, label):
    found = [line for line in ax.get_lines() if line.get_label() == label]
    assert len(found) == 1, f"no line {label!r} among {[line.get_label() for line in ax.get_lines()]}"
    return np.asarray(found[0].get_xdata(), dtype=float), np.asarray(found[0].get_ydata(), dtype=float)


def _bars(ax) -> dict[str, list[float]]:
    return {c.get_label(): [bar.get_height() for bar in c] for c in ax.containers}


def _tick_texts(axis) -> list[str]:
    axis.figure.draw_without_rendering()
    return [t.get_text() for t in axis.get_ticklabels()]


# ------------------------------------------------------------------------------------------ learning curves
def test_learning_curves_plot_each_epoch_value_and_the_step_evaluations(run, tmp_path):
    other = tmp_path / "other" / "training_statistics.json"
    other.parent.mkdir()
    write_json(other, _training_statistics(shift=0.5))
    drawn = figures("learning_curves", Request(training_statistics=[run["trs"], other], model_names=["a", "b"]))
    # timings and throughput are not metrics; every (output, metric) with a value is
    assert set(drawn) == {"learning_curves_combined_loss", "learning_curves_sentiment_loss",
                          "learning_curves_sentiment_accuracy", "learning_curves_sentiment_roc_auc"}

    ax = drawn["learning_curves_combined_loss"].axes[0]
    for model, shift in (("a", 0.0), ("b", 0.5)):
        stats = _training_statistics(shift)
        x, y = _line(ax, f"{model} training")
        assert list(x) == [1, 2, 3] and np.allclose(y, [e["loss"] for e in stats["training"]])
        x, y = _line(ax, f"{model} validation")  # epoch ends, and step 6 of 12 in 3 epochs: epoch 1.5
        assert list(x) == [1, 1.5, 2, 3]
        assert np.allclose(y, [stats["validation"][0]["combined"]["loss"], 1.5,
                               *[e["combined"]["loss"] for e in stats["validation"][1:]]])

    x, y = _line(drawn["learning_curves_sentiment_roc_auc"].axes[0], "a validation")
    assert list(x) == [1.5, 2, 3] and list(y) == [0.6, 0.6, 0.8]  # the null of epoch 1 is no point
    assert [line.get_label() for line in drawn["learning_curves_sentiment_accuracy"].axes[0].get_lines()] == [
        "a validation", "b validation"]  # Cadenza's training entries hold the loss alone


def test_learning_curves_read_ludwigs_layout_and_select_one_output(tmp_path):
    ludwig = {"training": {"combined": {"loss": [1.0, 0.8]}, "label": {"loss": [1.0, 0.8], "accuracy": [0.5, 0.7]}},
              "validation": {"combined": {"loss": [1.1, 0.9]}, "label": {"loss": [1.1, 0.9], "accuracy": [0.4, 0.6]}}}
    path = tmp_path / "training_statistics.json"
    write_json(path, ludwig)
    drawn = figures("learning_curves", Request(training_statistics=[path], output_feature_name="label"))
    assert set(drawn) == {"learning_curves_label_loss", "learning_curves_label_accuracy"}
    ax = drawn["learning_curves_label_accuracy"].axes[0]
    assert list(_line(ax, f"{tmp_path.name} training")[1]) == [0.5, 0.7]
    assert list(_line(ax, f"{tmp_path.name} validation")[1]) == [0.4, 0.6]


# ------------------------------------------------------------------------------------------ test metrics
def test_compare_performance_bars_are_the_test_metrics_of_each_model(run, tmp_path):
    second = json.loads(run["tes"].read_text())
    second["sentiment"]["accuracy"] = 0.123
    second["sentiment"]["roc_auc"] = None  # undefined in one model: left out for both
    other = tmp_path / "b" / "test_statistics.json"
    other.parent.mkdir()
    write_json(other, second)
    drawn = figures("compare_performance", Request(test_statistics=[run["tes"], other], model_names=["a", "b"]))
    assert set(drawn) == {"compare_performance_sentiment", "compare_performance_liked", "compare_performance_rating"}

    ax = drawn["compare_performance_sentiment"].axes[0]
    shown = ["accuracy", "hits_at_k", "precision", "recall", "f1"]
    assert _tick_texts(ax.xaxis) == shown  # no loss, no roc_auc
    bars = _bars(ax)
    assert np.allclose(bars["a"], [run["stats"]["sentiment"][k] for k in shown])
    assert np.allclose(bars["b"], [second["sentiment"][k] for k in shown]) and bars["b"][0] == pytest.approx(0.123)
    liked = _bars(drawn["compare_performance_liked"].axes[0])["a"]
    assert np.allclose(liked, [run["stats"]["liked"][k] for k in ("accuracy", "precision", "recall", "specificity",
                                                                    "f1", "roc_auc")])


# ------------------------------------------------------------------------------------------ confusion matrix
def _inputs(run, **extra) -> Request:
    return Request(predictions=[run["pred"]], ground_truth=run["g"], ground_truth_metadata=run["gm"], **extra)


def test_confusion_matrix_counts_each_true_and_predicted_pair(run):
    drawn = figures("confusion_matrix", _inputs(run, top_n_classes=[0, 2]))
    assert set(drawn) == {"confusion_matrix_experiment_run_sentiment_top4", "confusion_matrix_experiment_run_sentiment_top2",
                          "confusion_matrix_experiment_run_liked_top2"}

    ax = drawn["confusion_matrix_experiment_run_sentiment_top4"].axes[0]
    cells = np.asarray(ax.images[0].get_array())
    predicted = pd.read_csv(run["pred"])["sentiment_predictions"]
    order = LABELS + ["<UNK>"]  # the vocabulary, then the true label the model never saw
    truth = [t if t in LABELS else "<UNK>" for t in run["truth"]]
    expected = pd.crosstab(pd.Categorical(truth, order), pd.Categorical(predicted, order), dropna=False)
    assert np.array_equal(cells, expected.to_numpy())
    assert _tick_texts(ax.yaxis) == order
    assert np.trace(cells) / cells.sum() == pytest.approx(run["stats"]["sentiment"]["accuracy"])
    # the written counts are the cells
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted(cells.ravel().tolist())

    top2 = np.asarray(drawn["confusion_matrix_experiment_run_sentiment_top2"].axes[0].images[0].get_array())
    assert np.array_equal(top2, cells[:2, :2])
    binary = np.asarray(drawn["confusion_matrix_experiment_run_liked_top2"].axes[0].images[0].get_array())
    hits = run["p_true"] >= 0.5
    assert binary.tolist() == [[np.sum(~run["liked"] & ~hits), np.sum(~run["liked"] & hits)],
                               [np.sum(run["liked"] & ~hits), np.sum(run["liked"] & hits)]]
    assert np.trace(binary) / ROWS == pytest.approx(run["stats"]["liked"]["accuracy"])

    normalized = figures("confusion_matrix", _inputs(run, normalize=True, output_feature_name="sentiment"))
    shares = np.asarray(next(iter(normalized.values())).axes[0].images[0].get_array())
    assert np.allclose(shares, cells / cells.sum(axis=1, keepdims=True))


def test_confusion_matrix_from_test_statistics_that_hold_one(run, tmp_path):
    stats = json.loads(run["tes"].read_text())
    stats["sentiment"]["confusion_matrix"] = [[5, 1, 0], [2, 7, 1], [0, 3, 4]]  # Ludwig's key
    path = tmp_path / "ludwig" / "test_statistics.json"
    path.parent.mkdir()
    write_json(path, stats)
    drawn = figures("confusion_matrix", Request(test_statistics=[path], ground_truth_metadata=run["gm"]))
    ax = drawn["confusion_matrix_ludwig_sentiment_top3"].axes[0]
    assert np.asarray(ax.images[0].get_array()).tolist() == stats["sentiment"]["confusion_matrix"]
    assert _tick_texts(ax.xaxis) == LABELS


def test_llm_metadata_names_its_classes_through_the_config_beside_it(tmp_path):
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    write_json(model / "training_set_metadata.json", {"model_type": "llm", "labels": ["no", "yes"]})
    write_json(model / "model_hyperparameters.json", {"model_type": "llm", "output_features": [
        {"name": "answer", "type": "category", "column": "label"}]})
    pd.DataFrame({"answer_predictions": ["yes", "no", "yes", "maybe"]}).to_csv(tmp_path / "run" / "p.csv", index=False)
    pd.DataFrame({"label": ["yes", "yes", "no", "no"]}).to_csv(tmp_path / "truth.csv", index=False)
    drawn = figures("confusion_matrix", Request(predictions=[tmp_path / "run" / "p.csv"], ground_truth=tmp_path / "truth.csv",
                                                ground_truth_metadata=model / "training_set_metadata.json"))
    ax = drawn["confusion_matrix_run_answer_top3"].axes[0]
    assert _tick_texts(ax.xaxis) == ["no", "yes", "<UNK>"]  # a generated label outside the labels
    # true no: predicted yes, then "maybe"; true yes: predicted yes, then no
    assert np.asarray(ax.images[0].get_array()).tolist() == [[0, 1, 1], [1, 1, 0], [0, 0, 0]]


# ------------------------------------------------------------------------------------------ curves
def test_roc_curves_agree_with_the_test_auc_and_scikit_learn(run):
    from sklearn.metrics import roc_curve

    drawn = figures("roc_curves_from_test_statistics", Request(probabilities=[run["pred"]], ground_truth=run["g"],
                                                               ground_truth_metadata=run["gm"]))
    ax = drawn["roc_curves_liked"].axes[0]
    [line] = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    assert compute.area_under(x, y) == pytest.approx(run["stats"]["liked"]["roc_auc"], abs=1e-12)
    fpr, tpr, _ = roc_curve(run["liked"], run["p_true"], drop_intermediate=False)
    assert np.allclose(x, fpr) and np.allclose(y, tpr)
    assert line.get_label() == f"experiment_run (AUC {run['stats']['liked']['roc_auc']:.3f})"

    # category: each class against the rest; their mean AUC is the test statistics' roc_auc
    ax = drawn["roc_curves_sentiment"].axes[0]
    areas = [compute.area_under(np.asarray(line.get_xdata()), np.asarray(line.get_ydata()))
             for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert len(areas) == 3 and np.mean(areas) == pytest.approx(run["stats"]["sentiment"]["roc_auc"], abs=1e-12)


def test_precision_recall_curves_pass_through_the_test_precision_and_recall(run):
    from sklearn.metrics import precision_recall_curve

    drawn = figures("precision_recall_curves_from_test_statistics", _inputs(run, output_feature_name="liked"))
    recall, precision = _line(drawn["precision_recall_curves_liked"].axes[0], "experiment_run")
    stats = run["stats"]["liked"]  # at the output's threshold, 0.5
    assert np.any(np.isclose(recall, stats["recall"]) & np.isclose(precision, stats["precision"]))
    expected_precision, expected_recall, _ = precision_recall_curve(run["liked"], run["p_true"])
    assert np.allclose(recall, expected_recall[::-1]) and np.allclose(precision, expected_precision[::-1])


def test_curves_stored_in_test_statistics_are_plotted_as_stored(tmp_path):
    stats = {"label": {"roc_curve": {"false_positive_rate": [0, 0.5, 1], "true_positive_rate": [0, 0.9, 1]},
                       "precision_recall_curve": {"recalls": [0, 0.5, 1], "precisions": [1, 0.8, 0.6]}}}
    path = tmp_path / "test_statistics.json"
    write_json(path, stats)
    roc = figures("roc_curves_from_test_statistics", Request(test_statistics=[path], model_names=["m"]))
    x, y = _line(roc["roc_curves_label"].axes[0], "m (AUC 0.700)")
    assert list(x) == [0, 0.5, 1] and list(y) == [0, 0.9, 1]
    pr = figures("precision_recall_curves_from_test_statistics", Request(test_statistics=[path], model_names=["m"]))
    assert list(_line(pr["precision_recall_curves_label"].axes[0], "m")[1]) == [1, 0.8, 0.6]


def test_calibration_bins_and_brier_scores_match_scikit_learn(run):
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    drawn = figures("calibration_1_vs_all", _inputs(run, output_feature_name="sentiment"))
    assert set(drawn) == {"calibration_1_vs_all_sentiment_0", "calibration_1_vs_all_sentiment_1",
                          "calibration_1_vs_all_sentiment_2", "calibration_1_vs_all_sentiment_brier"}
    truth = np.array([LABELS.index(t) if t in LABELS else -1 for t in run["truth"]])
    expected_brier = []
    for cls in range(3):
        positive, scores = truth == cls, run["probabilities"][:, cls]
        mean_predicted, share = _line(drawn[f"calibration_1_vs_all_sentiment_{cls}"].axes[0], "experiment_run")
        expected_share, expected_mean = calibration_curve(positive, scores, n_bins=21)
        assert np.allclose(share, expected_share) and np.allclose(mean_predicted, expected_mean)
        expected_brier.append(brier_score_loss(positive, scores))
    assert np.allclose(_bars(drawn["calibration_1_vs_all_sentiment_brier"].axes[0])["experiment_run"],
                       expected_brier)


# ------------------------------------------------------------------------------------------ per class
def test_frequency_vs_f1_shows_each_class_f1_and_training_count(run):
    from sklearn.metrics import f1_score

    drawn = figures("frequency_vs_f1", _inputs(run))
    assert set(drawn) == {"frequency_vs_f1_experiment_run_sentiment"}  # category outputs only
    by_f1, by_frequency = drawn["frequency_vs_f1_experiment_run_sentiment"].axes[:2]
    predicted = pd.read_csv(run["pred"])["sentiment_predictions"]
    truth = [t if t in LABELS else "<UNK>" for t in run["truth"]]
    expected = dict(zip(LABELS, f1_score(truth, predicted, labels=LABELS, average=None)))

    order = _tick_texts(by_f1.xaxis)
    f1 = _line(by_f1, "F1")[1]
    assert sorted(order) == sorted(LABELS) and list(f1) == sorted(f1, reverse=True)
    assert np.allclose(f1, [expected[label] for label in order])
    frequency = _line(by_f1.figure.axes[2], "frequency")[1]  # the twin axis of the first panel
    assert list(frequency) == [TRAINING_COUNTS[label] for label in order]
    # the macro F1 of the test statistics averages these and the unseen label's 0
    assert (sum(f1) + 0.0) / 4 == pytest.approx(run["stats"]["sentiment"]["f1"])

    assert _tick_texts(by_frequency.xaxis) == LABELS  # sorted by training frequency
    assert list(_line(by_frequency, "frequency")[1]) == [30, 25, 10]


# ------------------------------------------------------------------------------------------ hyperopt
def test_hyperopt_report_plots_each_trial_and_the_mean_of_each_pair(tmp_path):
    rng = np.random.default_rng(1)
    trials = [{"parameters": {"trainer.learning_rate": float(lr), "trainer.batch_size": int(bs),
                              "trainer.optimizer.type": opt},
               "metric_score": float(score), "training_stats": {}, "eval_stats": {}}
              for lr, bs, opt, score in zip(10 ** rng.uniform(-5, -2, 24), rng.choice([8, 16, 32], 24),
                                            rng.choice(["adam", "sgd"], 24), rng.uniform(0.2, 1.0, 24))]
    trials.append({"parameters": {"trainer.learning_rate": 0.1, "trainer.batch_size": 8,
                                  "trainer.optimizer.type": "adam"}, "metric_score": None})  # a failed trial
    path = tmp_path / "hyperopt_statistics.json"
    write_json(path, {"hyperopt_config": {"metric": "loss", "goal": "minimize", "output_feature": "combined",
                                          "parameters": {
                                              "trainer.learning_rate": {"space": "loguniform", "lower": 1e-5,
                                                                        "upper": 1e-2},
                                              "trainer.batch_size": {"space": "choice", "categories": [8, 16, 32]},
                                              "trainer.optimizer.type": {"space": "choice",
                                                                         "categories": ["adam", "sgd"]}}},
                      "hyperopt_results": trials})
    drawn = figures("hyperopt_report", Request(hyperopt_stats_path=path))
    assert set(drawn) == {"hyperopt_trainer.learning_rate", "hyperopt_trainer.batch_size",
                          "hyperopt_trainer.optimizer.type", "hyperopt_pair_plot"}
    finished = trials[:-1]
    scores = [t["metric_score"] for t in finished]

    ax = drawn["hyperopt_trainer.learning_rate"].axes[0]
    points = ax.collections[0].get_offsets()
    assert np.allclose(points, [[t["parameters"]["trainer.learning_rate"], t["metric_score"]] for t in finished])
    assert ax.get_xscale() == "log"
    ax = drawn["hyperopt_trainer.optimizer.type"].axes[0]
    assert _tick_texts(ax.xaxis) == ["adam", "sgd"]
    assert np.allclose(ax.collections[0].get_offsets()[:, 0],
                       [["adam", "sgd"].index(t["parameters"]["trainer.optimizer.type"]) for t in finished])

    # pairs in name order; batch size × optimizer: the mean loss of each combination
    pair_axes = [a for a in drawn["hyperopt_pair_plot"].axes if a.images]
    assert len(pair_axes) == 3
    ax = next(a for a in pair_axes if a.get_ylabel() == "trainer.batch_size" and a.get_xlabel() == "trainer.optimizer.type")
    frame = pd.DataFrame({"bs": [t["parameters"]["trainer.batch_size"] for t in finished],
                          "opt": [t["parameters"]["trainer.optimizer.type"] for t in finished], "score": scores})
    expected = frame.pivot_table(index="bs", columns="opt", values="score", aggfunc="mean")
    cells = np.ma.filled(ax.images[0].get_array(), np.nan)
    assert np.allclose(cells, expected.to_numpy(), equal_nan=True)
    # 24 distinct learning rates: binned into quantiles, so each cell averages several trials
    ax = next(a for a in pair_axes if a.get_ylabel().startswith("trainer.learning_rate"))
    assert "quantile bins" in ax.get_ylabel() and ax.images[0].get_array().shape[0] == 10


# ------------------------------------------------------------------------------------------ errors
def test_missing_or_unfit_inputs_name_the_flags(run, tmp_path):
    with pytest.raises(CadenzaError, match=r"learning_curves needs -trs; missing: -trs "):
        figures("learning_curves", Request(test_statistics=[run["tes"]]))
    with pytest.raises(CadenzaError, match=r"calibration_1_vs_all needs -prob \+ -g \+ -gm; missing: -g "):
        figures("calibration_1_vs_all", Request(probabilities=[run["pred"]], ground_truth_metadata=run["gm"]))
    # Cadenza's test statistics hold no confusion matrix: the message says what computes one
    with pytest.raises(CadenzaError, match=r"hold no confusion_matrix.*-prob.*-g the data set"):
        figures("confusion_matrix", Request(test_statistics=[run["tes"]], ground_truth_metadata=run["gm"]))
    with pytest.raises(CadenzaError, match=r"did you mean 'confusion_matrix'"):
        figures("confusion_matrx", Request())
    with pytest.raises(CadenzaError, match=r"-ofn 'nope': not among"):
        figures("confusion_matrix", _inputs(run, output_feature_name="nope"))
    pd.read_csv(run["g"]).head(7).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(CadenzaError, match=r"-g has 7 rows and .*predictions.csv 40 predictions"):
        figures("confusion_matrix", Request(predictions=[run["pred"]], ground_truth=tmp_path / "short.csv",
                                            ground_truth_metadata=run["gm"]))
    with pytest.raises(CadenzaError, match=r"-mn gives 2 model names for 1 files"):
        figures("compare_performance", Request(test_statistics=[run["tes"]], model_names=["a", "b"]))
    with pytest.raises(CadenzaError, match=r"-tes .*missing.json: no such file"):
        figures("compare_performance", Request(test_statistics=[tmp_path / "missing.json"]))


def test_cli_writes_png_and_pdf_files_and_exits_2_with_the_flag_named(run, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["visualize", "-v", "confusion_matrix", "-pred", str(run["pred"]), "-g", str(run["g"]),
                 "-gm", str(run["gm"]), "-od", str(out), "-ff", "png", "-tn", "2", "-mn", "mine"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["confusion_matrix_mine_liked_top2.png", "confusion_matrix_mine_sentiment_top2.png"]
    assert (out / written[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out / written[0]) in capsys.readouterr().out

    assert main(["visualize", "-v", "compare_performance", "-tes", str(run["tes"]), "-od", str(out)]) == 0
    assert (out / "compare_performance_sentiment.pdf").read_bytes()[:5] == b"%PDF-"

    assert main(["visualize", "-v", "roc_curves_from_test_statistics", "-tes", str(run["tes"]),
                 "-od", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "-prob" in err and "-g" in err and len(err.strip().splitlines()) == 1


def test_the_command_line_stays_light_and_plotting_leaves_pyplot_alone(run, tmp_path):
    """In a fresh process: building the parser imports no matplotlib, and a whole visualize run neither imports
    pyplot (its global figure registry and backend) nor changes rcParams."""
    script = f"""
import sys
import cadenza.cli as cli
cli.build_parser()
assert "matplotlib" not in sys.modules, "cadenza --help imported matplotlib"
import matplotlib
def settings():  # all but "backend": reading that one resolves the backend, which imports pyplot
    return {{key: matplotlib.rcParams[key] for key in matplotlib.rcParams if key != "backend"}}
before = settings()
assert cli.main(["visualize", "-v", "frequency_vs_f1", "-pred", {str(run["pred"])!r}, "-g", {str(run["g"])!r},
                 "-gm", {str(run["gm"])!r}, "-od", {str(tmp_path / "out")!r}, "-ff", "png"]) == 0
assert "matplotlib.pyplot" not in sys.modules, "plotting imported pyplot"
assert settings() == before, "plotting changed rcParams"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------------------ the run folder
def test_run_plots_never_raise_and_say_why_they_are_missing(run, monkeypatch):
    logs = []
    (run["dir"] / "training_statistics.json").write_text("{not json")
    assert write_run_plots(run["dir"], log=logs.append) == []
    assert len(logs) == 1 and logs[0].startswith("warning: learning_curves.png not written: ")

    write_json(run["trs"], _training_statistics())
    metadata = json.loads(run["gm"].read_text())
    write_json(run["gm"], {name: meta for name, meta in metadata.items() if name != "sentiment"})
    logs.clear()  # no category output: learning curves alone, and nothing to say about it
    assert write_run_plots(run["dir"], pd.read_csv(run["g"]), pd.read_csv(run["pred"]), log=logs.append) == [
        run["dir"] / "learning_curves.png"] and logs == []

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    logs.clear()
    truth = pd.read_csv(run["g"])
    assert write_run_plots(run["dir"], truth, pd.read_csv(run["pred"]), log=logs.append) == []
    assert logs == ["note: no plots in the run folder: matplotlib is not installed (pip install 'cadenza[viz]')"]
    with pytest.raises(CadenzaError, match=r"pip install 'cadenza\[viz\]'"):
        visualize("compare_performance", test_statistics=[run["tes"]], output_directory=run["dir"] / "v")


def test_experiment_writes_its_plots_and_visualize_finds_the_test_rows_of_the_data_set(tiny_bert_dir, cache_dir,
                                                                                       tmp_path):
    from PIL import Image

    from cadenza import Model

    rng = np.random.default_rng(0)
    words = ["good", "great", "bad", "awful", "plot", "actor", "dull"]
    text = [" ".join(rng.choice(words, 5)) for _ in range(90)]
    score = np.array([t.count("good") + t.count("great") - t.count("bad") - t.count("awful") for t in text])
    data = pd.DataFrame({"review": text, "sentiment": np.where(score > 0, "pos", np.where(score < 0, "neg", "mixed")),
                         "liked": score > 0})
    data.to_csv(tmp_path / "reviews.csv", index=False)
    config = {"input_features": [{"name": "review", "type": "text", "encoder": {
                  "type": "auto_transformer", "pretrained_model_name_or_path": str(tiny_bert_dir)},
                  "preprocessing": {"max_sequence_length": 12}}],
              "output_features": [{"name": "sentiment", "type": "category"}, {"name": "liked", "type": "binary"}],
              "trainer": {"epochs": 2, "batch_size": 16, "learning_rate": 0.01}}
    logs = []
    out, test_stats = Model(config, log=logs.append).experiment(str(tmp_path / "reviews.csv"),
                                                               output_directory=tmp_path / "results")
    run_dir = out.run_dir
    for name in ("learning_curves.png", "confusion_matrix.png"):
        with Image.open(run_dir / name) as image:
            assert image.format == "PNG" and image.size[0] > 300
    assert not any("no plots" in line or "not written" in line for line in logs), logs  # no plot failed

    # the full data set as -g: visualize draws the experiment's test split again from description.json
    request = Request(predictions=[run_dir / "predictions.csv"], ground_truth=tmp_path / "reviews.csv",
                      ground_truth_metadata=run_dir / "model" / "training_set_metadata.json")
    test_rows = len(pd.read_csv(run_dir / "predictions.csv"))
    assert test_rows < len(data)
    matrix = figures("confusion_matrix", request)["confusion_matrix_experiment_run_sentiment_top3"]
    cells = np.asarray(matrix.axes[0].images[0].get_array())
    assert cells.sum() == test_rows
    assert np.trace(cells) / cells.sum() == pytest.approx(test_stats["sentiment"]["accuracy"])
    roc = figures("roc_curves_from_test_statistics", Request(probabilities=request.predictions,
                                                             ground_truth=request.ground_truth,
                                                             ground_truth_metadata=request.ground_truth_metadata,
                                                             output_feature_name="liked"))
    [line] = [line for line in roc["roc_curves_liked"].axes[0].get_lines() if not line.get_label().startswith("_")]
    assert compute.area_under(np.asarray(line.get_xdata()), np.asarray(line.get_ydata())) == pytest.approx(
        test_stats["liked"]["roc_auc"], abs=1e-9)


def test_every_visualization_has_its_drawing_function_and_its_section_in_the_docs():
    from pathlib import Path

    from cadenza.plots import FLAGS, VISUALIZATIONS, views

    doc = (Path(__file__).parent.parent / "docs" / "visualize.md").read_text()
    for name in VISUALIZATIONS:
        assert callable(getattr(views, name, None)), f"cadenza.plots.views.{name} is missing"
        assert f"### {name}\n" in doc and f"cadenza visualize -v {name} " in doc, f"docs/visualize.md: {name}"
    for f in FLAGS:
        assert f"| `{f.names[0]}`, `{f.names[1]}` |" in doc, f"docs/visualize.md: {f.names}"
