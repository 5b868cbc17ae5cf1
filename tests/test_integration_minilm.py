"""The packaged all-MiniLM-L6-v2 as a frozen encoder on real Rotten Tomatoes snippets."""

import pytest

from cadenza import Model
from cadenza.data.read import read_dataset


@pytest.mark.integration
def test_frozen_minilm_learns_sentiment(cache_dir, tmp_path):
    df = read_dataset("rotten_tomatoes_sentiment").sample(600, random_state=0)
    cfg = {"input_features": [{"name": "review", "type": "text",
                               "encoder": {"type": "auto_transformer", "pretrained_model_name_or_path": "minilm"},
                               "preprocessing": {"max_sequence_length": 64}}],
           "output_features": [{"name": "sentiment", "type": "category"}],
           "combiner": {"num_fc_layers": 0}, "trainer": {"epochs": 8, "batch_size": 32}}
    model = Model(cfg, log=lambda _: None)
    out, test = model.experiment(df, output_directory=tmp_path)
    # 420 training rows: a linear probe on MiniLM gets well above the 58% majority class
    assert test["sentiment"]["accuracy"] > 0.64, test
    assert Model.load(out.run_dir, log=lambda _: None).predict(df.head(20)).equals(model.predict(df.head(20)))
