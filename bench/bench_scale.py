"""ecd train + predict on Parquet files of 3k to 1M rows: time per row and peak RSS per size (docs/scale.md).

Each size runs in its own process (its peak RSS is its own), with an empty embedding cache, on a file written by
bench/make_big_parquet.py (distinct review texts from the packaged Rotten Tomatoes snippets, a number and a
category column, a fresh/rotten/plot label). The encoder is a tiny random BERT (2 layers, hidden 32, MiniLM's
real tokenizer, built once into the bench folder) so that a million rows run here in minutes: the cost per row
is then mostly Cadenza's own (reading, hashing, caching, batching), which is what must stay linear.

Per size: `Model.train(dataset=<file>)` (max 16 tokens a text, 70/10/20 split, 2 epochs, batch 256) and `Model.predict_to_file(<file>, .csv)`
(every row), each timed in the child; Python start-up and imports are not in the figures. Per size the table
gives the time per row after the start-up phases, and the slope: the time each row between the size above and this
one added (a run's other fixed costs, such as the train's start line, cancel out). The train's phase
breakdown (cadenza.phases) is printed under the table. Before training, the
child asks `Model.estimate` for the train's time and peak RSS (beside the measured ones in the table). Files of at least
cadenza.data.stream.MIN_ROWS rows stream (`mode` says which path ran); `--stream always` streams every size.

    python bench/bench_scale.py [--sizes 3000 14000 100000 1000000] [--stream auto|always] [--folder /tmp/bench-scale]

`--llm`: llm supervised fine-tuning on Parquet files of chatterbot question/answer pairs (each question made
distinct by a number, so every prompt is new), default 100k and 1M rows, with a tiny random Llama (2 layers,
hidden 64, SmolLM2's real tokenizer and chat template). Per size, in its own process with an empty cache: the
tokenize pass into the token store (rows/s and tokens/s), `--steps` training steps of 8 rows (LoRA, fp32) and the
validation pass (1,000 rows), then a second process on the same cache (the store reused): peak RSS of both.

    python bench/bench_scale.py --llm [--sizes 100000 1000000] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def tiny_bert(folder: Path) -> Path:
    """The test suite's tiny BERT (tests/conftest.py tiny_bert_dir): random weights, MiniLM's WordPiece."""
    path = folder / "tiny-bert"
    if (path / ".complete").exists():
        return path
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from cadenza.data import assets

    tok = AutoTokenizer.from_pretrained(str(assets.minilm_dir()))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    (path / ".complete").write_text("ok")
    return path


def config(bert: Path) -> dict:
    return {
        "model_type": "ecd",
        "input_features": [
            {"name": "review", "type": "text", "encoder": {"type": "auto_transformer",
                                                           "pretrained_model_name_or_path": str(bert)},
             "preprocessing": {"max_sequence_length": 16}},
            {"name": "words", "type": "number"}, {"name": "critic", "type": "category"}],
        "output_features": [{"name": "sentiment", "type": "category"}],
        "preprocessing": {"split": {"type": "random", "probabilities": [0.7, 0.1, 0.2]}},
        "trainer": {"epochs": 2, "batch_size": 256, "learning_rate": 0.001},
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM). Not ru_maxrss: Linux carries the parent's
    high-water mark over a fork + exec into the child's ru_maxrss."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


STARTUP_PHASES = ("imports", "model load", "measure peak")


def child(data: str, bert: str, out: str, always: bool) -> None:
    from cadenza import Model
    from cadenza.data import stream

    if always:
        stream.MIN_ROWS = 0
    model = Model(config(Path(bert)), log=lambda _: None)
    # what `cadenza estimate` predicts for this train (it calibrates the machine first, in a subprocess, which
    # train's start line then reuses): the estimate is checked against the run at every size
    estimated = model.estimate(data)
    started = time.perf_counter()
    result = model.train(data, output_directory=out, skip_save_log=True)
    trained = time.perf_counter()
    rows = model.predict_to_file(data, Path(out) / "predictions.csv")
    predicted = time.perf_counter()
    # the start-up a run pays whatever its rows: imports, loading the encoder, measuring the CPU's peak once
    phases = result.statistics["phases"]["phases"]
    startup = sum(phases[name]["seconds"] for name in STARTUP_PHASES if name in phases)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "train_s": trained - started, "predict_s": predicted - trained,
                      "estimated_peak_mb": estimated.peak_memory_bytes / 2**20,
                      "estimated_train_s": estimated.total_seconds,
                      "startup_s": startup, "predicted_rows": rows,
                      "phases": {name: p["seconds"] for name, p in phases.items()},
                      "mode": "streamed" if isinstance(model._splits_used["training"], stream.FileRows) else "in memory",
                      "validation_accuracy": result.statistics["validation"][-1]["sentiment"]["accuracy"]}))


# ------------------------------------------------------------------------------------------------- llm (--llm)
def tiny_llama(folder: Path) -> Path:
    """The test suite's tiny Llama (tests/conftest.py tiny_llama_dir): random weights, SmolLM2's tokenizer."""
    path = folder / "tiny-llama"
    if (path / ".complete").exists():
        return path
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cadenza.data import assets

    gguf = assets.smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    (path / ".complete").write_text("ok")
    return path


def chat_parquet(rows: int, path: Path) -> None:
    """`rows` chatterbot pairs, cycled, each question made distinct by its row number; row groups of 100k rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cadenza.data.assets import chatterbot_pairs

    pairs = chatterbot_pairs()
    questions, answers = pairs["question"].tolist(), pairs["answer"].tolist()
    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(tmp, pa.schema([("question", pa.string()), ("answer", pa.string())])) as writer:
        for start in range(0, rows, 100_000):
            at = range(start, min(start + 100_000, rows))
            writer.write_table(pa.table({"question": [f"{questions[i % len(questions)]} (#{i})" for i in at],
                                         "answer": [answers[i % len(answers)] for i in at]}))
    os.replace(tmp, path)


def llm_config(llama: Path, rows: int, steps: int) -> dict:
    return {"model_type": "llm", "base_model": str(llama),
            "input_features": [{"name": "question", "type": "text"}],
            "output_features": [{"name": "answer", "type": "text"}],
            "adapter": {"type": "lora", "r": 8},
            "preprocessing": {"split": {"type": "random", "probabilities": [1 - 2000 / rows, 1000 / rows, 1000 / rows]}},
            "trainer": {"type": "finetune", "epochs": 1, "train_steps": steps, "batch_size": 8,
                        "use_mixed_precision": False}}


def llm_child(data: str, llama: str, out: str, steps: int) -> None:
    from cadenza import Model
    from cadenza.data import stream

    lines = []
    model = Model(llm_config(Path(llama), stream.parquet_rows(data), steps),
                  log=lambda line: lines.append((time.perf_counter(), line)))
    started = time.perf_counter()
    result = model.train(data, output_directory=out, skip_save_model=True, skip_save_log=True)
    ended = time.perf_counter()
    rows = model.model._train_rows
    # the tokenize phase: the training and validation stores written (absent when both were reused)
    tokenize = result.statistics["phases"]["phases"].get("tokenize")
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "train_s": ended - started, "rows": len(rows),
                      "tokens": int(rows.lengths.sum()), "phases": result.statistics["phases"],
                      "tokenize": tokenize, "steps": result.statistics["steps"],
                      "mode": "streamed" if isinstance(model._splits_used["training"], stream.FileRows) else "in memory",
                      "reused": any("reused from" in line for _, line in lines),
                      "validation_loss": result.statistics["validation"][-1]["combined"]["loss"]}))


def run_llm(size: int, folder: Path, llama: Path, steps: int) -> list[dict]:
    data = folder / f"chat-{size}.parquet"
    if not data.exists():
        chat_parquet(size, data)
    work = folder / f"llm-{size}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    env = {**os.environ, "CADENZA_CACHE_DIR": str(work / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    results = []
    for attempt in ("cold", "warm"):  # warm: the same cache, the token store reused
        with open(work / f"{attempt}.stdout", "w") as stdout, open(work / f"{attempt}.stderr", "w") as stderr:
            status = subprocess.Popen([sys.executable, __file__, "--llm-child", str(data), str(llama), str(work),
                                       str(steps)], stdout=stdout, stderr=stderr, env=env).wait()
        if status:
            raise SystemExit(f"llm size {size} failed:\n{(work / f'{attempt}.stderr').read_text()[-3000:]}")
        result = json.loads((work / f"{attempt}.stdout").read_text().strip().splitlines()[-1])
        results.append({**result, "size": size, "cache": attempt})
    shutil.rmtree(work / "cache", ignore_errors=True)
    return results


def run(size: int, folder: Path, bert: Path, always: bool) -> dict:
    data = folder / f"reviews-{size}.parquet"
    if not data.exists():  # in its own process, so that this one stays small
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_big_parquet.py"), "--rows", str(size), "--out",
                        str(data)], check=True, stdout=subprocess.DEVNULL)
    work = folder / f"run-{size}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    env = {**os.environ, "CADENZA_CACHE_DIR": str(work / "cache")}  # a cold cache for every size
    with open(work / "stdout", "w") as stdout, open(work / "stderr", "w") as stderr:
        process = subprocess.Popen([sys.executable, __file__, "--child", str(data), str(bert), str(work),
                                    "always" if always else "auto"], stdout=stdout, stderr=stderr, env=env)
        status = process.wait()
    if status:
        raise SystemExit(f"size {size} failed:\n{(work / 'stderr').read_text()[-3000:]}")
    result = json.loads((work / "stdout").read_text().strip().splitlines()[-1])
    result.update(rows=size)
    shutil.rmtree(work / "cache", ignore_errors=True)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "always")
    if len(sys.argv) > 1 and sys.argv[1] == "--llm-child":
        return llm_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--stream", choices=["auto", "always"], default="auto")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/bench-scale"))
    parser.add_argument("--llm", action="store_true", help="llm fine-tuning data instead of ecd")
    parser.add_argument("--steps", type=int, default=20, help="--llm: training steps per size")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    if args.llm:
        return main_llm(args)
    args.sizes = args.sizes or [3_000, 14_000, 100_000, 1_000_000]
    bert = tiny_bert(args.folder)
    results = []
    for size in args.sizes:
        results.append(run(size, args.folder, bert, args.stream == "always"))
        r = results[-1]
        print(f"# {size} rows: train {r['train_s']:.1f} s, predict {r['predict_s']:.1f} s, peak RSS "
              f"{r['peak_rss_mb']:.0f} MB ({r['mode']})", file=sys.stderr, flush=True)
    largest = results[-1]
    after_startup = lambda r: r["train_s"] + r["predict_s"] - r["startup_s"]  # noqa: E731
    per_row = lambda r: after_startup(r) / r["rows"]  # noqa: E731
    # the slope: what each row between one size and the next added (the fixed cost of a run cancels out)
    added = [None] + [(after_startup(b) - after_startup(a)) / (b["rows"] - a["rows"])
                      for a, b in zip(results, results[1:])]
    shown = lambda x: "-" if x is None else f"{1e6 * x:.0f} ({x / added[-1]:.2f}x)"  # noqa: E731
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; tiny BERT (2 layers, "
          "hidden 32), cold cache, train 2 epochs + predict every row; start-up = imports + encoder load + peak "
          "measurement, paid once whatever the rows")
    print("| rows | path | train s | predict s | start-up s | µs/row after start-up | vs largest | µs per row added "
          "since the size above (vs the last) | rows/s | peak RSS | val. acc. | estimated train s | estimated peak RSS |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r, slope in zip(results, added if len(results) > 1 else [None]):
        total = r["train_s"] + r["predict_s"]
        print(f"| {r['rows']:,} | {r['mode']} | {r['train_s']:.1f} | {r['predict_s']:.1f} | {r['startup_s']:.1f} | "
              f"{1e6 * per_row(r):.0f} | {per_row(r) / per_row(largest):.2f}x | {shown(slope)} | {r['rows'] / total:,.0f} | "
              f"{r['peak_rss_mb']:,.0f} MB | {r['validation_accuracy']:.3f} | {r['estimated_train_s']:.1f} | "
              f"{r['estimated_peak_mb']:,.0f} MB |")
    print("train's phases (s):")
    for r in results:
        print(f"  {r['rows']:>9,}: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in r["phases"].items()
                                                  if seconds >= 0.05))


def main_llm(args) -> None:
    llama = tiny_llama(args.folder)
    results = []
    for size in args.sizes or [100_000, 1_000_000]:
        results += run_llm(size, args.folder, llama, args.steps)
        for r in results[-2:]:
            print(f"# {size} rows, {r['cache']} cache: {r['train_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"({r['mode']})", file=sys.stderr, flush=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; tiny Llama (2 layers, "
          f"hidden 64, SmolLM2's tokenizer and chat template), LoRA r=8, fp32, {args.steps} steps of 8 rows")
    print("| rows | cache | path | tokenize s | rows/s | tokens/s | train s (all) | peak RSS | val. loss |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        seconds = r["tokenize"]["seconds"] if r["tokenize"] else None
        rate = (lambda n: f"{n / seconds:,.0f}") if seconds else (lambda n: "-")
        print(f"| {r['size']:,} | {r['cache']}{' (store reused)' if r['reused'] else ''} | {r['mode']} | "
              f"{seconds if seconds is not None else 0:.1f} | {rate(r['rows'])} | {rate(r['tokens'])} | "
              f"{r['train_s']:.1f} | {r['peak_rss_mb']:,.0f} MB | {r['validation_loss']:.3f} |")


if __name__ == "__main__":
    main()
