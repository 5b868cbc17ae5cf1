"""Where Cadenza keeps what it computes once: embeddings/ (frozen encoders), tokens/ (tokenized llm data),
models/ (GGUF files converted to safetensors), hub-models/ (models downloaded from the Hub), estimate/ (the
estimate's calibrations) and peak_flops.json (the best matmul peak each machine has shown, for MFU)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def cache_root(configured: Optional[str] = None) -> Path:
    """The config's folder (`preprocessing.cache_dir`, else `backend.cache_dir`) wins over $CADENZA_CACHE_DIR,
    which wins over ~/.cache/cadenza."""
    return Path(configured or os.environ.get("CADENZA_CACHE_DIR") or Path.home() / ".cache" / "cadenza").expanduser()


def configured_cache_dir(config) -> Optional[str]:
    return config.preprocessing.cache_dir or config.backend.cache_dir
