"""How close `cadenza estimate` comes to what a run measures: predicted vs measured peak memory and train() time.

    nice -n 19 .venv/bin/python bench/bench_estimate.py                 # the four configurations (~5-10 min)
    nice -n 19 .venv/bin/python bench/bench_estimate.py --only ecd_cached llm_lora

Configurations (issue 12's bench set; each runs in its own process so peak RSS is its own):
  ecd_cached    examples/sentiment.yaml as is (3,000 snippets, 5 epochs), embedding cache COLD (a fresh cache folder)
  ecd_uncached  the same with cache_encoder_embeddings: false, 600 snippets, 1 epoch (the encoder runs every batch)
  llm_lora      examples/chat.yaml (LoRA r=8 on SmolLM2-135M) on 48 chatterbot pairs, 1 epoch
  llm_full      the same without the adapter: full fine-tuning

The child first asks `Model.estimate(dataset)` (its calibration runs in a subprocess and is cached per machine,
so it leaves the child's peak RSS alone), then times `Model.train(dataset)` in the same process: wall seconds of
the call and the process's peak RSS afterwards (getrusage ru_maxrss, the high-water mark of the whole process).
Beside the wall time: the CPU seconds of the call divided by torch's threads (about the wall time the call would
take alone on the machine) and the load average while it ran.
train() prints the estimate at its start too, so its measured time includes that.
The llm configurations use the user's model cache (the GGUF converted once); the estimate counts the conversion
when it has not happened yet. Run it niced: the machine's other work slows the measured side, not the prediction
(which is calibrated once and cached), so rerun when other processes competed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

VARIANTS = ("ecd_cached", "ecd_uncached", "llm_lora", "llm_full")


def config_of(variant: str) -> tuple[dict, str]:
    import yaml

    if variant.startswith("ecd"):
        config = yaml.safe_load((ROOT / "examples" / "sentiment.yaml").read_text())
        if variant == "ecd_uncached":
            config["input_features"][0]["preprocessing"]["cache_encoder_embeddings"] = False
            config["preprocessing"]["sample_size"] = 600
            config["trainer"]["epochs"] = 1
        return config, "rotten_tomatoes_sentiment"
    config = yaml.safe_load((ROOT / "examples" / "chat.yaml").read_text())
    config["preprocessing"]["sample_size"] = 48
    if variant == "llm_full":
        config.pop("adapter")
        config["trainer"]["learning_rate"] = 1e-5
    return config, "chatterbot"


def child(variant: str, out_dir: str) -> dict:
    from cadenza import Model

    config, dataset = config_of(variant)
    lines: list[str] = []
    model = Model(config, log=lines.append)
    t0 = time.perf_counter()
    estimate = model.estimate(dataset)
    estimate_s = time.perf_counter() - t0
    rss_before_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0, cpu0, load0 = time.perf_counter(), _cpu_seconds(), os.getloadavg()[0]
    model.train(dataset, output_directory=out_dir, skip_save_log=True)
    train_s = time.perf_counter() - t0
    return {"variant": variant, "estimate_seconds": estimate_s, "train_seconds": train_s,
            "train_cpu_seconds": _cpu_seconds() - cpu0, "load_average": (load0 + os.getloadavg()[0]) / 2,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_before_train_mb": rss_before_train, "estimate": estimate.to_dict(),
            "log_head": [line for line in lines if line.startswith("estimate")]}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_child(variant: str, cache_dir: str) -> dict:
    env = dict(os.environ)
    if variant == "ecd_cached":  # a cold embedding cache: a fresh cache folder
        env["CADENZA_CACHE_DIR"] = cache_dir
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--out", out], env=env,
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    lines = ["| config | predicted peak | measured peak RSS | ratio | predicted train() | measured train() | ratio "
             "| CPU seconds / threads | load average |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    threads = _threads()
    for r in results:
        e = r["estimate"]
        mem, t = e["peak_memory_bytes"] / 2**20, e["total_seconds"]
        lines.append(f"| {r['variant']} | {mem:.0f} MB | {r['peak_rss_mb']:.0f} MB | {mem / r['peak_rss_mb']:.2f} | "
                     f"{t:.1f} s | {r['train_seconds']:.1f} s | {t / r['train_seconds']:.2f} | "
                     f"{r['train_cpu_seconds'] / threads:.1f} s | {r['load_average']:.1f} |")
    return "\n".join(lines)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=VARIANTS)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.out)))
        return
    import platform

    from cadenza import device

    hw = device.hardware()
    print(f"machine: {hw.name} ({hw.device}, bf16 units: {hw.bf16_units or 'none'}), {os.cpu_count()} cores, "
          f"{platform.python_version()}; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for variant in a.only or VARIANTS:
            r = run_child(variant, cache_dir)
            e = r["estimate"]
            print(f"{variant}: train() {r['train_seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(before train() {r['peak_rss_before_train_mb']:.0f} MB); estimate took {r['estimate_seconds']:.1f}"
                  f" s and said {e['peak_memory_bytes'] / 2**20:.0f} MB, {e['total_seconds']:.1f} s "
                  f"(load average {os.getloadavg()[0]:.2f})", flush=True)
            for line in e["lines"]:
                print(f"    {line}")
            results.append(r)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
