"""The cadenza command, in process (main(argv)) and once as a real subprocess."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import yaml

from cadenza.cli import main


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
