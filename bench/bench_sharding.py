"""Peak memory and wall time per process of DDP against FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 (backend.type ddp / fsdp /
deepspeed), 2 CPU processes.

SmolLM2-135M (the packaged GGUF) fully fine-tuned for a few steps on chatterbot pairs, fp32, under torchrun; each
process reports its peak RSS (VmHWM) when `cadenza train` returns.

    .venv/bin/python bench/bench_sharding.py [--steps 3] [--processes 2]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

DRIVER = """
import os, sys
from cadenza.cli import main
code = main(sys.argv[1:])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]
print(f"peak RSS of process {os.environ.get('RANK')}: {int(hwm) / 1024:.0f} MB", flush=True)
sys.exit(code)
"""


BACKENDS = {"ddp": {"type": "ddp"}, "fsdp": {"type": "fsdp"},
            "zero2": {"type": "deepspeed", "deepspeed": {"zero_stage": 2}},
            "zero3": {"type": "deepspeed", "deepspeed": {"zero_stage": 3}}}


def config(kind: str, steps: int) -> dict:
    return {"model_type": "llm", "base_model": "smollm2",
            "input_features": [{"name": "question", "type": "text"}],
            "output_features": [{"name": "answer", "type": "text"}],
            "preprocessing": {"split": {"type": "random", "probabilities": [0.9, 0.1, 0.0]}},
            "backend": BACKENDS[kind],
            "trainer": {"type": "finetune", "epochs": 1, "batch_size": 2, "train_steps": steps, "learning_rate": 1e-5,
                        "use_mixed_precision": False, "checkpoints_per_epoch": 0}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    from cadenza.data import assets

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        assets.chatterbot_pairs().head(64)[["question", "answer"]].to_csv(work / "qa.csv", index=False)
        (work / "driver.py").write_text(DRIVER)
        print(f"SmolLM2-135M full fine-tuning, fp32, {args.steps} steps of 2 rows per process, "
              f"{args.processes} CPU processes (gloo)")
        print("| backend | wall s | peak RSS per process |\n|---|---:|---|")
        for kind in BACKENDS:
            (work / f"{kind}.yaml").write_text(yaml.safe_dump(config(kind, args.steps)))
            started = time.perf_counter()
            done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(args.processes), "driver.py",
                                   "train", "-c", f"{kind}.yaml", "--dataset", "qa.csv", "-od", f"out_{kind}"],
                                  cwd=work, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            peaks = sorted(re.findall(r"peak RSS of process (\d+): (\d+) MB", done.stdout))
            print(f"| {kind} | {wall:.1f} | {', '.join(f'{mb} MB' for _, mb in peaks)} |")


if __name__ == "__main__":
    main()
