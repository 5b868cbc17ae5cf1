"""Frozen MiniLM sentiment classifier on Rotten Tomatoes (fresh vs rotten): what caching embeddings buys, and where
the time of the README's `cadenza experiment` goes.

Runs each variant in its own process (so peak RSS is its own), back to back in one run:
  uncached      frozen encoder run on every batch of every epoch (cache_encoder_embeddings: false)
  cached_cold   embeddings computed once (empty cache), head trained on them
  cached_warm   same encoder, a different head: every embedding comes from the cache
  lora          LoRA adapter trained on the encoder (nothing can be cached)
then the whole `cadenza experiment` command of examples/sentiment.yaml (start-up and imports included), `--runs`
times with a cold cache, in each precision the machine gains from (auto, and fp32 where auto picks bf16), and once
with a warm cache: wall (median), CPU time, peak RSS, and the run's phase breakdown (cadenza.phases: the embedding
pass's FLOP/s against the precision's measured matmul peak, the head's rows/s) from training_statistics.json.

    python bench/bench_ecd.py [--rows 3000] [--epochs 5] [--runs 3] [--skip lora uncached ...]
    python bench/bench_ecd.py --skip uncached cached_cold cached_warm lora    # the experiment command only

The machine is shared: the load average is printed before and after each command; only figures from a quiet
machine compare with other runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def config(variant: str, rows: int, epochs: int) -> dict:
    encoder = {"type": "auto_transformer", "pretrained_model_name_or_path": "minilm", "trainable": False,
               "reduce_output": "mean"}
    if variant == "lora":
        encoder["adapter"] = {"type": "lora", "r": 8, "target_modules": ["query", "value"]}
    return {
        "model_type": "ecd",
        "input_features": [{"name": "review", "type": "text", "encoder": encoder,
                            "preprocessing": {"max_sequence_length": 64,
                                              "cache_encoder_embeddings": variant.startswith("cached")}}],
        "output_features": [{"name": "sentiment", "type": "category"}],
        # the warm run trains another head on the same encoder: the cache must still hit
        "combiner": {"type": "concat", "num_fc_layers": 1 if variant == "cached_warm" else 0},
        "preprocessing": {"sample_size": rows, "split": {"type": "random", "probabilities": [0.7, 0.1, 0.2]}},
        "trainer": {"epochs": epochs, "batch_size": 64, "learning_rate": 0.001},
    }


def child(variant: str, rows: int, epochs: int, out_dir: str) -> None:
    from cadenza import Model

    model = Model(config(variant, rows, epochs), log=lambda _: None)
    t0 = time.perf_counter()
    out = model.train("rotten_tomatoes_sentiment", output_directory=out_dir)
    train_seconds = time.perf_counter() - t0
    test, _ = model.evaluate(model._splits_used["test"])
    train_rows = len(model._splits_used["training"])
    print(json.dumps({"variant": variant, "train_seconds": train_seconds,
                      "rows_per_second": train_rows * len(out.statistics["training"]) / train_seconds,
                      "test_accuracy": test["sentiment"]["accuracy"],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(variant: str, args, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        done = subprocess.run([sys.executable, __file__, "--child", variant, "--rows", str(args.rows),
                               "--epochs", str(args.epochs), "--out", out_dir],
                              capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def experiment_config(rows: int, epochs: int, fp32: bool) -> dict:
    cfg = config("cached_cold", rows, epochs)
    if fp32:
        cfg["trainer"]["use_mixed_precision"] = False
    return cfg


def run_cli(cache: str, cfg: dict, env: dict) -> dict:
    """The whole `cadenza experiment` command, Python start-up and imports included: wall, CPU and peak RSS of the
    process (os.wait4: its own rusage), and the phase breakdown it stored in training_statistics.json. Run as a
    user runs it (the tokenizer's own threads on)."""
    import yaml

    env = {k: v for k, v in env.items() if k != "TOKENIZERS_PARALLELISM"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sentiment.yaml"
        path.write_text(yaml.safe_dump(cfg))
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        with open(Path(tmp) / "log.txt", "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "cadenza", "experiment", "--config", str(path), "--dataset",
                                     "rotten_tomatoes_sentiment", "-od", str(Path(tmp) / "results")],
                                    stdout=out, stderr=subprocess.STDOUT, env={**env, "CADENZA_CACHE_DIR": cache})
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if status:
            raise SystemExit(f"cadenza experiment failed:\n{(Path(tmp) / 'log.txt').read_text()[-3000:]}")
        run = Path(tmp) / "results" / "experiment_run"
        stats = json.loads((run / "training_statistics.json").read_text())
        test = json.loads((run / "test_statistics.json").read_text())
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "phases": stats["phases"], "precision": stats["precision"], "accuracy": test["sentiment"]["accuracy"],
            "load_before": load, "load_after": os.getloadavg()[0]}


def describe_phases(summary: dict) -> list[str]:
    lines = []
    for name, e in summary["phases"].items():
        extra = ""
        if e.get("flops_per_second"):
            extra = f"  {e['flops'] / 1e12:.2f} TFLOP at {e['flops_per_second'] / 1e9:.0f} GFLOP/s"
            if e.get("share_of_peak"):
                extra += f" = {100 * e['share_of_peak']:.0f}% of the {e.get('precision')} peak " \
                         f"({e['peak_flops'] / 1e9:.0f} GFLOP/s measured)"
        elif e.get("rows"):
            extra = f"  {e['rows'] / max(e['seconds'], 1e-9):,.0f} rows/s on {e.get('threads')} thread(s)"
        lines.append(f"      {name:<14}{e['seconds']:6.2f} s {100 * e['share']:5.1f}%{extra}")
    return lines


def bench_experiment(args, env: dict) -> None:
    from cadenza.device import hardware

    hw = hardware()
    print(f"`cadenza experiment` of examples/sentiment.yaml, end to end; {hw.name}, bf16 units: {hw.bf16_units}")
    variants = [("auto", False)] + ([("fp32", True)] if hw.bf16_units else [])
    for label, fp32 in variants:
        runs = []
        for _ in range(args.runs):
            cache = tempfile.mkdtemp(prefix="cadenza-bench-cold-")
            try:
                runs.append(run_cli(cache, experiment_config(args.rows, args.epochs, fp32), env))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
        runs.sort(key=lambda r: r["wall"])
        median = runs[len(runs) // 2]
        walls = ", ".join(f"{r['wall']:.1f}" for r in runs)
        embed = median["phases"]["phases"].get("embed", {}).get("precision")
        print(f"  {label} (embedding in {embed}, head in {median['precision'].get('precision')}), cold cache, "
              f"{args.runs} runs: median wall {median['wall']:.1f} s ({walls}), CPU {median['cpu']:.1f} s, peak RSS "
              f"{median['peak_rss_mb']:.0f} MB, test accuracy {median['accuracy']:.3f}, load average "
              f"{median['load_before']:.1f} -> {median['load_after']:.1f}")
        print(f"    phases of the median run (its table covers {median['phases']['total_seconds']:.1f} s; the rest of "
              f"the wall, {median['wall'] - median['phases']['total_seconds']:.1f} s, is the interpreter exiting):")
        print("\n".join(describe_phases(median["phases"])), flush=True)
    cache = tempfile.mkdtemp(prefix="cadenza-bench-warm-")
    try:
        run_cli(cache, experiment_config(args.rows, args.epochs, False), env)  # fills the cache
        warm = run_cli(cache, experiment_config(args.rows, args.epochs, False), env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"  auto, warm cache: wall {warm['wall']:.1f} s, CPU {warm['cpu']:.1f} s, peak RSS {warm['peak_rss_mb']:.0f} MB")
    print("\n".join(describe_phases(warm["phases"])), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--runs", type=int, default=3, help="cold-cache `cadenza experiment` runs per precision")
    p.add_argument("--skip", nargs="*", default=[], help="variants to leave out (e.g. lora uncached cli)")
    p.add_argument("--child")
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        return child(args.child, args.rows, args.epochs, args.out)

    cache = tempfile.mkdtemp(prefix="cadenza-bench-cache-")
    env = {**os.environ, "CADENZA_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"MiniLM frozen encoder, {args.rows} Rotten Tomatoes snippets (70/10/20), {args.epochs} epochs, "
          f"batch 64, max 64 tokens; {os.cpu_count()} CPUs")
    results = []
    try:
        for variant in ("uncached", "cached_cold", "cached_warm", "lora"):
            if variant not in args.skip:
                results.append(run_child(variant, args, env))
                r = results[-1]
                print(f"  {r['variant']:<12} train {r['train_seconds']:8.2f} s  {r['rows_per_second']:9.1f} rows/s  "
                      f"test acc {r['test_accuracy']:.3f}  peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
        by = {r["variant"]: r for r in results}
        if "uncached" in by and "cached_warm" in by:
            print(f"warm-cache train() is {by['uncached']['train_seconds'] / by['cached_warm']['train_seconds']:.0f}x "
                  "faster than uncached train() (in-process, same config but the head)")
        if "cli" not in args.skip:
            bench_experiment(args, env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
