"""bench/bench_gpu.py in its CPU smoke mode: every code path of the GPU benchmark except QLoRA (CUDA only) runs on a
tiny random Llama and writes its table; QLoRA's rows say why they were skipped."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"


@pytest.mark.integration
def test_gpu_bench_tiny_mode_measures_both_loops_and_writes_its_table(tiny_llama_dir, tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), "--tiny", "--base", str(tiny_llama_dir), "--rows", "8",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())["results"]
    for mode in ("lora", "full"):
        plain, cadenza = results[f"plain {mode}"], results[f"cadenza {mode}"]
        assert plain["tokens"] > 0 and plain["flops"] > 0 and plain["steps"] == cadenza["steps"] == 2
        for r in (plain, cadenza):
            assert r["train_seconds"] > 0 and r["peak_memory_mb"] > 0 and 9 < r["train_loss"] < 12  # ln(49152)=10.8
    assert results["plain full"]["flops"] > results["plain lora"]["flops"]  # weight gradients: 6N against 4N
    assert results["plain qlora"] == results["cadenza qlora"] == {"skipped": "needs CUDA"}
    table = (tmp_path / "gpu.txt").read_text()
    assert "qlora  plain      skipped: needs CUDA" in table
    assert [line.split()[:2] for line in table.splitlines() if line.startswith(("lora ", "full "))] == [
        ["lora", "plain"], ["lora", "cadenza"], ["full", "plain"], ["full", "cadenza"]]
