"""The cadenza command, in process (main(argv)) and once as a real subprocess."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from cadenza.cli import build_parser, main


def write_setup(tmp_path, bert):
    rng = np.random.default_rng(0)
    words = ["good", "bad", "plot", "actor", "great", "awful"]
    df = pd.DataFrame({"review": [" ".join(rng.choice(words, 5)) for _ in range(60)]})
    df["sentiment"] = np.where(df.review.str.count("good|great") >= df.review.str.count("bad|awful"), "pos", "neg")
    df.to_csv(tmp_path / "reviews.csv", index=False)
    cfg = {"input_features": [{"name": "review", "type": "text", "encoder": {
        "type": "auto_transformer", "pretrained_model_name_or_path": str(bert)}}],
        "output_features": [{"name": "sentiment", "type": "category"}], "trainer": {"epochs": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "c.yaml", tmp_path / "reviews.csv"


def test_train_predict_evaluate_experiment(tmp_path, tiny_bert_dir, cache_dir, capsys):
    config, data = write_setup(tmp_path, tiny_bert_dir)
    out = tmp_path / "results"
    assert main(["train", "--config", str(config), "--dataset", str(data), "-od", str(out)]) == 0
    run = out / "experiment_run"
    assert (run / "model" / "model_weights.safetensors").is_file()
    assert main(["predict", "-m", str(run), "--dataset", str(data), "-od", str(tmp_path / "p")]) == 0
    predictions = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert len(predictions) == 60 and set(predictions.sentiment_predictions) <= {"pos", "neg"}
    assert main(["evaluate", "-m", str(run / "model"), "--dataset", str(data), "-od", str(tmp_path / "e")]) == 0
    stats = json.loads((tmp_path / "e" / "test_statistics.json").read_text())
    assert 0 <= stats["sentiment"]["accuracy"] <= 1
    assert main(["experiment", "--config", str(config), "--dataset", str(data), "-od", str(out)]) == 0
    assert (out / "experiment_run_1" / "test_statistics.json").is_file()
    assert (out / "experiment_run_1" / "predictions.csv").is_file()


def test_errors_exit_2_with_the_named_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input_features: [{name: a, type: text}]\noutput_features: [{name: b, type: category}]\n"
                   "trainer: {epoch: 3}\n")
    assert main(["render_config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "trainer.epoch: unknown key 'epoch'; did you mean 'epochs'?" in err
    assert main(["predict", "-m", str(tmp_path / "missing"), "--dataset", "x.csv"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_render_config_subprocess_fills_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("input_features: [{name: r, type: text, encoder: {type: auto_transformer, "
                   "pretrained_model_name_or_path: minilm}}]\noutput_features: [{name: s, type: binary}]\n")
    done = subprocess.run([sys.executable, "-m", "cadenza", "render_config", "-c", str(cfg)],
                          capture_output=True, text=True, check=True)
    rendered = yaml.safe_load(done.stdout)
    assert rendered["trainer"]["epochs"] == 10 and rendered["output_features"][0]["threshold"] == 0.5


def fail_with(exception):
    """A stand-in for Model.train that fails as a bug (or Ctrl-C) would, without loading any model."""
    def train(self, **kwargs):
        raise exception
    return train


def test_unexpected_error_exits_1_with_one_line_and_the_debug_hint(tmp_path, tiny_bert_dir, monkeypatch, capsys):
    config, data = write_setup(tmp_path, tiny_bert_dir)
    monkeypatch.setattr("cadenza.api.Model.train", fail_with(RuntimeError("shapes (3, 4) and (5,) differ\nmore")))
    monkeypatch.delenv("CADENZA_DEBUG", raising=False)
    assert main(["train", "-c", str(config), "--dataset", str(data)]) == 1
    assert capsys.readouterr().err == ("unexpected error: RuntimeError: shapes (3, 4) and (5,) differ\n"
                                       "rerun with --debug (or CADENZA_DEBUG=1) for the full traceback, and include "
                                       "it if you report a bug\n")


@pytest.mark.parametrize("argv_debug,env", [(["--debug", "train"], None), (["train", "--debug"], None),
                                            (["train"], "1")])
def test_debug_reraises_with_the_traceback(tmp_path, tiny_bert_dir, monkeypatch, argv_debug, env):
    config, data = write_setup(tmp_path, tiny_bert_dir)
    monkeypatch.setattr("cadenza.api.Model.train", fail_with(RuntimeError("boom")))
    if env:
        monkeypatch.setenv("CADENZA_DEBUG", env)
    else:
        monkeypatch.delenv("CADENZA_DEBUG", raising=False)
    with pytest.raises(RuntimeError, match="boom"):
        main(argv_debug + ["-c", str(config), "--dataset", str(data)])


def test_debug_flag_is_global_and_off_by_default():
    parser = build_parser()
    assert parser.parse_args(["--debug", "render_config", "-c", "x.yaml"]).debug is True
    assert parser.parse_args(["render_config", "-c", "x.yaml", "--debug"]).debug is True
    assert parser.parse_args(["render_config", "-c", "x.yaml"]).debug is False
    assert parser.parse_args(["upload", "hf_hub", "-r", "org/name", "-m", "x", "--debug"]).debug is True


def test_interrupt_exits_130(tmp_path, tiny_bert_dir, monkeypatch, capsys):
    config, data = write_setup(tmp_path, tiny_bert_dir)
    monkeypatch.setattr("cadenza.api.Model.train", fail_with(KeyboardInterrupt()))
    assert main(["train", "-c", str(config), "--dataset", str(data)]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_subprocess_user_error_exits_2_and_debug_shows_its_traceback(tmp_path, tiny_bert_dir):
    config, _ = write_setup(tmp_path, tiny_bert_dir)
    (tmp_path / "header_only.csv").write_text("review,sentiment\n")
    command = [sys.executable, "-m", "cadenza", "train", "-c", str(config), "--dataset", "header_only.csv"]
    env = {k: v for k, v in os.environ.items() if k != "CADENZA_DEBUG"}
    plain = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert plain.returncode == 2
    assert plain.stderr == ("error: header_only.csv: the file has a header (review, sentiment) but no data rows; "
                            "add rows below the header\n")
    debug = subprocess.run(command[:3] + ["--debug"] + command[3:], capture_output=True, text=True, cwd=tmp_path,
                           env=env)
    assert debug.returncode == 1
    assert debug.stderr.startswith("Traceback (most recent call last):")
    assert "cadenza.errors.DataError: header_only.csv: the file has a header" in debug.stderr
