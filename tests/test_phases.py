"""Where a run's time goes (cadenza.phases), the embedding pass's batches and FLOPs, and the head's thread setting."""

import json
import re
import time

import numpy as np
import pandas as pd
import pytest
import torch

from cadenza import Model, phases
from cadenza.ecd.network import ONE_THREAD_BELOW_FLOPS, threads_for, torch_threads
from cadenza.ecd.text_encoder import length_batches

WORDS = ["good", "great", "fine", "bad", "awful", "dull", "plot", "actor", "scene", "music"]


# ------------------------------------------------------------------------------------------- the record itself
def test_nested_phases_count_once_and_add_up_to_the_wall_time():
    with phases.recording() as record:
        with phases.phase("epochs"):
            time.sleep(0.05)
            with phases.phase("evaluation"):
                time.sleep(0.03)
        with phases.phase("evaluation"):
            time.sleep(0.02)
        time.sleep(0.02)  # unmarked: "other"
    s = record.summary()
    p = s["phases"]
    assert p["epochs"]["seconds"] == pytest.approx(0.05, abs=0.03)  # the inner evaluation left out
    assert p["evaluation"]["seconds"] == pytest.approx(0.05, abs=0.03)  # both evaluations
    assert p["other"]["seconds"] >= 0.015
    assert sum(e["seconds"] for e in p.values()) == pytest.approx(s["total_seconds"], rel=1e-6)
    assert sum(e["share"] for e in p.values()) == pytest.approx(1.0, rel=1e-6)
    assert list(p) == ["epochs", "evaluation", "other"]  # the table's order, other last


def test_a_recording_inside_another_joins_it_and_nothing_outlives_it():
    assert phases.current() is None
    with phases.recording() as outer:
        with phases.recording() as inner:
            assert inner is outer
            with phases.phase("data"):
                pass
        assert phases.current() is outer
    assert phases.current() is None
    assert "data" in outer.seconds
    with phases.phase("data"):  # outside any recording: nothing recorded, nothing fails
        phases.note("data", rows=3)


def test_notes_add_numbers_and_give_a_rate_and_a_share_of_peak():
    with phases.recording() as record:
        with phases.phase("embed"):
            time.sleep(0.02)
        phases.note("embed", flops=1e9, tokens=100, peak_flops=1e12, precision="bf16")
        phases.note("embed", flops=1e9, tokens=50, peak_flops=1e12)
    e = record.summary()["phases"]["embed"]
    assert e["flops"] == 2e9 and e["tokens"] == 150 and e["peak_flops"] == 1e12
    assert e["flops_per_second"] == pytest.approx(2e9 / e["seconds"])
    assert e["share_of_peak"] == pytest.approx(e["flops_per_second"] / 1e12)
    assert "% of the bf16 peak" in record.table()


def test_from_process_start_counts_what_ran_before_as_imports():
    assert phases.process_age() > 0
    with phases.recording(from_process_start=True) as record:
        pass
    s = record.summary()
    assert s["phases"]["imports"]["seconds"] == pytest.approx(s["total_seconds"], abs=0.05)


# ---------------------------------------------------------------------------------------------- threads
def test_torch_threads_is_restored_after_the_block_and_after_an_error():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_a_tiny_head_runs_on_one_thread_and_a_wide_one_keeps_torchs_setting():
    tiny = torch.nn.Linear(384, 2)
    wide = torch.nn.Sequential(torch.nn.Linear(384, 4096), torch.nn.Linear(4096, 2))
    assert threads_for(tiny, 64) == 1
    assert 2 * 64 * 384 * 4096 >= ONE_THREAD_BELOW_FLOPS and threads_for(wide, 64) is None


# ----------------------------------------------------------------------------------------- embedding batches
def test_length_batches_cover_every_text_once_within_the_token_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, 1000)
    lengths[7] = 300  # longer than the budget: a batch of its own
    order = np.argsort(lengths, kind="stable")
    batches = list(length_batches(lengths, order, 256))
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(1000))
    for b in batches:
        assert len(b) == 1 or len(b) * lengths[b].max() <= 256
    assert [7] in [b.tolist() for b in batches]
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded < 1.1 * lengths.sum()  # sorted by length: little padding


# ------------------------------------------------------------------------------------------- ecd end to end
def frame(n=120, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    text = [" ".join(rng.choice(WORDS, rng.integers(2, 12))) for _ in range(n)]
    score = np.array([t.count("good") + t.count("great") - t.count("bad") - t.count("awful") for t in text])
    return pd.DataFrame({"review": text, "sentiment": np.where(score > 0, "pos", "neg")})


def config(bert) -> dict:
    return {"input_features": [{"name": "review", "type": "text",
                                "encoder": {"type": "auto_transformer", "pretrained_model_name_or_path": str(bert)},
                                "preprocessing": {"max_sequence_length": 16, "cache_encoder_embeddings": True}}],
            "output_features": [{"name": "sentiment", "type": "category"}],
            "combiner": {"type": "concat", "num_fc_layers": 0},
            "trainer": {"epochs": 3, "batch_size": 16, "learning_rate": 0.01}}


@pytest.mark.usefixtures("simulated_hardware")
def test_train_and_experiment_record_their_phases(tiny_bert_dir, cache_dir, tmp_path):
    lines = []
    before = torch.get_num_threads()
    model = Model(config(tiny_bert_dir), log=lines.append)
    out, _ = model.experiment(frame(), output_directory=tmp_path)
    assert torch.get_num_threads() == before  # the head's one thread did not outlive training
    stats = json.loads((out.run_dir / "training_statistics.json").read_text())
    s = stats["phases"]
    p = s["phases"]
    for name in ("data", "model load", "tokenize", "embed", "preprocessing", "head epochs", "evaluation", "writing"):
        assert p[name]["seconds"] > 0, name
    assert sum(e["seconds"] for e in p.values()) == pytest.approx(s["total_seconds"], rel=1e-6)
    assert p["other"]["share"] < 0.5  # the named phases hold most of the run
    assert p["head epochs"]["threads"] == 1 and p["head epochs"]["rows"] == 3 * len(model._splits_used["training"])
    embed = p["embed"]
    assert embed["texts"] == 120 and embed["flops"] > 0 and 0 < embed["share_of_peak"]
    assert lines[-1].startswith("time by phase") and "embed" in lines[-1]  # printed once, at the end
    assert sum(line.startswith("time by phase") for line in lines) == 1


@pytest.mark.usefixtures("simulated_hardware")
def test_a_slow_first_peak_reading_is_not_the_share_of_peak_printed(tiny_bert_dir, cache_dir, tmp_path,
                                                                     slow_first_peak_reading):
    """The embedding pass ran faster than the peak's first reading: the peak is measured again and the share printed
    is of the higher reading (it was "114% of the bf16 peak" in one cold README experiment)."""
    readings = slow_first_peak_reading
    Model(config(tiny_bert_dir), log=lambda *_: None).train(frame(), output_directory=tmp_path)
    stats = json.loads((tmp_path / "experiment_run" / "training_statistics.json").read_text())
    embed = stats["phases"]["phases"]["embed"]
    assert len(readings) == 2 and embed["peak_flops"] == readings[1] > 1e6
    assert 0 < embed["share_of_peak"] < 1


@pytest.mark.usefixtures("simulated_hardware")
def test_the_heads_results_do_not_depend_on_its_thread_count(tiny_bert_dir, cache_dir, tmp_path, monkeypatch):
    """One thread for a tiny head is a speed choice only: the same losses as with torch's thread setting."""
    import cadenza.ecd as ecd

    losses = {}
    for name, choice in (("one", lambda net, rows: 1), ("default", lambda net, rows: None)):
        monkeypatch.setattr(ecd, "threads_for", choice)
        out = Model(config(tiny_bert_dir), log=lambda _: None).train(frame(), output_directory=tmp_path / name)
        losses[name] = [e["loss"] for e in out.statistics["training"]]
    assert losses["one"] == pytest.approx(losses["default"], rel=1e-5)


@pytest.mark.usefixtures("simulated_hardware")
def test_embedding_matches_one_text_at_a_time_and_counts_its_flops(tiny_bert_dir, simulated_hardware):
    from cadenza import device
    from cadenza.config.load import load_config
    from cadenza.ecd.text_encoder import TextEncoder, load_tokenizer

    cfg = load_config({**config(tiny_bert_dir), "model_type": "ecd"}).input_features[0].encoder
    precision = device.precision(None, "embed")
    encoder = TextEncoder(cfg, dtype=precision.dtype)
    tokenizer = load_tokenizer(cfg)
    texts = frame(40)["review"].tolist()
    with phases.recording() as record:
        batched = encoder.embed(texts, tokenizer, 16, precision, tokens_per_batch=64)
    reference = TextEncoder(cfg)  # fp32, one text at a time, no padding
    with torch.no_grad():
        single = np.stack([reference(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0].numpy()
                           for ids in tokenizer(texts, truncation=True, max_length=16)["input_ids"]])
    if precision.bf16:  # bf16 weights and activations: close, not equal
        cos = (batched * single).sum(1) / np.linalg.norm(batched, axis=1) / np.linalg.norm(single, axis=1)
        assert cos.min() > 0.99
    else:
        np.testing.assert_allclose(batched, single, atol=1e-5)
    lengths = np.array([len(x) for x in tokenizer(texts, truncation=True, max_length=16)["input_ids"]])
    # tiny BERT: 2 layers of 4 (32 x 32) attention projections and (32 x 64) + (64 x 32) feed-forward weights
    linear = 2 * (4 * 32 * 32 + 2 * 32 * 64)
    expected = 2 * linear * lengths.sum() + 4 * 2 * 32 * (lengths ** 2).sum()
    assert record.figures["embed"]["flops"] == pytest.approx(expected)
    assert record.figures["embed"]["tokens"] == lengths.sum()


def test_the_command_prints_its_breakdown_counted_from_the_process_start(tiny_bert_dir, cache_dir, tmp_path):
    import subprocess
    import sys

    import yaml

    frame().to_csv(tmp_path / "reviews.csv", index=False)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model_type": "ecd", **config(tiny_bert_dir)}))
    # `cadenza train` as the console script runs it, then a look at what it imported: DeepSpeed (installed here)
    # costs ~1 s to import and a run that does not use it must not pay that (Accelerate's unwrap_model would)
    command = ("import sys; from cadenza.cli import main; code = main(sys.argv[1:]); "
               "print('deepspeed imported:', 'deepspeed' in sys.modules); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", command, "train", "-c", str(tmp_path / "c.yaml"), "--dataset",
                           str(tmp_path / "reviews.csv"), "-od", str(tmp_path / "out"), "--skip_save_log"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "deepspeed imported: False" in done.stdout
    table = done.stdout[done.stdout.index("time by phase"):].splitlines()
    rows = {m[1]: float(m[2]) for m in (re.match(r"\s+(.+?)\s+([\d.]+) s ", line) for line in table[1:]) if m}
    assert {"imports", "data", "model load", "embed", "head epochs", "writing", "other"} <= set(rows)
    assert rows["imports"] > 0.3  # the interpreter, torch, transformers: counted from the process's start
    total = float(table[0].split("wall ")[1].split(" s")[0])
    assert sum(rows.values()) == pytest.approx(total, abs=0.02 * len(rows))
    stats = json.loads(next((tmp_path / "out").glob("*/training_statistics.json")).read_text())
    assert stats["phases"]["phases"]["imports"]["seconds"] > 0.3


def test_an_llm_experiment_records_its_phases(tiny_llama_dir, cache_dir, tmp_path):
    """The generative recipe marks its work too: before, its table read "other 99.7%" (bench_llm's runs)."""
    lines = []
    cfg = {"model_type": "llm", "base_model": str(tiny_llama_dir),
           "input_features": [{"name": "question", "type": "text"}],
           "output_features": [{"name": "answer", "type": "text"}], "generation": {"max_new_tokens": 4},
           "adapter": {"type": "lora", "postprocessor": {"merge_adapter_into_base_model": True}},
           "trainer": {"type": "finetune", "epochs": 2, "batch_size": 4}}
    fruit = ["apple", "banana", "cherry", "grape", "lemon", "mango"]
    df = pd.DataFrame({"question": [f"what colour is the {fruit[i % 6]}? ({i})" for i in range(30)],
                       "answer": [fruit[(i + 1) % 6] for i in range(30)]})
    with phases.recording() as record:  # as the CLI's: Model() imports the model type's modules (~3 s cold for llm)
        model = Model(cfg, log=lines.append)
        assert "imports" in record.seconds
    out, _ = model.experiment(df, output_directory=tmp_path, skip_save_log=True)
    s = json.loads((out.run_dir / "training_statistics.json").read_text())["phases"]
    p = s["phases"]
    for name in ("data", "estimate", "model load", "tokenize", "measure peak", "epochs", "evaluation", "generate",
                 "merge", "writing"):
        assert p[name]["seconds"] > 0, name
    assert sum(e["seconds"] for e in p.values()) == pytest.approx(s["total_seconds"], rel=1e-6)
    assert p["other"]["share"] < 0.25, lines[-1]
    assert lines[-1].startswith("time by phase") and "epochs" in lines[-1]
    with phases.recording() as record:  # as `cadenza predict` records it
        Model.load(out.run_dir, log=lambda _: None).predict(df.head(4))
    assert {"model load", "generate"} <= set(record.seconds)
