"""Two CPU processes under torchrun (gloo): the same command scales out without code changes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml


@pytest.mark.integration
def test_torchrun_two_processes_trains_and_saves_once(tiny_bert_dir, cache_dir, tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"review": [" ".join(rng.choice(["good", "bad", "plot", "fine"], 4)) for _ in range(90)]})
    df["sentiment"] = np.where(df.review.str.contains("good"), "pos", "neg")
    df.to_csv(tmp_path / "d.csv", index=False)
    cfg = {"input_features": [{"name": "review", "type": "text", "encoder": {
        "type": "auto_transformer", "pretrained_model_name_or_path": str(tiny_bert_dir)}}],
        "output_features": [{"name": "sentiment", "type": "category"}], "trainer": {"epochs": 2, "batch_size": 16}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "cadenza", "train", "-c", "c.yaml",
                           "--dataset", "d.csv", "-od", "out"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1  # one run folder, named by the main process
    runs = list((tmp_path / "out").iterdir())
    assert [r.name for r in runs] == ["experiment_run"]
    stats = json.loads((runs[0] / "training_statistics.json").read_text())
    assert len(stats["training"]) == 2 and (runs[0] / "model" / "model_weights.safetensors").is_file()
    from cadenza import Model

    predictions = Model.load(runs[0], log=lambda _: None).predict(df)
    assert len(predictions) == len(df)
