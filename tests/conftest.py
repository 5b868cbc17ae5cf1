"""Shared test assets: tiny random models with real tokenizers, built locally (nothing is downloaded).

Tokenizers come from the packaged models (MiniLM's WordPiece, SmolLM2's BPE from its GGUF). Converting the GGUF
tokenizer takes ~10 s, so it is kept under ~/.cache/cadenza/test-assets and reused across test sessions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ASSET_CACHE = Path(os.environ.get("CADENZA_TEST_ASSETS", Path.home() / ".cache" / "cadenza" / "test-assets"))


def _build_once(name: str, build) -> Path:
    """Build an asset folder once, atomically (a crash never leaves a half-built folder)."""
    final = ASSET_CACHE / name
    if (final / ".complete").exists():
        return final
    tmp = ASSET_CACHE / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".complete").write_text("ok")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _llama_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    from cadenza.data import assets

    gguf = assets.smollm2_gguf()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)


@pytest.fixture(scope="session")
def llama_tokenizer_dir() -> Path:
    """SmolLM2's real tokenizer (49,152 tokens, ChatML chat template, EOS <|im_end|>) as a plain HF folder."""
    return _build_once("smollm2-tokenizer-v1", _llama_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_dir(llama_tokenizer_dir: Path) -> Path:
    """A 2-layer random LlamaForCausalLM with SmolLM2's tokenizer (safetensors)."""

    def build(folder: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        LlamaForCausalLM(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)

    return _build_once("tiny-llama-v1", build)


@pytest.fixture(scope="session")
def tiny_bert_dir() -> Path:
    """A 2-layer random BertModel (hidden 32) with MiniLM's real WordPiece tokenizer."""

    def build(folder: Path) -> None:
        import torch
        from transformers import AutoTokenizer, BertConfig, BertModel

        from cadenza.data import assets

        tok = AutoTokenizer.from_pretrained(str(assets.minilm_dir()))
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=128)
        BertModel(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)

    return _build_once("tiny-bert-v1", build)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An empty Cadenza cache (embeddings, tokenized data, converted GGUF models) for one test."""
    path = tmp_path / "cadenza-cache"
    monkeypatch.setenv("CADENZA_CACHE_DIR", str(path))
    return path


# ------------------------------------------------------------------------------------------ precision
# Modules that train or embed mark themselves with `pytestmark = pytest.mark.usefixtures("simulated_hardware")`:
# each of their tests then runs twice, as on a CPU without bf16 units (auto precision: fp32 everywhere) and as on
# one with AVX512-BF16 (auto: bf16 autocast for training and embedding, bf16 frozen weights), whatever this machine
# has. bf16 runs on any x86 CPU (emulated where there are no bf16 units: slower, same code path), so CI on an
# AVX2-only machine covers what users with bf16 units run, and the reverse.
SIMULATED_CPUS = {"cpu-fp32": None, "cpu-bf16": "AVX512-BF16"}


@pytest.fixture(params=sorted(SIMULATED_CPUS))
def simulated_hardware(request, monkeypatch):
    from cadenza import device

    units = SIMULATED_CPUS[request.param]
    hw = device.Hardware("cpu", f"simulated CPU ({units or 'no bf16 units'})", units)
    monkeypatch.setattr(device, "hardware", lambda: hw)
    return hw


@pytest.fixture
def slow_first_peak_reading(monkeypatch) -> list[float]:
    """The matmul peak's first reading as in a slow moment of a shared VM (1 FLOP/s), the next ones real; the list
    of readings is returned."""
    from cadenza import device

    real = device._measure_matmul_peak
    readings = []
    monkeypatch.delenv("CADENZA_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(device, "_MEASURED_PEAK", {})
    monkeypatch.setattr(device, "_measure_matmul_peak",
                        lambda dtype, where: readings.append(real(dtype, where) if readings else 1.0) or readings[-1])
    return readings


def tolerance(hw, fp32: float, bf16: float) -> float:
    """A numeric tolerance for the precision that auto mode picks on `hw`."""
    return bf16 if hw is not None and hw.bf16_units else fp32


@contextlib.contextmanager
def signal_in_step(step: int, signum: int):
    """Send `signum` to this process from inside optimizer step `step` (counted from 1): an interruption that
    arrives mid-run, through torch's public optimizer hook."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = []

    def hook(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == step:
            os.kill(os.getpid(), signum)

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------ peak memory
# the last line of a script whose peak memory a test measures in its own process. VmHWM, not ru_maxrss: Linux
# carries the parent's (pytest's) high-water mark over fork + exec into ru_maxrss
PRINT_PEAK_RSS = """
print(json.dumps({"peak_rss_mb": [int(l.split()[1]) / 1024 for l in open("/proc/self/status")
                                  if l.startswith("VmHWM:")][0]}))
"""


def script_peak_rss_mb(script: str, rows: int, tmp_path: Path, model_dir: Path) -> float:
    """Run `script` (argv: rows, a Parquet path to write, the model folder, an output folder) in its own process,
    niced, with a cache of its own; the peak RSS it printed (PRINT_PEAK_RSS)."""
    import json
    import subprocess
    import sys

    folder = tmp_path / str(rows)
    folder.mkdir()
    done = subprocess.run(["nice", "-n", "19", sys.executable, "-c", script, str(rows), str(folder / "d.parquet"),
                           str(model_dir), str(folder)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "CADENZA_CACHE_DIR": str(folder / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]
