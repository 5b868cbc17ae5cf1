"""Tracking: TensorBoard event files in every run folder and MLflow with --mlflow, each read back with its own
reader (TensorBoard's EventAccumulator, mlflow.MlflowClient) and compared with training_statistics.json; an
interrupted then resumed run has no step twice and one MLflow run; nothing global is left behind."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cadenza import Model
from cadenza.track import LOGS_DIR, TRACKING_FILE, TensorBoardLog, Tracker, flatten_config, scalars_in, tracking
from cadenza.train.interrupt import TrainingInterrupted
from conftest import signal_in_step

APPROX = dict(rel=1e-6, abs=1e-7)  # event files hold float32


def quiet(*_):
    pass


def ecd_case(bert: Path) -> tuple[dict, pd.DataFrame]:
    rng = np.random.default_rng(0)
    words = ["good", "great", "bad", "awful", "plot", "actor"]
    text = [" ".join(rng.choice(words, 4)) for _ in range(40)]
    score = np.array([t.count("good") + t.count("great") - t.count("bad") - t.count("awful") for t in text])
    df = pd.DataFrame({"review": text, "x": rng.normal(size=40), "sentiment": np.where(score > 0, "pos", "neg")})
    config = {"input_features": [{"name": "review", "type": "text", "preprocessing": {"max_sequence_length": 8},
                                  "encoder": {"type": "auto_transformer", "pretrained_model_name_or_path": str(bert),
                                              "trainable": False}},
                                 {"name": "x", "type": "number"}],
              "output_features": [{"name": "sentiment", "type": "category"}],
              # 28 training rows in batches of 8: 4 steps per epoch, evaluations within epochs too
              "trainer": {"epochs": 3, "batch_size": 8, "learning_rate": 0.01, "early_stop": -1, "eval_steps": 3,
                          "evaluate_training_set": True}}
    return config, df


def events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(run_dir / LOGS_DIR), size_guidance={SCALARS: 0})  # 0: keep every value
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def assert_events_match_statistics(run_dir: Path) -> tuple[dict, dict]:
    stats = json.loads((run_dir / "training_statistics.json").read_text())
    scalars = events(run_dir)
    for tag, points in scalars.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: a step written twice: {steps}"
    epoch_steps = [s for s, _ in scalars["epoch"]]
    assert [v for _, v in scalars["epoch"]] == list(range(1, len(stats["training"]) + 1))
    assert len(scalars["step/loss"]) == stats["steps"] == epoch_steps[-1]  # every optimizer step
    assert [s for s, _ in scalars["step/learning_rate"]] == list(range(1, stats["steps"] + 1))
    for key in ("loss", "seconds") + tuple(k for k in stats["training"][0] if k.endswith("_per_second")):
        assert [v for _, v in scalars[f"train/{key}"]] == pytest.approx([e[key] for e in stats["training"]],
                                                                         **APPROX), key
    # validation: at each epoch's end and at each eval_steps evaluation, on one axis of steps
    expected = {s: e for s, e in zip(epoch_steps, stats["validation"])}
    expected.update({e["step"]: e for e in stats["validation_steps"]})
    for feature, metrics in stats["validation"][0].items():
        for metric in metrics:
            got = dict(scalars[f"validation/{feature}/{metric}"])
            assert sorted(got) == sorted(expected)
            assert [got[s] for s in sorted(got)] == pytest.approx([expected[s][feature][metric]
                                                                   for s in sorted(got)], **APPROX)
    return stats, scalars


# ------------------------------------------------------------------------------------------------ TensorBoard
def test_ecd_run_writes_tensorboard_scalars_equal_to_its_statistics(tiny_bert_dir, cache_dir, tmp_path):
    config, df = ecd_case(tiny_bert_dir)
    out = Model(config, log=quiet).train(df, output_directory=tmp_path)
    stats, scalars = assert_events_match_statistics(out.run_dir)
    assert len(stats["validation_steps"]) > 0 and "train/rows_per_second" in scalars
    # trainer.evaluate_training_set: the training-set metrics per epoch
    assert [v for _, v in scalars["train/sentiment/accuracy"]] == pytest.approx(
        [e["metrics"]["sentiment"]["accuracy"] for e in stats["training"]], **APPROX)
    assert not (out.run_dir / TRACKING_FILE).exists()  # no MLflow unless asked
    assert not [t for t in threading.enumerate() if "EventLogger" in type(t).__name__]  # the writer is closed


def test_llm_run_logs_tokens_per_second_and_its_validation_metrics(tiny_llama_dir, cache_dir, tmp_path):
    df = pd.DataFrame({"question": [f"what comes after {i}" for i in range(15)],
                       "answer": [str(i + 1) for i in range(15)]})
    config = {"model_type": "llm", "base_model": str(tiny_llama_dir),
              "input_features": [{"name": "question", "type": "text"}],
              "output_features": [{"name": "answer", "type": "text"}], "adapter": {"type": "lora", "r": 4},
              "preprocessing": {"split": {"probabilities": [0.8, 0.2, 0.0]}},
              "trainer": {"type": "finetune", "epochs": 2, "batch_size": 4, "learning_rate": 0.01}}
    out = Model(config, log=quiet).train(df, output_directory=tmp_path)
    stats, scalars = assert_events_match_statistics(out.run_dir)
    assert {"step/tokens_per_second", "step/target_tokens_per_second", "train/tokens_per_second",
            "validation/answer/perplexity", "validation/answer/token_accuracy"} <= set(scalars)
    if "mfu" in stats["training"][0]:
        assert [v for _, v in scalars["train/mfu"]] == pytest.approx([e["mfu"] for e in stats["training"]], **APPROX)


def test_skip_save_log_writes_no_event_files(tiny_bert_dir, cache_dir, tmp_path):
    config, df = ecd_case(tiny_bert_dir)
    config["trainer"].update(epochs=1, evaluate_training_set=False)
    out = Model(config, log=quiet).train(df, output_directory=tmp_path, skip_save_log=True)
    assert not (out.run_dir / LOGS_DIR).exists() and (out.run_dir / "model").is_dir()


def test_resume_after_a_kill_writes_no_step_twice(tmp_path):
    """A run killed after logging steps 6-7 and an epoch end at step 5 that its last checkpoint (step 5) does not
    know: the resumed run logs them again, and readers see each step once, with the resumed run's values."""
    folder = tmp_path / LOGS_DIR
    first = TensorBoardLog(folder, resumed=False)
    first.open(0)
    for step in range(1, 8):
        first.write(step, {"step/loss": float(step)})
    first.write(5, {"train/loss": 5.0})
    first.close()
    resumed = TensorBoardLog(folder, resumed=True)
    resumed.open(5)
    resumed.write(5, {"train/loss": 50.0})  # the epoch end again: already there, not written twice
    for step in range(6, 9):
        resumed.write(step, {"step/loss": 10.0 * step})
    resumed.close()
    scalars = events(tmp_path)
    assert scalars["step/loss"] == [(s, float(s)) for s in range(1, 6)] + [(s, 10.0 * s) for s in range(6, 9)]
    assert scalars["train/loss"] == [(5, 5.0)]
    assert scalars_in(folder) == {("step/loss", s) for s in range(1, 9)} | {("train/loss", 5)}


def test_without_tensorboardx_a_run_says_how_to_get_event_files(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    said = []
    with tracking(tmp_path, {}, log=said.append) as tracker:
        tracker.begin(0, {})
        tracker.log_step(1, loss=1.0, learning_rate=0.1, units=8)
    assert tracker.tensorboard is None and not (tmp_path / LOGS_DIR).exists()
    assert len(said) == 1 and "pip install" in said[0]


def test_processes_other_than_the_main_one_write_nothing(tmp_path):
    with tracking(tmp_path, {}, mlflow=True, enabled=False) as tracker:
        tracker.begin(0, {})
        tracker.log_epoch(1, 4, {"loss": 1.0}, None)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------ MLflow
@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One SQLite store for the module (creating one takes seconds); each test has its own experiment name."""
    pytest.importorskip("mlflow")
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture
def mlflow_env(mlflow_store, monkeypatch):
    """MLFLOW_TRACKING_URI set for the test; the global MLflow state before it, to compare with after it."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    return mlflow_store, mlflow.get_tracking_uri()


def assert_no_global_mlflow_state(uri_before: str) -> None:
    import mlflow

    assert mlflow.active_run() is None
    assert mlflow.get_tracking_uri() == uri_before


def one_run(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, f"{len(runs)} runs in {experiment}"
    return client, runs[0]


def assert_metrics_match_statistics(client, run, stats: dict) -> None:
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    epochs = list(range(1, len(stats["training"]) + 1))
    assert history("train/loss") == [(e, pytest.approx(t["loss"], **APPROX)) for e, t in zip(epochs, stats["training"])]
    for feature, metrics in stats["validation"][0].items():
        for metric in metrics:
            assert history(f"validation/{feature}/{metric}") == [
                (e, pytest.approx(v[feature][metric], **APPROX)) for e, v in zip(epochs, stats["validation"])]


def test_mlflow_flag_logs_params_metrics_and_the_model(tiny_bert_dir, cache_dir, tmp_path, mlflow_env):
    from cadenza.cli import main

    uri, uri_before = mlflow_env
    config, df = ecd_case(tiny_bert_dir)
    config["trainer"].update(evaluate_training_set=False)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    df.to_csv(tmp_path / "data.csv", index=False)
    rc = main(["train", "-c", str(tmp_path / "config.yaml"), "--dataset", str(tmp_path / "data.csv"), "--mlflow",
               "-od", str(tmp_path / "results"), "--experiment_name", "flag"])
    assert rc == 0
    run_dir = tmp_path / "results" / "flag_run"
    stats = json.loads((run_dir / "training_statistics.json").read_text())
    client, run = one_run(uri, "flag")
    assert run.info.status == "FINISHED" and run.info.run_name == "flag_run"
    assert json.loads((run_dir / TRACKING_FILE).read_text())["mlflow"]["run_id"] == run.info.run_id
    resolved = json.loads((run_dir / "model" / "model_hyperparameters.json").read_text())
    params = run.data.params
    assert params["trainer.learning_rate"] == "0.01" and params["output_features.0.name"] == "sentiment"
    assert params["random_seed"] == "42" and params["trainer.optimizer.type"] == resolved["trainer"]["optimizer"]["type"]
    assert set(params) == set(flatten_config(resolved)) | {"random_seed"}
    assert run.data.tags["precision"] == stats["precision"]["precision"]
    assert_metrics_match_statistics(client, run, stats)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    store = Path(uri[len("sqlite:///"):]).parent
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())  # beside the database, not ./mlruns
    assert {"config.yaml", "model", "training_statistics.json", "description.json"} <= artifacts
    model_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model_hyperparameters.json", "model_weights.safetensors"} <= model_files
    assert_no_global_mlflow_state(uri_before)
    assert (run_dir / LOGS_DIR).is_dir()  # TensorBoard too


def test_interrupted_then_resumed_run_is_one_mlflow_run_with_no_step_twice(tiny_bert_dir, cache_dir, tmp_path,
                                                                            mlflow_env):
    uri, uri_before = mlflow_env
    config, df = ecd_case(tiny_bert_dir)
    config["trainer"].update(steps_per_checkpoint=2)
    train = dict(output_directory=tmp_path, experiment_name="resumed", mlflow=True)
    # in the last step of epoch 1: the checkpoint (step 4) comes before that epoch's end, which the resumed run
    # logs at step 4 after the step-4 scalars of the first session
    with signal_in_step(4, signal.SIGTERM), pytest.raises(TrainingInterrupted):
        Model(config, log=quiet).train(df, **train)
    client, run = one_run(uri, "resumed")
    assert run.info.status == "KILLED" and client.get_metric_history(run.info.run_id, "train/loss") == []
    assert ("step/loss", 4) in scalars_in(tmp_path / "resumed_run" / LOGS_DIR)
    assert_no_global_mlflow_state(uri_before)

    out = Model(config, log=quiet).train(df, resume=True, **train)
    stats, scalars = assert_events_match_statistics(out.run_dir)  # also: no (tag, step) twice
    assert len(os.listdir(out.run_dir / LOGS_DIR)) == 2  # one event file per session, in the same folder
    client, resumed = one_run(uri, "resumed")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert_metrics_match_statistics(client, resumed, stats)
    assert_no_global_mlflow_state(uri_before)


def test_a_failing_run_is_marked_failed_and_leaves_no_active_run(mlflow_env, tmp_path):
    uri, uri_before = mlflow_env
    with pytest.raises(RuntimeError, match="boom"):
        with tracking(tmp_path, {"model_type": "ecd"}, mlflow=True, experiment_name="failing", log=quiet) as tracker:
            tracker.begin(0, {})
            tracker.log_epoch(1, 3, {"loss": 0.5}, {"combined": {"loss": 0.7}})
            raise RuntimeError("boom")
    client, run = one_run(uri, "failing")
    assert run.info.status == "FAILED" and run.data.metrics == {"train/loss": 0.5, "validation/combined/loss": 0.7}
    assert_no_global_mlflow_state(uri_before)
    counts = Counter(tag for tag, _ in scalars_in(tmp_path / LOGS_DIR))
    assert counts == {"train/loss": 1, "validation/combined/loss": 1, "epoch": 1}


def test_without_a_tracking_uri_the_store_is_in_the_output_directory(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri_before = mlflow.get_tracking_uri()
    run_dir = tmp_path / "results" / "experiment_run"
    run_dir.mkdir(parents=True)
    with tracking(run_dir, {"model_type": "ecd"}, tensorboard=False, mlflow=True, output_directory="results",
                  log=quiet) as tracker:
        tracker.begin(0, {})
        tracker.finish({}, None)
    uri = json.loads((run_dir / TRACKING_FILE).read_text())["mlflow"]["tracking_uri"]
    assert uri == f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    client, run = one_run(uri, "experiment")
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith((tmp_path / "results").as_uri())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # nothing in the working folder
    assert_no_global_mlflow_state(uri_before)


def test_a_run_resumed_with_mlflow_for_the_first_time_logs_its_earlier_epochs(mlflow_env, tmp_path):
    uri, _ = mlflow_env
    earlier = {"training": [{"loss": 0.5}, {"loss": 0.4}],
               "validation": [{"combined": {"loss": 0.7}}, {"combined": {"loss": 0.6}}]}
    with tracking(tmp_path, {}, tensorboard=False, mlflow=True, resume=True, experiment_name="backfill",
                  log=quiet) as tracker:
        tracker.begin(8, earlier)  # resumed at step 8, after two epochs trained without --mlflow
        tracker.log_epoch(3, 12, {"loss": 0.3}, {"combined": {"loss": 0.65}})
        tracker.finish({}, None)
    client, run = one_run(uri, "backfill")
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert history("train/loss") == [(1, 0.5), (2, 0.4), (3, 0.3)]
    assert history("validation/combined/loss") == [(1, 0.7), (2, 0.6), (3, 0.65)]


def test_null_tracker_does_nothing():
    tracker = Tracker()
    tracker.begin(0, {"training": [{"loss": 1.0}]})
    tracker.log_step(1, loss=1.0, learning_rate=0.1, units=4)
    tracker.log_validation(1, {"combined": {"loss": 1.0}})
    tracker.log_epoch(1, 1, {"loss": 1.0}, None)
    tracker.flush()
    tracker.finish({}, None)
    tracker.close()
