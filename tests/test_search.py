"""`cadenza hyperopt`: spaces and paths checked before any trial, Ludwig's statistics layout, pruning, a study shared
by two processes on SQLite."""

import json
import os
import subprocess
import sys

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from cadenza.cli import main
from cadenza.errors import ConfigError
from cadenza.search import SPACES, TrialReporter, check_search, hyperopt, with_value

pytestmark = pytest.mark.timeout(300)


def base_config(bert) -> dict:
    return {"input_features": [{"name": "review", "type": "text", "encoder": {
        "type": "auto_transformer", "pretrained_model_name_or_path": str(bert)}}],
        "output_features": [{"name": "sentiment", "type": "category"}], "trainer": {"epochs": 2}}


def reviews(tmp_path):
    rng = np.random.default_rng(0)
    words = ["good", "bad", "plot", "actor", "great", "awful"]
    df = pd.DataFrame({"review": [" ".join(rng.choice(words, 5)) for _ in range(60)]})
    df["sentiment"] = np.where(df.review.str.count("good|great") >= df.review.str.count("bad|awful"), "pos", "neg")
    df.to_csv(tmp_path / "reviews.csv", index=False)
    return tmp_path / "reviews.csv"


SEARCH = {"output_feature": "sentiment", "metric": "accuracy", "goal": "maximize",
          "parameters": {"trainer.learning_rate": {"space": "loguniform", "lower": 1e-4, "upper": 1e-1},
                         "combiner.num_fc_layers": {"space": "randint", "lower": 0, "upper": 2},
                         "input_features.review.encoder.reduce_output": {"space": "choice",
                                                                         "categories": ["mean", "cls"]}},
          "executor": {"num_samples": 3}}


def test_with_value_addresses_features_by_name_and_creates_sections():
    raw = {"input_features": [{"name": "a"}, {"name": "b", "encoder": {"type": "x"}}], "trainer": {}}
    out = with_value(raw, "input_features.b.encoder.reduce_output", "cls")
    assert out["input_features"][1]["encoder"] == {"type": "x", "reduce_output": "cls"}
    assert with_value(raw, "combiner.output_size", 8)["combiner"] == {"output_size": 8}
    assert "combiner" not in raw  # the original is untouched
    with pytest.raises(KeyError, match="no feature named 'c'"):
        with_value(raw, "input_features.c.encoder.type", "x")


def test_unknown_paths_bad_values_and_bad_spaces_are_config_errors_before_any_trial(tiny_bert_dir):
    bad = {**base_config(tiny_bert_dir), "hyperopt": {
        "output_feature": "sentiment", "metric": "mae",
        "parameters": {"trainer.learning_rte": {"space": "choice", "categories": [0.1]},
                       "trainer.epochs": {"space": "randint", "lower": 0, "upper": 3},
                       "input_features.title.encoder.reduce_output": {"space": "choice", "categories": ["mean"]},
                       "combiner.dropout": {"space": "uniform", "lower": 0.5, "upper": 0.1},
                       "trainer.batch_size": {"space": "qrandint", "lower": 8, "upper": 64}}}}
    with pytest.raises(ConfigError) as e:
        check_search(bad)
    text = str(e.value)
    assert "hyperopt.parameters.combiner.dropout: lower (0.5) must be below upper (0.1)" in text
    assert "hyperopt.parameters.trainer.batch_size: space qrandint needs `q`" in text
    # the schema errors stop the cross-field checks; once the spaces are right, the paths and values are checked
    del bad["hyperopt"]["parameters"]["combiner.dropout"], bad["hyperopt"]["parameters"]["trainer.batch_size"]
    with pytest.raises(ConfigError) as e:
        check_search(bad)
    problems = dict(e.value.problems)
    assert "unknown key 'learning_rte'; did you mean 'learning_rate'?" in problems["hyperopt.parameters.trainer."
                                                                                   "learning_rte"]
    assert "0: trainer.epochs: must be ≥ 1" in problems["hyperopt.parameters.trainer.epochs"]
    assert "no feature named 'title'" in problems["hyperopt.parameters.input_features.title.encoder.reduce_output"]
    assert "does not compute 'mae'" in problems["hyperopt.metric"]


def test_every_space_suggests_within_its_range():
    from cadenza.config.schema import HyperoptParameter

    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    spaces = {"uniform": {"lower": 0.1, "upper": 0.2}, "quniform": {"lower": 0, "upper": 1, "q": 0.25},
              "loguniform": {"lower": 1e-4, "upper": 1e-2}, "qloguniform": {"lower": 1, "upper": 100, "q": 10},
              "randint": {"lower": 3, "upper": 4}, "qrandint": {"lower": 8, "upper": 64, "q": 8},
              "lograndint": {"lower": 1, "upper": 2}, "qlograndint": {"lower": 10, "upper": 1000, "q": 10},
              "choice": {"categories": [[1, 2], [3]]}, "grid_search": {"values": ["a"]}}
    assert set(spaces) == set(SPACES)
    got = {space: SPACES[space](trial, space, HyperoptParameter(space=space, **keys))
           for space, keys in spaces.items()}
    assert 0.1 <= got["uniform"] <= 0.2 and got["quniform"] in (0, 0.25, 0.5, 0.75, 1)
    assert got["randint"] == 3 and got["lograndint"] == 1  # upper excluded, as in Ludwig
    assert got["qrandint"] % 8 == 0 and got["qlograndint"] % 10 == 0 and got["qloguniform"] % 10 == 0
    assert got["choice"] in ([1, 2], [3]) and got["grid_search"] == "a"


def test_hyperopt_writes_ludwigs_statistics_and_the_best_config(tmp_path, tiny_bert_dir, cache_dir):
    config = {**base_config(tiny_bert_dir), "hyperopt": SEARCH}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "results"
    assert main(["hyperopt", "-c", str(tmp_path / "c.yaml"), "--dataset", str(reviews(tmp_path)),
                 "-od", str(out)]) == 0
    statistics = json.loads((out / "hyperopt" / "hyperopt_statistics.json").read_text())
    assert statistics["hyperopt_config"] == SEARCH
    results = statistics["hyperopt_results"]
    assert len(results) == 3
    scores = [r["metric_score"] for r in results]
    assert scores == sorted(scores, reverse=True)  # maximize: best first
    assert set(results[0]["parameters"]) == set(SEARCH["parameters"])
    assert results[0]["eval_stats"]["sentiment"]["accuracy"] == scores[0]
    assert len(results[0]["training_stats"]["training"]) == 2  # two epochs each
    best = yaml.safe_load((out / "hyperopt" / "best_config.yaml").read_text())
    assert "hyperopt" not in best
    assert best["trainer"]["learning_rate"] == results[0]["parameters"]["trainer.learning_rate"]
    assert best["input_features"][0]["encoder"]["reduce_output"] == \
        results[0]["parameters"]["input_features.review.encoder.reduce_output"]
    from cadenza.plots import visualize  # the report reads the file

    assert visualize("hyperopt_report", hyperopt_stats_path=str(out / "hyperopt" / "hyperopt_statistics.json"),
                     output_directory=str(tmp_path / "plots"), file_format="png")


def test_reporter_prunes_the_trial_its_pruner_gives_up_on():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    reporter = TrialReporter(study.ask(), "sentiment", "accuracy")
    reporter.log_epoch(1, 10, {"loss": 1.0}, {"sentiment": {"accuracy": 0.7}})  # good enough: goes on
    with pytest.raises(optuna.TrialPruned):
        reporter.log_epoch(2, 20, {"loss": 1.0}, {"sentiment": {"accuracy": 0.2}})


def test_a_bad_trial_is_pruned_after_its_first_epoch_and_left_out(tmp_path, tiny_bert_dir, cache_dir):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    search = {"parameters": {"trainer.learning_rate": {"space": "choice", "categories": [0.05, 1e-9]}},
              "executor": {"num_samples": 3, "pruner": "median", "storage": storage}}
    queued = optuna.create_study(study_name="hyperopt", storage=storage)  # combined loss, minimize
    for lr in (0.05, 0.05, 1e-9):  # two good trials, then one that cannot learn
        queued.enqueue_trial({"trainer.learning_rate": lr})
    config = {**base_config(tiny_bert_dir), "trainer": {"epochs": 4}, "hyperopt": search}
    statistics = hyperopt(config, reviews(tmp_path), output_directory=tmp_path / "r", log=lambda _: None)
    trials = optuna.load_study(study_name="hyperopt", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert len(trials[0].intermediate_values) == 4 and len(trials[2].intermediate_values) < 4
    assert [r["parameters"]["trainer.learning_rate"] for r in statistics["hyperopt_results"]] == [0.05, 0.05]


def test_two_processes_share_one_study_on_sqlite(tmp_path, tiny_bert_dir, cache_dir):
    search = {**SEARCH, "executor": {"num_samples": 4, "storage": f"sqlite:///{tmp_path / 'study.db'}"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**base_config(tiny_bert_dir), "hyperopt": search}))
    data = reviews(tmp_path)
    argv = [sys.executable, "-m", "cadenza", "hyperopt", "-c", str(tmp_path / "c.yaml"), "--dataset", str(data),
            "-od", str(tmp_path / "r")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(argv + ["--random_seed", str(seed)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    logs = [w.communicate(timeout=240)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    assert all("trial" in log for log in logs)  # each process ran trials
    study = optuna.load_study(study_name="hyperopt", storage=search["executor"]["storage"])
    finished = [t for t in study.trials if t.state.is_finished()]
    assert 4 <= len(finished) <= 5  # each process stops once 4 have finished (one may be running then)
    assert len({t.user_attrs["parameters"]["trainer.learning_rate"] for t in finished}) == len(finished)
    statistics = json.loads((tmp_path / "r" / "hyperopt" / "hyperopt_statistics.json").read_text())
    assert len(statistics["hyperopt_results"]) == len(finished)  # the process that ends last reports every trial
