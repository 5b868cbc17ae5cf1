"""The metrics table (cadenza/metrics.py) against what evaluation really computes, its values, and the comparisons
the training loop makes with it."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from cadenza import Model
from cadenza import metrics as M
from cadenza.config.load import load_config
from cadenza.llm import LlmModel


def quiet(*_):
    pass


# ------------------------------------------------------------------------------------------ table == computed
def tabular_frame(n=48, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return pd.DataFrame({"x": x, "genre": rng.choice(["drama", "comedy", "horror"], n),
                         "label": np.where(x > 0.5, "high", np.where(x < -0.5, "low", "mid")), "liked": x > 0,
                         "rating": 2 * x + 1, "tags": rng.choice(["a", "a b", "b c", ""], n)})


def test_ecd_evaluation_and_validation_rounds_report_exactly_the_tables_metrics(tmp_path):
    outputs = {"label": "category", "liked": "binary", "rating": "number", "tags": "set"}
    cfg = {"input_features": [{"name": "x", "type": "number"}, {"name": "genre", "type": "category"}],
           "output_features": [{"name": name, "type": kind} for name, kind in outputs.items()],
           "trainer": {"epochs": 1, "batch_size": 16}}
    model = Model(cfg, log=quiet)
    out = model.train(tabular_frame(), output_directory=tmp_path)
    validation = json.loads((out.run_dir / "training_statistics.json").read_text())["validation"][0]
    evaluated, _ = model.evaluate(tabular_frame(24, seed=1))
    for name, kind in outputs.items():
        assert set(evaluated[name]) == set(M.metric_names(kind, "ecd")), kind
        assert set(validation[name]) == set(M.validation_metric_names(kind, "ecd")), kind
    assert set(evaluated["combined"]) == set(M.metric_names(M.COMBINED))


def test_llm_evaluation_and_validation_rounds_report_exactly_the_tables_metrics(tiny_llama_dir, cache_dir):
    df = pd.DataFrame({"question": ["what colour is the apple?", "what colour is the lemon?"] * 2,
                       "answer": ["red", "yellow"] * 2})
    cfg = load_config({"model_type": "llm", "base_model": str(tiny_llama_dir),
                       "input_features": [{"name": "question", "type": "text"}],
                       "output_features": [{"name": "answer", "type": "text"}],
                       "trainer": {"type": "finetune", "epochs": 1, "batch_size": 2},
                       "generation": {"max_new_tokens": 3}})
    m = LlmModel(cfg)
    result = m.fit({"training": df, "validation": df}, run_dir=None, resume=False, seed=0, log=quiet)
    assert set(result.statistics["validation"][0]["answer"]) == set(M.validation_metric_names("text", "llm"))
    evaluated, _ = m.evaluate(df)
    assert set(evaluated["answer"]) == set(M.metric_names("text", "llm"))

    zero_shot = load_config({"model_type": "llm", "base_model": str(tiny_llama_dir),
                             "input_features": [{"name": "question", "type": "text"}],
                             "output_features": [{"name": "answer", "type": "category"}],
                             "generation": {"max_new_tokens": 3}})
    evaluated, _ = LlmModel(zero_shot).evaluate(df)
    assert set(evaluated["answer"]) == set(M.metric_names("category", "llm"))


# ------------------------------------------------------------------------------------------ values
def test_binary_metrics_by_hand():
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    probability = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.1, 0.05])  # tp 2, fn 1, fp 1, tn 4
    got = M.binary_metrics(truth, probability, threshold=0.5)
    assert got["accuracy"] == pytest.approx(6 / 8)
    assert got["precision"] == pytest.approx(2 / 3) and got["recall"] == pytest.approx(2 / 3)
    assert got["specificity"] == pytest.approx(4 / 5) and got["f1"] == pytest.approx(2 / 3)
    assert got["roc_auc"] == pytest.approx(14 / 15)  # 14 of the 15 positive/negative pairs are ranked right


def test_category_metrics_are_macro_averaged():
    truth = np.array([0, 0, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.5, 0.1, 0.4]])
    got = M.category_metrics(truth, probs.argmax(1), probs, top_k=2)
    # predictions 0, 1, 1, 0: class 0 p=1/2 r=1/2, class 1 p=1/2 r=1, class 2 p=0 r=0
    assert got["accuracy"] == pytest.approx(2 / 4) and got["hits_at_k"] == pytest.approx(1.0)
    assert got["precision"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert got["recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert got["f1"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert 0 < got["roc_auc"] <= 1


def test_set_and_number_metrics_by_hand():
    truth = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 1]])
    predicted = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 1]])
    got = M.set_metrics(truth, predicted)
    assert got["jaccard"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert got["precision"] == pytest.approx(3 / 4) and got["recall"] == pytest.approx(3 / 4)
    number = M.number_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0]))
    assert (number["mae"], number["mse"]) == (pytest.approx(2 / 3), pytest.approx(4 / 3))
    assert number["rmse"] == pytest.approx(math.sqrt(4 / 3)) and number["r2"] == pytest.approx(1 - 4 / 2)


def test_undefined_metrics_are_nan_not_missing():
    got = M.binary_metrics(np.array([1, 1]), np.array([0.9, 0.2]), threshold=0.5)  # one class only
    assert math.isnan(got["roc_auc"]) and set(got) == set(M.metric_names("binary")) - {"loss"}
    no_scores = M.category_metrics(np.array([0, 1]), np.array([0, 0]))  # an llm output without probabilities
    assert math.isnan(no_scores["hits_at_k"]) and math.isnan(no_scores["roc_auc"])


# ------------------------------------------------------------------------------------------ comparisons
@pytest.mark.parametrize("metric", [m.name for m in M.METRICS])
def test_is_better_follows_the_direction_in_the_table(metric):
    up = M.higher_is_better(metric)
    assert M.is_better(metric, 0.6, 0.5) is up and M.is_better(metric, 0.4, 0.5) is not up
    assert not M.is_better(metric, 0.5, 0.5)  # a tie is no improvement
    assert M.is_better(metric, 0.5, None)  # the first value always is


def test_nan_never_improves_and_is_always_beaten():
    assert not M.is_better("roc_auc", math.nan, 0.5) and not M.is_better("loss", math.nan, None)
    assert M.is_better("roc_auc", 0.1, math.nan) and M.is_better("loss", 99.0, math.nan)


def test_aliases_and_unknown_names():
    assert M.canonical_name("mean_squared_error") == "mse" and M.canonical_name("macro_f1") == "f1"
    assert M.higher_is_better("macro_f1") and not M.higher_is_better("root_mean_squared_error")
    assert M.canonical_name("acuracy") is None
    with pytest.raises(ValueError, match="did you mean 'accuracy'"):
        M.higher_is_better("acuracy")


def test_every_output_type_has_a_loss_and_llm_validation_uses_token_metrics_only():
    for kind in (*M.OUTPUT_TYPES, M.COMBINED):
        assert M.metric_names(kind)[0] == "loss"
    assert M.validation_metric_names("text", "llm") == ["loss", "perplexity", "token_accuracy"]
    assert M.validation_metric_names("category", "ecd") == M.metric_names("category", "ecd")
