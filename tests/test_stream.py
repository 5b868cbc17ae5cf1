"""Data larger than memory (docs/scale.md): a Parquet file streamed in chunks trains the same model as the same rows in
memory; the memory-mapped embedding cache gives what the shards hold; predictions stream to a file; peak memory
does not grow with the rows."""

import json
import textwrap

import numpy as np
import pandas as pd
import pytest

from cadenza import Model
from conftest import PRINT_PEAK_RSS, script_peak_rss_mb
from cadenza.data import stream

pytestmark = pytest.mark.usefixtures("simulated_hardware")  # every test runs as fp32 and as bf16 hardware

WORDS = ["good", "great", "fine", "bad", "awful", "dull", "plot", "actor", "scene", "music"]


def frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    text = [" ".join(rng.choice(WORDS, 5)) for _ in range(n)]
    score = np.array([t.count("good") + t.count("great") - t.count("bad") - t.count("awful") for t in text])
    x = rng.normal(size=n)
    x[rng.random(n) < 0.05] = np.nan  # dropped rows (drop_row below): the streamed arrays keep gaps
    return pd.DataFrame({"review": text, "x": x, "genre": rng.choice(["drama", "comedy", "horror"], n),
                         "flag": rng.choice([True, False], n), "sentiment": np.where(score > 0, "pos", "neg"),
                         "rating": 2 * np.nan_to_num(x) + score})


def config(bert, **preprocessing) -> dict:
    return {
        "input_features": [
            {"name": "review", "type": "text", "encoder": {"type": "auto_transformer",
                                                           "pretrained_model_name_or_path": str(bert)},
             "preprocessing": {"max_sequence_length": 16}},
            {"name": "x", "type": "number", "preprocessing": {"missing_value_strategy": "drop_row"}},
            {"name": "genre", "type": "category"}, {"name": "flag", "type": "binary"}],
        "output_features": [{"name": "sentiment", "type": "category"}, {"name": "rating", "type": "number"}],
        "trainer": {"epochs": 2, "batch_size": 16, "learning_rate": 0.01},
        **({"preprocessing": preprocessing} if preprocessing else {}),
    }


def quiet(_):
    pass


def untimed(entries: list) -> list:
    """Per-epoch statistics without the wall-clock figures (seconds, rows per second)."""
    return [json.loads(json.dumps(e, default=str), object_hook=lambda d: {k: v for k, v in d.items()
                                                                           if "second" not in k}) for e in entries]


@pytest.fixture
def small_chunks(monkeypatch):
    """Stream files of any size, in chunks of 64 rows (so a few hundred rows cross many chunk edges)."""
    monkeypatch.setattr(stream, "MIN_ROWS", 0)
    monkeypatch.setattr(stream, "CHUNK_ROWS", 64)


@pytest.mark.parametrize("preprocessing", [{}, {"sample_size": 250, "split": {"type": "stratify", "column": "genre"}}],
                         ids=["random-split", "sampled-stratified"])
def test_streamed_training_equals_in_memory(tiny_bert_dir, cache_dir, tmp_path, small_chunks, preprocessing):
    df = frame(300)
    path = tmp_path / "data.parquet"
    df.to_parquet(path)
    memory = Model(config(tiny_bert_dir, **preprocessing), log=quiet)
    in_memory = memory.train(pd.read_parquet(path), output_directory=tmp_path / "a", random_seed=3)
    logs = []
    streamed = Model(config(tiny_bert_dir, **preprocessing), log=logs.append)
    out = streamed.train(str(path), output_directory=tmp_path / "b", random_seed=3)
    assert any("streamed in chunks" in line for line in logs)
    assert isinstance(streamed._splits_used["training"], stream.FileRows)
    assert streamed.model.cache_stats.misses == 0  # the in-memory run filled the cache; same texts, same vectors

    assert untimed(out.statistics["training"]) == untimed(in_memory.statistics["training"])
    assert untimed(out.statistics["validation"]) == untimed(in_memory.statistics["validation"])
    assert not list((cache_dir / "rows").iterdir())  # the scratch row arrays are gone
    test = memory._splits_used["test"]
    pd.testing.assert_frame_equal(streamed.predict(test), memory.predict(test))
    metrics_memory, _ = memory.evaluate(test)
    metrics_streamed, _ = streamed.evaluate(streamed._splits_used["test"])  # evaluated chunk by chunk
    assert metrics_streamed.keys() == metrics_memory.keys()
    for name, metrics in metrics_memory.items():
        assert metrics_streamed[name] == pytest.approx(metrics), name


def test_streamed_run_resumes_and_refuses_a_changed_file(tiny_bert_dir, cache_dir, tmp_path, small_chunks):
    df = frame(200)
    path = tmp_path / "data.parquet"
    df.to_parquet(path)
    first = Model(config(tiny_bert_dir), log=quiet).train(str(path), output_directory=tmp_path)
    fingerprint = json.loads((first.run_dir / "description.json").read_text())["data_sha256"]
    again = Model(config(tiny_bert_dir), log=quiet).train(str(path), output_directory=tmp_path)
    assert json.loads((again.run_dir / "description.json").read_text())["data_sha256"] == fingerprint
    frame(200, seed=1).to_parquet(path)
    changed = Model(config(tiny_bert_dir), log=quiet).train(str(path), output_directory=tmp_path)
    assert json.loads((changed.run_dir / "description.json").read_text())["data_sha256"] != fingerprint


def test_memory_mapped_cache_lookups_equal_the_shards(tmp_path):
    from safetensors.numpy import load_file

    from cadenza.ecd.embed_cache import CachedEmbedder, EmbeddingCache, text_key

    def fake(batch):  # a deterministic "encoder": 8 numbers from each text
        return np.array([[len(t) + j * ord(t[-1]) for j in range(8)] for t in batch], dtype=np.float32)

    texts = [f"text {i % 700}" for i in range(1000)]  # repeats within and across calls
    embedder = CachedEmbedder(EmbeddingCache(tmp_path), fake, log=quiet, chunk=128)
    first = np.concatenate([embedder(texts[i:i + 300]) for i in range(0, 1000, 300)])
    assert (embedder.stats.misses, embedder.stats.hits) == (700, 300)
    assert len(list(tmp_path.glob("shard-*.safetensors"))) > 4

    in_memory = {}  # the old lookup: every shard loaded into one dict
    for shard in tmp_path.glob("shard-*.safetensors"):
        data = load_file(str(shard))
        in_memory.update({k.tobytes(): v for k, v in zip(data["keys"], data["embeddings"])})
    expected = np.stack([in_memory[text_key(t)] for t in texts])
    np.testing.assert_array_equal(first, expected)
    again = CachedEmbedder(EmbeddingCache(tmp_path), fake, log=quiet)
    shuffled = list(np.random.default_rng(0).permutation(texts))
    np.testing.assert_array_equal(again(shuffled), np.stack([in_memory[text_key(t)] for t in shuffled]))
    assert (again.stats.misses, again.stats.hits) == (0, 1000)


def test_streamed_predictions_to_a_file_equal_in_memory(tiny_bert_dir, cache_dir, tmp_path, small_chunks):
    df = frame(300)
    df.to_parquet(tmp_path / "data.parquet")
    model = Model(config(tiny_bert_dir), log=quiet)
    model.train(df, output_directory=tmp_path)
    expected = model.predict(df)
    for name in ("p.csv", "p.parquet"):
        rows = model.predict_to_file(str(tmp_path / "data.parquet"), tmp_path / name)
        assert rows == len(expected) == df.x.notna().sum()
        written = pd.read_csv(tmp_path / name) if name.endswith(".csv") else pd.read_parquet(tmp_path / name)
        pd.testing.assert_frame_equal(written, expected, check_dtype=False)
    assert not list(tmp_path.glob(".*.tmp"))
    assert model.predict_to_file(df, tmp_path / "from_frame.csv") == len(expected)  # a DataFrame works too
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "from_frame.csv"), expected, check_dtype=False)


PEAK_RSS = textwrap.dedent("""
    import json, sys
    import numpy as np, pandas as pd
    from cadenza import Model
    from cadenza.data import stream
    rows, path, bert, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    stream.MIN_ROWS, stream.CHUNK_ROWS = 0, 4096  # both sizes span many chunks: what grows is per row, not per chunk
    rng = np.random.default_rng(0)
    words = np.array(["good", "bad", "plot", "fine", "dull", "music", "scene", "actor"])
    pick = rng.integers(0, len(words), (rows, 3))
    text = pd.Series(words[pick[:, 0]]) + " " + words[pick[:, 1]] + " " + words[pick[:, 2]] + " " + \\
        pd.Series(np.arange(rows)).astype(str)  # every text distinct: the cache grows with the rows
    pd.DataFrame({"review": text, "x": rng.normal(size=rows), "label": np.where(pick[:, 0] < 4, "a", "b")}
                 ).to_parquet(path, row_group_size=4096)  # big files come in row groups (docs/scale.md)
    del text, pick
    config = {"input_features": [{"name": "review", "type": "text", "encoder": {"type": "auto_transformer",
              "pretrained_model_name_or_path": bert}, "preprocessing": {"max_sequence_length": 8}},
              {"name": "x", "type": "number"}],
              "output_features": [{"name": "label", "type": "category"}],
              # fp32: under bf16 autocast each new batch shape adds oneDNN primitives (~2.5 MB a 4k-text chunk
              # here, up to the primitive cache's capacity) - the encoder's memory, not the data path's
              "trainer": {"epochs": 1, "batch_size": 256, "use_mixed_precision": False}}
    model = Model(config, log=lambda _: None)
    model.train(path, output_directory=out, skip_save_model=True, skip_save_log=True)
    model.predict_to_file(path, out + "/predictions.csv")
""") + PRINT_PEAK_RSS


def peak_rss_mb(rows: int, tmp_path, bert) -> float:
    return script_peak_rss_mb(PEAK_RSS, rows, tmp_path, bert)


def test_peak_memory_does_not_grow_with_rows(tiny_bert_dir, tmp_path, simulated_hardware):
    """Train + predict to a file on 10k and 100k distinct texts (each embedded, cached, trained on and predicted):
    held in memory, the 90k more rows cost ~1 KB each (~90 MB: data frame, embedding matrix, the cache as a dict
    of every vector); streamed, peak RSS grows by a small fraction of that (row numbers, training order, the
    cache's key index)."""
    if simulated_hardware.bf16_units:
        pytest.skip("memory does not depend on the precision: measured once")
    small, big = peak_rss_mb(10_000, tmp_path, tiny_bert_dir), peak_rss_mb(100_000, tmp_path, tiny_bert_dir)
    # held in memory the same script grows ~169 MB (1.9 KB a row); streamed it was measured at 0-48 MB
    assert big - small < 80, (small, big)  # under ~900 bytes a row


def test_prefetched_keeps_order_raises_errors_and_stops_when_closed():
    """Streamed batches are gathered a batch ahead in a thread: same items in the same order, a producer's error
    raised in the consumer, and a consumer that stops early leaves no thread running."""
    import threading

    assert list(stream.prefetched(iter(range(1000)))) == list(range(1000))
    assert list(stream.prefetched(iter([]))) == []

    def failing():
        yield 1
        raise OSError("row 7 is cut short")

    got = []
    with pytest.raises(OSError, match="row 7"):
        for item in stream.prefetched(failing()):
            got.append(item)
    assert got == [1]

    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    items = stream.prefetched(endless(), depth=2)
    assert [next(items) for _ in range(5)] == [0, 1, 2, 3, 4]
    items.close()
    assert not [t for t in threading.enumerate() if t.name == "cadenza-prefetch"]
    assert len(produced) <= 5 + 2 + 2  # at most the queue's depth (and one in hand) beyond what was taken


def test_row_arrays_read_back_what_was_written_narrow_ones_in_memory(tmp_path):
    """Rows written chunk by chunk in any order read back by any row numbers (repeats, runs of consecutive rows,
    one row, none). Wide rows (an embedding) live in a file; narrow ones (a number, a category's index: at most
    IN_MEMORY_ROW_BYTES) in memory, with no file."""
    rng = np.random.default_rng(0)
    n = 1000
    wide = rng.standard_normal((n, 32)).astype(np.float32)
    narrow = rng.integers(0, 9, n)
    store = stream.RowArrays(tmp_path / "split", n)
    for part in np.array_split(rng.permutation(n), 7):
        store.write("review", part, wide[part])
        store.write("critic", part, narrow[part])
    assert isinstance(store["review"], stream.RowArray) and isinstance(store["critic"], np.ndarray)
    assert [p.name for p in (tmp_path / "split").iterdir()] == ["0.bin"]
    for index in (rng.integers(0, n, 300), np.arange(100, 400), np.array([5, 5, 4, 999]), np.array([7]),
                  np.array([], dtype=np.int64)):
        assert np.array_equal(store["review"][index], wide[index])
        assert np.array_equal(store["critic"][index], narrow[index])
