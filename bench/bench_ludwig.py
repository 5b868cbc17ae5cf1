"""`cadenza experiment` against `ludwig experiment` on the README's task, side by side on one machine.

The task is examples/sentiment.yaml as it stands (3,000 of the 12,808 Rotten Tomatoes snippets, frozen MiniLM with
cached embeddings, a linear probe, 5 epochs), given to both tools: the same YAML file (the packaged MiniLM named by
its folder, which both accept) and the same CSV file. Each round runs, one after the other and each with an empty
cache, Cadenza in auto precision, Cadenza in fp32 (where auto picks bf16: the figure of a CPU without bf16 units),
and Ludwig 0.11. Every command is timed whole, Python start-up and imports included, in its own process (os.wait4:
wall, CPU time, peak RSS). The ratio of each round is Ludwig's wall over Cadenza's in that round; the summary gives
the medians.

Ludwig lives in its own virtual environment (bench/.ludwig-venv, git-ignored), made on first use with the same torch
release as Cadenza's (Ludwig 0.11 predates transformers 5, numpy 2 and pandas 3, hence the caps below; its hard
torchvision import needs torchvision's build for PyPI's torch, so that torch is PyPI's build of the same release).
Nothing of Ludwig is installed into Cadenza's environment.

    python bench/bench_ludwig.py [--rounds 3]         # ~1.5 min a round on 2 cores; the first run adds ~2 min of setup
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "bench" / ".ludwig-venv"
TORCH = "2.13.0"  # the release Cadenza's requirement range is tested with
# `===` matches the version string exactly: PyPI's 2.13.0, not a local "2.13.0+cpu" build, whose torchvision is not
# on PyPI (PyPI's torchvision 0.28.0 links CUDA's torch libraries and fails to import against the CPU build)
LUDWIG_REQUIREMENTS = ["ludwig==0.11.0", f"torch==={TORCH}", "torchvision==0.28.0", "torchaudio==2.11.1",
                       "transformers>=4.42,<4.47", "numpy<2", "pyarrow<18", "pandas<2.3", "datasets<3"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def ludwig_python() -> Path:
    """The Ludwig environment's interpreter, made (once) when missing."""
    python = VENV / "bin" / "python"
    if not (VENV / "ready").exists():
        print(f"making Ludwig's environment in {VENV} (once; ~3 GB with PyPI torch's CUDA libraries)", flush=True)
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *LUDWIG_REQUIREMENTS], check=True)
        (VENV / "ready").write_text("\n".join(LUDWIG_REQUIREMENTS) + "\n")
    return python


def write_task(folder: Path) -> tuple[Path, Path]:
    """The README task's config with MiniLM named by its packaged folder, and the dataset as a CSV."""
    from cadenza.data.assets import minilm_dir, rotten_tomatoes_sentiment

    config = yaml.safe_load((ROOT / "examples" / "sentiment.yaml").read_text())
    config["input_features"][0]["encoder"]["pretrained_model_name_or_path"] = str(minilm_dir())
    config_path, data_path = folder / "sentiment.yaml", folder / "rotten_tomatoes.csv"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    rotten_tomatoes_sentiment().to_csv(data_path, index=False)
    return config_path, data_path


def timed(command: list[str], env: dict, log: Path) -> dict:
    """Wall, CPU time and peak RSS of one command in its own process."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{log.read_text()[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "load": load}


def run_cadenza(config: Path, data: Path, work: Path, fp32: bool) -> dict:
    """`cadenza experiment` with an empty cache; test accuracy from its test_statistics.json."""
    if fp32:
        cfg = yaml.safe_load(config.read_text())
        cfg.setdefault("trainer", {})["use_mixed_precision"] = False
        config = work / "sentiment_fp32.yaml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, **OFFLINE, "CADENZA_CACHE_DIR": str(work / "cache")}
    out = work / "results"
    result = timed([sys.executable, "-m", "cadenza", "experiment", "--config", str(config), "--dataset", str(data),
                    "--output_directory", str(out)], env, work / "log.txt")
    test = json.loads((out / "experiment_run" / "test_statistics.json").read_text())
    return {**result, "accuracy": test["sentiment"]["accuracy"]}


def run_ludwig(python: Path, config: Path, data: Path, work: Path) -> dict:
    """`ludwig experiment` with no preprocessed cache: Ludwig writes it next to the dataset, so the CSV is copied
    into this run's own folder. Ludwig's category `accuracy` is macro-averaged; `accuracy_micro` is the fraction of
    rows right, which is what Cadenza's `accuracy` is."""
    local = work / data.name
    shutil.copyfile(data, local)
    out = work / "results"
    result = timed([str(python), "-m", "ludwig.cli", "experiment", "--config", str(config), "--dataset", str(local),
                    "--output_directory", str(out)], {**os.environ, **OFFLINE}, work / "log.txt")
    test = json.loads((out / "experiment_run" / "test_statistics.json").read_text())
    return {**result, "accuracy": test["sentiment"]["accuracy_micro"]}


def describe(name: str, r: dict) -> str:
    return (f"  {name:<14} wall {r['wall']:6.1f} s  CPU {r['cpu']:6.1f} s  peak RSS {r['peak_rss_mb']:6.0f} MB  "
            f"test accuracy {r['accuracy']:.3f}  (load average before {r['load']:.1f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-fp32", action="store_true", help="leave out Cadenza's fp32 run")
    args = p.parse_args()

    from cadenza.device import hardware

    python = ludwig_python()
    hw = hardware()
    variants = ["cadenza auto"] + (["cadenza fp32"] if hw.bf16_units and not args.no_fp32 else []) + ["ludwig 0.11"]
    print(f"examples/sentiment.yaml end to end, cold caches; {hw.name}, bf16 units: {hw.bf16_units}, "
          f"{os.cpu_count()} CPUs; Ludwig 0.11.0 on torch {TORCH} (PyPI build), in fp32 (its CPU default)", flush=True)
    walls: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="cadenza-bench-ludwig-") as tmp:
        config, data = write_task(Path(tmp))
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_}", flush=True)
            for variant in variants:
                work = Path(tempfile.mkdtemp(dir=tmp))
                if variant == "ludwig 0.11":
                    r = run_ludwig(python, config, data, work)
                else:
                    r = run_cadenza(config, data, work, fp32=variant == "cadenza fp32")
                shutil.rmtree(work, ignore_errors=True)
                walls[variant].append(r["wall"])
                print(describe(variant, r), flush=True)
            ludwig = walls["ludwig 0.11"][-1]
            print("  Ludwig's wall over Cadenza's: " + ", ".join(
                f"{v} {ludwig / walls[v][-1]:.2f}x" for v in variants if v != "ludwig 0.11"), flush=True)
    ludwig = statistics.median(walls["ludwig 0.11"])
    print(f"medians of {args.rounds} rounds: " + ", ".join(f"{v} {statistics.median(w):.1f} s" for v, w in
                                                          walls.items()))
    print("Ludwig's median wall over Cadenza's: " + ", ".join(
        f"{v} {ludwig / statistics.median(walls[v]):.2f}x" for v in variants if v != "ludwig 0.11"))


if __name__ == "__main__":
    main()
