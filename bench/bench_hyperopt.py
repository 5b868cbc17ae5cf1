"""20 hyperopt trials of a head vs one `cadenza experiment`, on the README sentiment task (examples/sentiment.yaml,
packaged rotten_tomatoes_sentiment): what a search costs once the embeddings are cached.

Each command runs in its own process, timed from outside (Python start-up and imports included), back to back
on one embedding cache: a first `experiment` fills it (cold), then one `experiment` (warm) and one `hyperopt`
of 20 trials are timed.

    python bench/bench_hyperopt.py [--trials 20] [--pruner median|hyperband|none]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SEARCH = {"output_feature": "sentiment", "metric": "accuracy", "goal": "maximize",
          "parameters": {"trainer.learning_rate": {"space": "loguniform", "lower": 1e-4, "upper": 3e-2},
                         "combiner.num_fc_layers": {"space": "randint", "lower": 0, "upper": 3},
                         "combiner.output_size": {"space": "choice", "categories": [64, 128, 256]},
                         "combiner.dropout": {"space": "uniform", "lower": 0.0, "upper": 0.5}},
          "executor": {"type": "optuna", "num_samples": 20, "pruner": "median"}}


def timed(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cadenza", *argv], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{argv[0]} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median")
    args = parser.parse_args()
    base = yaml.safe_load((ROOT / "examples" / "sentiment.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "CADENZA_CACHE_DIR": str(tmp / "cache")}
        (tmp / "experiment.yaml").write_text(yaml.safe_dump(base))
        executor = {**SEARCH["executor"], "num_samples": args.trials,
                    "pruner": None if args.pruner == "none" else args.pruner}
        search = {**SEARCH, "executor": executor}
        (tmp / "search.yaml").write_text(yaml.safe_dump({**base, "hyperopt": search}))
        data = ["--dataset", "rotten_tomatoes_sentiment", "-od", str(tmp / "results")]
        cold = timed(["experiment", "-c", str(tmp / "experiment.yaml"), *data], env)
        warm = timed(["experiment", "-c", str(tmp / "experiment.yaml"), *data], env)
        search_seconds = timed(["hyperopt", "-c", str(tmp / "search.yaml"), *data], env)
        statistics = json.loads((tmp / "results" / "hyperopt" / "hyperopt_statistics.json").read_text())
    results = statistics["hyperopt_results"]
    print(f"experiment, cold cache:  {cold:.1f} s")
    print(f"experiment, warm cache:  {warm:.1f} s")
    print(f"hyperopt, {args.trials} trials, pruner {args.pruner}:    {search_seconds:.1f} s = {search_seconds / warm:.2f}x the warm "
          f"experiment ({len(results)} finished, {args.trials - len(results)} pruned)")
    print(f"best validation accuracy {results[0]['metric_score']:.3f} with {results[0]['parameters']}")


if __name__ == "__main__":
    main()
