"""Threads on a busy machine: LoRA training of SmolLM2-135M next to another training, with torch's thread count
following the load (cadenza.threads, the default) and pinned at torch's start value (CADENZA_FOLLOW_LOAD=0;
OMP_NUM_THREADS stays unset in both, so torch starts at its own default: one thread per core).

    python bench/bench_threads.py                 # 100 chatterbot pairs per training, 2 rounds (~10 min on 2 cores)
    python bench/bench_threads.py --rows 60 --rounds 1
    python bench/bench_threads.py --scenarios alone --rounds 3   # what following costs with nothing else running

Scenarios, each run in fresh processes, in alternating order within a round (follow, pinned, pinned, follow, ...):
  alone   one training, nothing else of this bench running: following the load must cost nothing here
  pair    two trainings started together, both following or both pinned: each one's epoch and wall time
Each training is bench_llm.py's Cadenza LoRA config (r=8, batch 8, lr 2e-4, one epoch, auto precision) on the first
`--rows` of the same shuffled chatterbot pairs. Reported per training: wall seconds of the process, seconds of the
epoch loop, tokens/s, the thread changes it logged. Beside each scenario: the cores that processes outside this bench
kept busy while it ran (/proc/stat minus this bench's processes), so a noisy machine shows.
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


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def child(a) -> None:
    """One training; prints one RESULT line."""
    started = time.perf_counter()
    from bench.bench_llm import BATCH, LR, LORA, SEED, chat_pairs
    from cadenza import Model

    train, _ = chat_pairs(a.rows, 100)
    config = {"model_type": "llm", "base_model": "smollm2",
              "input_features": [{"name": "question", "type": "text"}],
              "output_features": [{"name": "answer", "type": "text"}],
              "adapter": {"type": "lora", "r": LORA["r"]},
              "trainer": {"type": "finetune", "epochs": 1, "batch_size": BATCH, "learning_rate": LR}}
    lines: list[str] = []
    out = Model(config, log=lines.append).train(training_set=train, output_directory=a.workdir, random_seed=SEED)
    result = {"epoch_seconds": out.statistics["training"][0]["seconds"],
              "tokens_per_second": out.throughput.get("tokens_per_second"),
              "precision": out.statistics["precision"]["precision"],
              "thread_changes": [x for x in lines if x.startswith("threads:")],
              "seconds_in_process": time.perf_counter() - started}
    print("RESULT " + json.dumps(result), flush=True)


def start(a, follow: bool, workdir: str) -> tuple[subprocess.Popen, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["CADENZA_FOLLOW_LOAD"] = "1" if follow else "0"
    env["TQDM_DISABLE"] = "1"  # two trainings' progress bars on one terminal say nothing
    args = [sys.executable, __file__, "--child", "--rows", str(a.rows), "--workdir", workdir]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env), time.perf_counter()


def finish(proc: subprocess.Popen, t0: float) -> dict:
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"a training failed (exit {proc.returncode})")
    return {**json.loads(line[len("RESULT "):]), "wall_seconds": wall}


def scenario(a, name: str, follow: bool, workdir: Path) -> dict:
    from cadenza import device

    runs = 2 if name == "pair" else 1
    before, children_before = device.cpu_sample(), _children_cpu()
    procs = [start(a, follow, str(workdir / f"{name}_{follow}_{i}")) for i in range(runs)]
    results = [finish(p, t0) for p, t0 in procs]
    after, children_after = device.cpu_sample(), _children_cpu()
    # busy cores minus this bench (parent and its trainings): what the rest of the machine did meanwhile
    bench_cpu = (children_after - children_before) + (after.own - before.own)
    background = ((after.busy - before.busy) - bench_cpu) / max(after.wall - before.wall, 1e-9)
    out = {"scenario": name, "follow": follow, "runs": results, "background_cores": max(background, 0.0)}
    walls = ", ".join(f"{r['wall_seconds']:.1f}" for r in results)
    epochs = ", ".join(f"{r['epoch_seconds']:.1f}" for r in results)
    rates = ", ".join(f"{r['tokens_per_second']:.0f}" for r in results)
    changes = sum(len(r["thread_changes"]) for r in results)
    log(f"{name:<5} {'follow' if follow else 'pinned':<6}  wall {walls} s  epoch {epochs} s  tokens/s {rates}  "
        f"thread changes {changes}  background ~{out['background_cores']:.2f} cores")
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100, help="chatterbot pairs per training")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--scenarios", default="alone,pair", help="comma-separated: alone, pair")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)

    import torch

    from cadenza import device

    hw = device.hardware()
    log(f"machine: {hw.name}, {len(os.sched_getaffinity(0))} cores, bf16 units: {hw.bf16_units}, torch "
        f"{torch.__version__} at {torch.get_num_threads()} threads; OMP_NUM_THREADS unset in the trainings")
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        workdir = Path(tmp)
        log("warm-up (the GGUF's conversion is cached once)")
        finish(*start(argparse.Namespace(rows=8), True, str(workdir / "warmup")))
        results = []
        for r in range(a.rounds):
            first = r % 2 == 0  # alternate which setting goes first
            for name in a.scenarios.split(","):
                for follow in ((True, False) if first else (False, True)):
                    results.append(scenario(a, name, follow, workdir))
    summarize(results)
    print(json.dumps(results))


def summarize(results: list[dict]) -> None:
    """Mean wall and epoch seconds per scenario and setting, and pinned / follow."""
    def mean(name: str, follow: bool, key: str) -> float:
        values = [run[key] for s in results if s["scenario"] == name and s["follow"] == follow for run in s["runs"]]
        return sum(values) / len(values)

    log("mean over rounds (and over both trainings of a pair):")
    for name in dict.fromkeys(s["scenario"] for s in results):
        for key in ("wall_seconds", "epoch_seconds"):
            f, pinned = mean(name, True, key), mean(name, False, key)
            log(f"  {name:<5} {key:<14} follow {f:6.1f}  pinned {pinned:6.1f}  pinned/follow {pinned / f:.2f}x")


if __name__ == "__main__":
    main()
