"""Output folders, written atomically: a crash leaves the previous folder (or none), never a half-written one.

Layout of a run folder (`<output_directory>/<experiment_name>_<model_name>[_N]/`):

    model/                           the model folder: what predict, evaluate, load and upload take
      cadenza_model.json             {"model_type", "cadenza_version", "format": 1, ...}
      model_hyperparameters.json     the resolved config (Ludwig's file name)
      training_set_metadata.json     preprocessing metadata: vocabularies, normalisation, tokenizer, prompt
      model_weights.safetensors      ecd: head weights and any trained encoder weights
      encoders/<feature>/            ecd: a PEFT adapter trained on that feature's encoder
      model_weights/                 llm: a transformers/PEFT folder (adapter or full model, tokenizer,
                                     generation_config.json)
    training_statistics.json         per-epoch training and validation figures
    test_statistics.json             written by evaluate/experiment
    predictions.csv                  written by experiment
    checkpoint/                      resume state (removed once training ends normally)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

MODEL_DIR = "model"
MODEL_INFO = "cadenza_model.json"
CONFIG_FILE = "model_hyperparameters.json"
METADATA_FILE = "training_set_metadata.json"
ECD_WEIGHTS = "model_weights.safetensors"
LLM_WEIGHTS = "model_weights"
FORMAT_VERSION = 1


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _jsonable(value):
    import numpy as np

    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final`, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def new_run_dir(output_directory: str | Path, experiment_name: str, model_name: str) -> Path:
    """results/experiment_run, then experiment_run_1, _2, ... (Ludwig's naming); created empty."""
    base = Path(output_directory) / f"{experiment_name}_{model_name}"
    candidate, n = base, 0
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}_{n}")
    candidate.mkdir(parents=True)
    return candidate


def find_model_dir(path: str | Path) -> Path:
    """Accept a run folder or the model folder inside it."""
    from .errors import ModelFolderError

    path = Path(path)
    for candidate in (path, path / MODEL_DIR):
        if (candidate / MODEL_INFO).is_file():
            return candidate
    if not path.exists():
        raise ModelFolderError(f"model path {str(path)!r} does not exist")
    raise ModelFolderError(f"{path} is not a Cadenza model folder (no {MODEL_INFO} in it or in {path / MODEL_DIR}); "
                           "pass the run folder printed by `cadenza train` or its model/ subfolder")
