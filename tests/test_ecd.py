"""ecd end to end on a tiny random BERT (real WordPiece tokenizer): features, cache, save/load, resume, errors."""

import json

import numpy as np
import pandas as pd
import pytest

from cadenza import Model
from cadenza.errors import DataError
from conftest import signal_in_step

WORDS = ["good", "great", "fine", "bad", "awful", "dull", "plot", "actor", "scene", "music"]

pytestmark = pytest.mark.usefixtures("simulated_hardware")  # every test runs as fp32 and as bf16 hardware


def frame(n=160, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    text = [" ".join(rng.choice(WORDS, 6)) for _ in range(n)]
    score = np.array([t.count("good") + t.count("great") - t.count("bad") - t.count("awful") for t in text])
    x = rng.normal(size=n)
    return pd.DataFrame({
        "review": text, "x": x, "genre": rng.choice(["drama", "comedy", "horror"], n),
        "flag": rng.choice([True, False], n),
        "sentiment": np.where(score > 0, "pos", "neg"), "liked": score > 0, "rating": 2 * x + score,
        "tags": [" ".join(sorted({w for w in t.split() if w in ("plot", "actor", "music")})) for t in text],
    })


def config(bert, **encoder):
    return {
        "input_features": [
            {"name": "review", "type": "text", "encoder": {"type": "auto_transformer",
                                                           "pretrained_model_name_or_path": str(bert), **encoder},
             "preprocessing": {"max_sequence_length": 16}},
            {"name": "x", "type": "number"}, {"name": "genre", "type": "category"}, {"name": "flag", "type": "binary"},
        ],
        "output_features": [{"name": "sentiment", "type": "category"}, {"name": "liked", "type": "binary"},
                            {"name": "rating", "type": "number"}, {"name": "tags", "type": "set"}],
        "trainer": {"epochs": 3, "batch_size": 32, "learning_rate": 0.01},
    }


def quiet(_):
    pass


def test_all_feature_types_train_predict_and_reload_identically(tiny_bert_dir, cache_dir, tmp_path):
    df = frame()
    model = Model(config(tiny_bert_dir), log=quiet)
    out = model.train(df, output_directory=tmp_path)
    stats = json.loads((out.run_dir / "training_statistics.json").read_text())
    assert len(stats["training"]) == 3 and len(stats["validation"]) == 3
    assert stats["training"][-1]["loss"] < stats["training"][0]["loss"]
    for name in ("model_hyperparameters.json", "training_set_metadata.json", "model_weights.safetensors",
                 "cadenza_model.json"):
        assert (out.model_dir / name).is_file()
    assert not (out.run_dir / "checkpoint").exists()

    predictions = model.predict(df)
    assert {"sentiment_predictions", "sentiment_probability", "sentiment_probabilities_pos",
            "liked_predictions", "liked_probabilities_true", "rating_predictions", "tags_predictions"} <= set(predictions)
    assert len(predictions) == len(df)
    metrics, _ = model.evaluate(df)
    assert {"accuracy", "f1"} <= set(metrics["sentiment"]) and "roc_auc" in metrics["liked"]
    assert {"mae", "rmse", "r2"} <= set(metrics["rating"]) and "jaccard" in metrics["tags"]
    assert metrics["rating"]["r2"] > 0.2  # the number input alone explains much of the rating

    reloaded = Model.load(out.run_dir, log=quiet)
    pd.testing.assert_frame_equal(reloaded.predict(df), predictions)


def test_embedding_cache_hits_for_a_new_head_and_misses_when_embeddings_change(tiny_bert_dir, cache_dir, tmp_path):
    df = frame(80)
    first = Model(config(tiny_bert_dir), log=quiet)
    first.train(df, output_directory=tmp_path)
    assert first.model.cache_stats.misses == len(set(df.review)) and first.model.cache_stats.hits == len(df) - len(set(df.review))

    other_head = config(tiny_bert_dir)
    other_head["combiner"] = {"num_fc_layers": 2, "output_size": 16}
    warm = Model(other_head, log=quiet)
    warm.train(df, output_directory=tmp_path)
    assert warm.model.cache_stats.misses == 0 and warm.model.cache_stats.hits == len(df)
    assert warm.model._encoders == {}  # a warm cache never loads the encoder

    for change in ({"reduce_output": "max"}, {"max_sequence_length": 8}):
        changed = Model(config(tiny_bert_dir, **change), log=quiet)
        changed.train(df, output_directory=tmp_path)
        assert changed.model.cache_stats.misses == len(set(df.review)), change


def test_damaged_cache_shard_is_dropped_and_recomputed(tiny_bert_dir, cache_dir, tmp_path):
    df = frame(40)
    reference = Model(config(tiny_bert_dir), log=quiet)
    reference.train(df, output_directory=tmp_path)
    shards = list(cache_dir.rglob("shard-*.safetensors"))
    assert len(shards) == 1
    shards[0].write_bytes(b"\x00garbage")
    (shards[0].parent / ".shard-interrupted.safetensors.tmp").write_bytes(b"partial")  # a crash mid-write
    logs = []
    again = Model(config(tiny_bert_dir), log=logs.append)
    again.train(df, output_directory=tmp_path)
    assert any("dropping unreadable shard" in line for line in logs)
    assert again.model.cache_stats.misses == len(set(df.review))
    pd.testing.assert_frame_equal(again.predict(df), reference.predict(df))


def test_same_seed_same_result(tiny_bert_dir, cache_dir, tmp_path):
    df = frame(80)
    a = Model(config(tiny_bert_dir), log=quiet).train(df, output_directory=tmp_path, random_seed=7)
    b = Model(config(tiny_bert_dir), log=quiet).train(df, output_directory=tmp_path, random_seed=7)
    assert [e["loss"] for e in a.statistics["training"]] == [e["loss"] for e in b.statistics["training"]]


def test_ctrl_c_stops_at_a_step_boundary_and_resumes_to_the_same_model(tiny_bert_dir, cache_dir, tmp_path):
    """A real SIGINT inside step 7 (in epoch 3 of 3 steps each): the step finishes, a checkpoint is saved, and the
    resumed run ends with the uninterrupted run's statistics and predictions. (Killed and interrupted subprocesses,
    all model kinds: tests/test_resume.py.)"""
    import signal

    from cadenza.train.interrupt import TrainingInterrupted

    df = frame(128)
    cfg = config(tiny_bert_dir)
    cfg["trainer"].update(epochs=4, early_stop=-1)
    full = Model(cfg, log=quiet)
    full_out = full.train(df, output_directory=tmp_path / "full")

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under a shell's background job
    with signal_in_step(7, signal.SIGINT), pytest.raises(TrainingInterrupted) as stopped:
        Model(cfg, log=quiet).train(df, output_directory=tmp_path / "cut")
    run_dir = tmp_path / "cut" / "experiment_run"
    assert stopped.value.exit_code == 130
    assert str(stopped.value) == f"interrupted: checkpoint saved in {run_dir / 'checkpoint'}; rerun with --resume to continue"
    assert signal.getsignal(signal.SIGINT) is before  # the handler of before is back
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())["state"]
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (2, 1, 7) and not (run_dir / "model").exists()

    resumed = Model(cfg, log=quiet)
    out = resumed.train(df, output_directory=tmp_path / "cut", resume=True)
    assert out.run_dir == run_dir and not (run_dir / "checkpoint").exists()
    # the interrupted epoch's mean loss counts the steps taken before the interruption too
    assert [e["loss"] for e in out.statistics["training"]] == \
        pytest.approx([e["loss"] for e in full_out.statistics["training"]], rel=1e-6)
    np.testing.assert_allclose(resumed.predict(df)["rating_predictions"], full.predict(df)["rating_predictions"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoder", [
    {"trainable": True},
    {"adapter": {"type": "lora", "r": 4, "target_modules": ["query", "value"]}},
])
def test_trained_encoders_save_and_reload(tiny_bert_dir, cache_dir, tmp_path, encoder):
    df = frame(64)
    cfg = config(tiny_bert_dir, **encoder)
    cfg["trainer"]["epochs"] = 1
    model = Model(cfg, log=quiet)
    out = model.train(df, output_directory=tmp_path)
    assert not list(cache_dir.rglob("shard-*"))  # a trained encoder's embeddings change: never cached
    from safetensors import safe_open

    with safe_open(out.model_dir / "model_weights.safetensors", "pt") as f:
        keys = list(f.keys())
    if "adapter" in encoder:
        assert any("lora_A" in k for k in keys) and not any(k.endswith("query.base_layer.weight") for k in keys)
        assert (out.model_dir / "encoders" / "review" / "adapter_config.json").is_file()
    else:
        assert any("encoder.layer.0.attention" in k for k in keys)
    reloaded = Model.load(out.model_dir, log=quiet)
    pd.testing.assert_frame_equal(reloaded.predict(df), model.predict(df))


def test_named_data_errors(tiny_bert_dir, cache_dir, tmp_path):
    df = frame(40)
    model = Model(config(tiny_bert_dir), log=quiet)
    with pytest.raises(DataError, match="missing column 'genre'"):
        model.train(df.drop(columns=["genre"]), output_directory=tmp_path)
    with pytest.raises(DataError, match="no rows"):
        model.train(df.iloc[:0], output_directory=tmp_path)
    no_labels = df.assign(rating=np.nan)
    with pytest.raises(DataError, match="output column 'rating' has no labels"):
        model.train(no_labels, output_directory=tmp_path)
    bad_number = df.assign(x=df.x.astype(object))
    bad_number.loc[5, "x"] = "twelve"
    with pytest.raises(DataError, match="column 'x', row 5: 'twelve' is not a number"):
        model.train(training_set=bad_number, output_directory=tmp_path)


def test_missing_values_follow_each_strategy(tiny_bert_dir, cache_dir, tmp_path):
    df = frame(60)
    df.loc[[1, 2], "x"] = np.nan
    df.loc[3, "genre"] = None
    df.loc[[4, 5], "sentiment"] = None  # outputs drop rows by default
    cfg = config(tiny_bert_dir)
    cfg["input_features"][1]["preprocessing"] = {"missing_value_strategy": "fill_with_mean"}
    model = Model(cfg, log=quiet)
    model.train(training_set=df, output_directory=tmp_path)
    assert len(model.predict(df)) == len(df)
    assert model.model.metadata["x"]["fill_value"] == pytest.approx(df.x.mean())


def test_decoder_only_llm_as_encoder_with_last_token_pooling(tiny_llama_dir, cache_dir, tmp_path):
    """A causal LM checkpoint loads through AutoModel as the bare transformer: no LM head is loaded or run."""
    df = frame(48)
    cfg = {"input_features": [{"name": "review", "type": "text", "encoder": {
        "type": "auto_transformer", "pretrained_model_name_or_path": str(tiny_llama_dir), "reduce_output": "last"}}],
        "output_features": [{"name": "sentiment", "type": "category"}], "trainer": {"epochs": 1}}
    model = Model(cfg, log=quiet)
    model.train(df, output_directory=tmp_path)
    encoder = model.model._encoders["review"][0]
    assert type(encoder.backbone).__name__ == "LlamaModel"
    assert not any("lm_head" in n for n, _ in encoder.named_parameters())
    assert len(model.predict(df)) == len(df)


def test_pooling_handles_left_and_right_padding():
    import torch

    from cadenza.ecd.text_encoder import pool

    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, left, "cls").flatten().tolist() == [2.0, 4.0]
    assert pool(hidden, right, "mean").flatten().tolist() == [0.5, 5.5]
    assert pool(hidden, right, "max").flatten().tolist() == [1.0, 7.0]


def test_residual_combiner_and_training_set_evaluation(tiny_bert_dir, cache_dir, tmp_path):
    import torch

    from cadenza.ecd.network import Residual, mlp

    net, size = mlp(8, [{"output_size": 8}, {"output_size": 4}], "relu", 0.0, None, residual=True)
    assert isinstance(net[0], Residual) and not isinstance(net[1], Residual) and size == 4  # widths differ: no skip
    x = torch.randn(3, 8)
    torch.testing.assert_close(net[0](x), x + net[0].body(x))

    cfg = config(tiny_bert_dir)
    cfg["combiner"] = {"num_fc_layers": 2, "output_size": 16, "residual": True}
    cfg["trainer"].update(epochs=2, evaluate_training_set=True)
    model = Model(cfg, log=quiet)
    out = model.train(frame(96), output_directory=tmp_path)
    assert any(isinstance(m, Residual) for m in model.model.net.combiner)
    for epoch in out.statistics["training"]:
        assert 0.0 <= epoch["metrics"]["sentiment"]["accuracy"] <= 1.0 and "loss" in epoch["metrics"]["combined"]
    reloaded = Model.load(out.run_dir)  # the residual layout is rebuilt from the saved config
    pd.testing.assert_frame_equal(reloaded.predict(frame(8)), model.predict(frame(8)))


def test_ludwig_ecd_config_with_its_rendered_keys_runs_unchanged(tiny_bert_dir, cache_dir, tmp_path):
    from pathlib import Path

    import yaml

    text = (Path(__file__).parent / "data" / "ludwig_ecd_full.yaml").read_text()
    raw = yaml.safe_load(text.replace("TINY_BERT", str(tiny_bert_dir)))
    df = frame(120).assign(year=lambda d: 1990 + (d.x * 5).round())
    model = Model(raw, log=quiet)
    out = model.train(df, output_directory=tmp_path)
    assert 1 <= len(out.statistics["training"]) <= 10 and out.statistics["validation"]
    assert "accuracy" in out.statistics["validation"][0]["sentiment"]  # validation_metric: accuracy is watched
    assert set(model.predict(df.head(5))["sentiment_predictions"]) <= {"pos", "neg"}


def test_combiner_initializers_bias_and_norm_params():
    from cadenza.ecd.network import mlp

    net, _ = mlp(4, [{"output_size": 3}], "relu", 0.0, "layer", norm_params={"eps": 0.5},
                 use_bias=False, weights_initializer="ones")
    assert net[0].bias is None and bool((net[0].weight == 1).all()) and net[1].eps == 0.5
    net, _ = mlp(4, [{"output_size": 3}], "relu", 0.0, None, bias_initializer="ones")
    assert bool((net[0].bias == 1).all())


def test_embedding_interrupted_midway_keeps_the_finished_chunks(tmp_path):
    from cadenza.ecd.embed_cache import EmbeddingCache, cached_embeddings

    texts = [f"text {i}" for i in range(10)]
    fake = lambda batch: np.array([[float(t.split()[1]), 1.0] for t in batch], dtype=np.float32)  # noqa: E731
    calls = []

    def crashing(batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fake(batch)

    cache = EmbeddingCache(tmp_path / "enc")
    with pytest.raises(KeyboardInterrupt):
        cached_embeddings(texts, cache, crashing, log=quiet, chunk=4)
    vectors, stats = cached_embeddings(texts, cache, fake, log=quiet, chunk=4)
    assert (stats.hits, stats.misses) == (8, 2)  # the two finished chunks came from the cache
    np.testing.assert_array_equal(vectors, fake(texts))


def test_gguf_encoder_conversion_goes_to_the_configured_cache(tiny_llama_dir, cache_dir, tmp_path, monkeypatch):
    import cadenza.llm.load as load

    asked = []

    def converted(source, cache=None, log=print):  # stands in for the ~40 s dequantization of a real GGUF
        asked.append((source, cache))
        return str(tiny_llama_dir)

    monkeypatch.setattr(load, "plain_model_dir", converted)
    gguf = str(tmp_path / "encoder.Q4_1.gguf")
    (tmp_path / "encoder.Q4_1.gguf").write_bytes(b"")  # it must exist: a missing encoder file is refused up front
    cfg = {"input_features": [{"name": "review", "type": "text", "preprocessing": {"max_sequence_length": 8},
                               "encoder": {"type": "auto_transformer", "pretrained_model_name_or_path": gguf,
                                           "reduce_output": "last"}}],
           "output_features": [{"name": "sentiment", "type": "category"}],
           "preprocessing": {"cache_dir": str(tmp_path / "my-cache")}, "trainer": {"epochs": 1}}
    Model(cfg, log=quiet).train(frame(32), output_directory=tmp_path / "out")
    assert asked and set(asked) == {(gguf, str(tmp_path / "my-cache"))}
    assert list((tmp_path / "my-cache" / "embeddings").iterdir())  # the embeddings went there too


@pytest.mark.parametrize("which", ["minilm", "smollm2", "smollm2_left"])
def test_token_ids_match_the_tokenizer_call(which, llama_tokenizer_dir, monkeypatch):
    """ecd tokenizes through the fast tokenizer's backend directly, long texts cut at a whitespace first: the same ids
    as transformers' call (WordPiece and byte-level BPE, truncation from either side), also for texts whose cut
    prefix holds too few tokens, and the user's tokenizer is left as it was."""
    from transformers import AutoTokenizer

    from cadenza.data import assets
    from cadenza.ecd import tokens

    tok = AutoTokenizer.from_pretrained(str(assets.minilm_dir()) if which == "minilm" else str(llama_tokenizer_dir))
    if which == "smollm2_left":
        tok.truncation_side = "left"
    backend = tok.backend_tokenizer
    assert (tokens._cut_layout(tok, 16) is not None) == (which != "smollm2_left")
    reviews = assets.rotten_tomatoes()["text"].dropna().astype(str)
    texts = ["", "a", "The film's Über-ending is naïve, 天气很好 — 🎬!", "[SEP] <|im_end|> [CLS]  spaced   out ",
             " ".join(f"word{i}" for i in range(300)), "tab\tand\nnewline " * 40,
             "x" * 150 + " short " + "y" * 600 + " end",  # MiniLM: the cut prefix holds 3 tokens ([UNK] for long words)
             "pneumonoultramicroscopicsilicovolcanoconiosis " * 30, "天气很好" * 200, "   " + "lead " * 100,
             # whitespace other than a space where a cut could fall: BERT's normalizer deletes \x1c, joining the words
             *[f"{'a' * n}{odd}{'b' * 10}{' c' * 100}" for n in (40, 128) for odd in "\x1c\n\u00a0\u3000"]] + \
        reviews.head(200).tolist() + [" ".join(reviews.iloc[i:i + 6]) for i in range(0, 240, 6)]
    sent = []
    monkeypatch.setattr(tokens, "_truncating_backend",
                        lambda t, n, real=tokens._truncating_backend: _Recording(real(t, n), sent))
    monkeypatch.setattr(tokens, "_cut_layout", lambda t, n, real=tokens._cut_layout:
                        None if real(t, n) is None else (_Recording(real(t, n)[0], sent), *real(t, n)[1:]))
    for max_length in (5, 16, 64):
        sent.clear()
        assert tokens.token_ids(tok, texts, max_length) == tok(texts, truncation=True, max_length=max_length)["input_ids"]
        if which != "smollm2_left":  # long texts were cut before tokenizing
            assert sum(map(len, sent[0])) < sum(map(len, texts)) / 2
        if which == "minilm":  # ...and the one whose prefix overflowed nothing tokenized again whole
            assert len(sent) == 2 and sent[1][0].startswith("x" * 150)
    backend.no_truncation()
    tokens.token_ids(tok, texts, 16)
    assert tok.backend_tokenizer.truncation is None  # not set by token_ids


class _Recording:
    """A tokenizer backend that records the texts each encode_batch call gets."""

    def __init__(self, backend, sent: list):
        self.backend, self.sent = backend, sent

    def encode_batch(self, texts, **kwargs):
        self.sent.append(list(texts))
        return self.backend.encode_batch(texts, **kwargs)

    def encode_batch_fast(self, texts, **kwargs):  # what token_ids calls (no character offsets)
        self.sent.append(list(texts))
        return self.backend.encode_batch_fast(texts, **kwargs)


def test_embedding_batches_hold_more_tokens_for_narrow_encoders(tiny_bert_dir, monkeypatch):
    """The embedding pass's token budget a batch is MiniLM's 2,048 at width 384 and wider, and grows for narrower
    encoders (the same bytes a hidden state): the tiny BERT (width 32) embeds in 12x larger batches, with the
    same vectors as small batches give."""
    import torch

    from cadenza import device
    from cadenza.config.load import load_config
    from cadenza.ecd import text_encoder
    from cadenza.ecd.text_encoder import TextEncoder, batch_token_budget, load_tokenizer

    assert batch_token_budget(384) == batch_token_budget(1024) == text_encoder.TOKENS_PER_BATCH == 2048
    assert batch_token_budget(32) == 12 * 2048
    cfg = load_config({"model_type": "ecd",
                       "input_features": [{"name": "review", "type": "text", "encoder": {
                           "type": "auto_transformer", "pretrained_model_name_or_path": str(tiny_bert_dir)}}],
                       "output_features": [{"name": "sentiment", "type": "category"}]}).input_features[0].encoder
    encoder = TextEncoder(cfg)
    budgets = []
    real = text_encoder.length_batches
    monkeypatch.setattr(text_encoder, "length_batches", lambda *a: budgets.append(a[2]) or real(*a))
    texts = [" ".join(["good plot"] * (1 + i % 40)) for i in range(600)]
    fp32 = device.Precision(False, "fp32")
    default = encoder.embed(texts, load_tokenizer(cfg), 64, fp32)
    small = encoder.embed(texts, load_tokenizer(cfg), 64, fp32, tokens_per_batch=256)
    assert budgets == [12 * 2048, 256]
    assert torch.allclose(torch.from_numpy(default), torch.from_numpy(small), atol=1e-5)
