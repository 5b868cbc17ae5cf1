"""Frozen MiniLM sentiment classifier on Rotten Tomatoes (fresh vs rotten): what caching embeddings buys.

Runs each variant in its own process (so peak RSS is its own), back to back in one run:
  uncached      frozen encoder run on every batch of every epoch (cache_encoder_embeddings: false)
  cached_cold   embeddings computed once (empty cache), head trained on them
  cached_warm   same encoder, a different head: every embedding comes from the cache
  lora          LoRA adapter trained on the encoder (nothing can be cached)
and the whole `cadenza experiment` command (start-up included) with a cold and a warm cache.

    python bench/bench_ecd.py [--rows 3000] [--epochs 5] [--skip lora]
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


def run_cli(cache: str, args, env: dict) -> float:
    """Wall time of the whole `cadenza experiment` command, Python start-up and imports included."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "sentiment.yaml"
        import yaml

        cfg.write_text(yaml.safe_dump(config("cached_cold", args.rows, args.epochs)))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cadenza", "experiment", "--config", str(cfg), "--dataset",
                        "rotten_tomatoes_sentiment", "-od", str(Path(tmp) / "results")],
                       check=True, capture_output=True, env={**env, "CADENZA_CACHE_DIR": cache})
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=5)
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
            shutil.rmtree(cache, ignore_errors=True)
            cold = run_cli(cache, args, env)
            warm = run_cli(cache, args, env)
            print(f"  `cadenza experiment` end to end (start-up included): cold cache {cold:.1f} s, "
                  f"warm cache {warm:.1f} s")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
