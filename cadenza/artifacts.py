"""Output folders, written atomically (a crash leaves the previous folder, or none, never a half-written one), and
the one check of a saved model folder that everything reading one goes through (`check_model_folder`).

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
import math
import os
import re
import shutil
import socket
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from . import __version__
from .errors import HubError, ModelFolderError

MODEL_DIR = "model"
MODEL_INFO = "cadenza_model.json"
CONFIG_FILE = "model_hyperparameters.json"
METADATA_FILE = "training_set_metadata.json"
ECD_WEIGHTS = "model_weights.safetensors"
LLM_WEIGHTS = "model_weights"
ENCODERS_DIR = "encoders"
RETRIEVAL_FILE = "retrieval_examples.json"  # llm few-shot examples (cadenza.llm.model)
FORMAT_VERSION = 1
# pickled weights can run arbitrary code when loaded: Cadenza reads and writes safetensors only
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# a tokenizer needs its config and one of these vocabulary files
TOKENIZER_VOCABULARIES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                          "sentencepiece.bpe.model")
REDO = "retrain, or download the model again"


def writer_tag() -> str:
    """`<pid>@<host>` in every temporary's name: a later run on this machine can tell one whose writer was killed
    (a SIGKILL or power loss runs no cleanup) from one still being written, and remove it (`sweep_abandoned`)."""
    return f"{os.getpid()}@{re.sub(r'[^A-Za-z0-9_-]', '_', socket.gethostname())}"


def temporary_sibling(final: Path, kind: str = "tmp") -> Path:
    """A hidden name beside `final` for writing it (or, kind "old", for the copy it replaces)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.{writer_tag()}.{kind}")


_TEMPORARY = re.compile(r"\.(\d+)@([A-Za-z0-9_-]+)\.(tmp|old)$")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_abandoned(folder: Path) -> list[str]:
    """Remove the temporaries in `folder` whose writer, a process of this machine, no longer runs; a replaced
    folder (".old") whose successor never arrived is put back in place. Returns the names handled. Writers on
    other machines (a shared cache) are left alone: their processes cannot be seen from here."""
    host = writer_tag().split("@", 1)[1]
    handled = []
    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return handled
    for entry in entries:
        found = _TEMPORARY.search(entry.name)
        if not found or found.group(2) != host or _running(int(found.group(1))):
            continue
        final = entry.with_name(entry.name[1:found.start()].rsplit(".", 1)[0])
        try:
            if found.group(3) == "old" and not final.exists():
                os.replace(entry, final)  # killed between moving the old folder aside and renaming the new one
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:  # another run swept it first
            continue
        handled.append(entry.name)
    return handled


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = temporary_sibling(path)
    tmp.write_text(json.dumps(_finite(data), indent=2, default=_jsonable, allow_nan=False))
    os.replace(tmp, path)


def write_model_header(folder: Path, config: dict) -> None:
    """cadenza_model.json and model_hyperparameters.json: what every model folder starts with (the model type
    writes its weights and metadata beside them)."""
    write_json(Path(folder) / MODEL_INFO, {"model_type": config["model_type"], "cadenza_version": __version__,
                                           "format": FORMAT_VERSION})
    write_json(Path(folder) / CONFIG_FILE, {**config, "cadenza_version": __version__})


def unshared(tensors: dict) -> dict:
    """safetensors refuses tensors that share storage (tied weights): store independent copies."""
    seen, out = set(), {}
    for k, v in tensors.items():
        out[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    return out


def _finite(value: Any) -> Any:
    """NaN and infinities (a metric that cannot be computed on a split, e.g. roc_auc with one class) become null:
    strict JSON readers (jq, JavaScript, many dashboards) refuse Python's NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return _finite(value.item())
    return value


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
    sweep_abandoned(final.parent)
    tmp = temporary_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = temporary_sibling(final, "old")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def find_model_dir(path: str | Path) -> Path:
    """Accept a run folder or the model folder inside it."""
    path = Path(path)
    for candidate in (path, path / MODEL_DIR):
        if (candidate / MODEL_INFO).is_file():
            return candidate
    if not path.exists():
        raise ModelFolderError(f"model path {str(path)!r} does not exist")
    raise ModelFolderError(f"{path} is not a Cadenza model folder (no {MODEL_INFO} in it or in {path / MODEL_DIR}); "
                           "pass the run folder printed by `cadenza train` or its model/ subfolder")


# ==================================================================================== checking a model folder
@dataclass(frozen=True)
class SavedModel:
    """A model folder that passed `check_model_folder`, with its three Cadenza json files read."""

    model_dir: Path
    info: dict       # cadenza_model.json
    config: dict     # model_hyperparameters.json, as saved (not yet validated against the schema)
    metadata: dict   # training_set_metadata.json
    model_type: str  # "ecd" | "llm"
    llm_weights: Optional[str]  # llm: "adapter", "full" (a merged adapter too) or "base" (not fine-tuned); ecd: None


def check_model_folder(model_path: str | Path) -> SavedModel:
    """Check a run folder or model folder before anything loads, publishes or serves it: every file its model type
    needs exists and parses, weights are safetensors exactly as long as their header says (read without loading a
    tensor), the format is one this Cadenza reads, and no file asks to run code the config does not trust.
    Anything wrong is one ModelFolderError naming the file and what to do."""
    model_dir = find_model_dir(model_path)
    info = read_model_json(model_dir / MODEL_INFO)
    _check_format(model_dir / MODEL_INFO, info)
    config = read_model_json(model_dir / CONFIG_FILE)
    metadata = read_model_json(model_dir / METADATA_FILE)
    model_type = info.get("model_type") or config.get("model_type")
    llm_weights = None
    if model_type == "ecd":
        _check_ecd_files(model_dir)
    elif model_type == "llm":
        llm_weights = _check_llm_files(model_dir, metadata, trust_remote_code=config.get("trust_remote_code") is True)
    else:
        raise ModelFolderError(f"{model_dir / MODEL_INFO}: unknown model_type {model_type!r} (expected ecd or llm); "
                               f"{REDO}")
    return SavedModel(model_dir, info, config, metadata, model_type, llm_weights)


def read_model_json(path: Path, kind: type = dict):
    """A json file of a saved model: missing, unreadable, truncated or damaged is a ModelFolderError naming it."""
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing: the model folder is incomplete; {REDO}")
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise ModelFolderError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ModelFolderError(f"{path} is truncated or not valid JSON ({e}); {REDO}") from None
    if not isinstance(data, kind):
        raise ModelFolderError(f"{path} should hold a JSON {kind.__name__}, not {type(data).__name__}; {REDO}")
    return data


def _check_format(path: Path, info: dict) -> None:
    version = info.get("format", 0)
    if not isinstance(version, int):
        raise ModelFolderError(f"{path}: format {version!r} is not a format version; {REDO}")
    if version > FORMAT_VERSION:
        raise ModelFolderError(
            f"{path}: this model folder has format {version} (written by Cadenza {info.get('cadenza_version', '?')}), "
            f"and Cadenza {__version__} reads format {FORMAT_VERSION} and older: upgrade cadenza "
            "(pip install -U cadenza)")


def _check_ecd_files(model_dir: Path) -> None:
    check_safetensors(model_dir / ECD_WEIGHTS)
    # an adapted encoder is also saved as a plain PEFT folder (loaded outside Cadenza, published on the Hub)
    for adapter_config in sorted((model_dir / ENCODERS_DIR).glob("*/adapter_config.json")):
        check_adapter_folder(adapter_config.parent)


def _check_llm_files(model_dir: Path, metadata: dict, trust_remote_code: bool) -> str:
    weights = model_dir / LLM_WEIGHTS
    if not weights.is_dir():
        raise ModelFolderError(f"{weights}/ is missing: the llm's weights and tokenizer are not in the model folder; "
                               f"{REDO}")
    for path in sorted(weights.glob("*.json")):  # transformers and peft read every one of them
        read_model_json(path)
    kind = _llm_weights_kind(weights, metadata)
    if kind == "adapter":
        check_safetensors(weights / "adapter_model.safetensors")
    elif kind == "full":
        _check_full_weights(weights)
    _check_tokenizer(weights)
    check_remote_code(weights, trust_remote_code, "trust_remote_code")
    if (model_dir / RETRIEVAL_FILE).exists():
        read_model_json(model_dir / RETRIEVAL_FILE, list)
    return kind


def _llm_weights_kind(weights: Path, metadata: dict) -> str:
    saved = metadata.get("weights")  # what LlmModel.save wrote: base | adapter | merged | full
    if saved == "base":
        return "base"
    if saved == "adapter" or (saved is None and (weights / "adapter_config.json").is_file()):
        read_model_json(weights / "adapter_config.json")
        return "adapter"
    if saved in ("merged", "full") or (weights / "config.json").is_file():
        read_model_json(weights / "config.json")
        return "full"
    raise ModelFolderError(f"{weights} holds neither a PEFT adapter (adapter_config.json) nor a transformers model "
                           f"(config.json); {REDO}")


def _check_full_weights(weights: Path) -> None:
    index = weights / "model.safetensors.index.json"
    if not index.is_file():
        check_safetensors(weights / "model.safetensors")
        return
    shards = sorted(set(read_model_json(index).get("weight_map", {}).values()))
    if not shards:
        raise ModelFolderError(f"{index} lists no weight files; {REDO}")
    for shard in shards:
        check_safetensors(weights / shard)


def _check_tokenizer(weights: Path) -> None:
    if not (weights / "tokenizer_config.json").is_file():
        raise ModelFolderError(f"{weights / 'tokenizer_config.json'} is missing: the llm has no tokenizer; {REDO}")
    if not any((weights / name).is_file() for name in TOKENIZER_VOCABULARIES):
        raise ModelFolderError(f"{weights} has no tokenizer vocabulary (none of {', '.join(TOKENIZER_VOCABULARIES)}); "
                               f"{REDO}")


def check_adapter_folder(folder: Path) -> None:
    """A PEFT adapter folder: adapter_config.json parses and adapter_model.safetensors is whole."""
    read_model_json(folder / "adapter_config.json")
    check_safetensors(folder / "adapter_model.safetensors")


# ============================================================================================ safetensors only
def check_safetensors(path: Path) -> None:
    """Read the header and check the file is exactly as long as it says: catches missing, truncated and
    non-safetensors files (a pickle among them) without loading any tensor."""
    if not path.is_file():
        _refuse_pickle_instead(path)
        raise ModelFolderError(f"{path} is missing: the model folder is incomplete; {REDO}")
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if _is_pickle(prefix):
            raise ModelFolderError(_pickle_message(path, path.name))
        try:
            if len(prefix) < 8:
                raise ValueError("shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise ValueError("its header is longer than the file")
            end = _data_end(json.loads(fh.read(header_len)))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFolderError(f"{path} is not a readable safetensors file ({e}); {REDO}") from None
    if 8 + header_len + end != size:
        raise ModelFolderError(f"{path} is truncated or damaged: {size} bytes, its header describes "
                               f"{8 + header_len + end}; {REDO}")


def _data_end(header: dict) -> int:
    """Where the last tensor's bytes end, from the header's data_offsets (relative to the end of the header)."""
    end = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        begin, stop = tensor["data_offsets"]
        if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
            raise ValueError(f"tensor {name!r} has data_offsets {[begin, stop]}")
        end = max(end, stop)
    return end


def _is_pickle(prefix: bytes) -> bool:
    # torch.save writes a zip archive (PK..), older torch and plain pickle start with the PROTO opcode 0x80
    return prefix.startswith(b"PK\x03\x04") or prefix[:1] == b"\x80"


def _refuse_pickle_instead(expected: Path) -> None:
    """Safetensors weights are missing: a pickle file beside them is named and refused, never loaded."""
    folder = expected.parent
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise ModelFolderError(_pickle_message(pickles[0], expected.name))


def _pickle_message(pickle: Path, expected: str) -> str:
    where = "" if pickle.name == expected else f", found where {expected} should be"
    return (f"{pickle}: Cadenza loads only safetensors, and this is a pickle file (loading one can run arbitrary "
            f"code){where}. If you trust where it came from, convert it with "
            f"`safetensors.torch.save_file(torch.load('{pickle.name}', weights_only=True), '{expected}')`; "
            "otherwise retrain")


def refuse_pickled_weights(folder: Path) -> None:
    """A local model folder (a base model or encoder) whose weights are pickles only is refused, naming the file;
    transformers is told to load safetensors only as well (cadenza.llm.load, cadenza.ecd.text_encoder)."""
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        _refuse_pickle_instead(folder / "model.safetensors")


# ================================================================================================= remote code
def check_remote_code(folder: Path, trust_remote_code: bool, key: str) -> None:
    """An `auto_map` in config.json or tokenizer_config.json names Python files shipped with the model. Transformers
    runs them only with trust_remote_code, and needs them only when the model or tokenizer class is not built in;
    that case is refused here, before transformers would, naming the file and the config key that allows it.
    (A built-in model whose folder still carries an auto_map loads with transformers' own code, running nothing.)"""
    if trust_remote_code:
        return
    model_config = _optional_json(folder / "config.json")
    tokenizer_config = _optional_json(folder / "tokenizer_config.json")
    if "auto_map" in model_config and not _built_in_model(model_config):
        _refuse_remote_code(folder / "config.json", f"model_type {model_config.get('model_type')!r}", key)
    if "auto_map" in tokenizer_config and not _built_in_tokenizer(tokenizer_config, model_config):
        _refuse_remote_code(folder / "tokenizer_config.json",
                            f"tokenizer_class {tokenizer_config.get('tokenizer_class')!r}", key)


def _optional_json(path: Path) -> dict:
    return read_model_json(path) if path.is_file() else {}


def _refuse_remote_code(path: Path, what: str, key: str) -> None:
    raise ModelFolderError(f"{path}: auto_map asks to run Python code shipped with the model ({what} is not built "
                           f"into transformers), and the config does not set {key}: true, so Cadenza will not run "
                           "it. Set it only if you trust that code")


def _built_in_model(model_config: dict) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_config.get("model_type") in CONFIG_MAPPING_NAMES


def _built_in_tokenizer(tokenizer_config: dict, model_config: dict) -> bool:
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    if model_config.get("model_type") in TOKENIZER_MAPPING_NAMES:
        return True
    name = (tokenizer_config.get("tokenizer_class") or "").removesuffix("Fast")
    return bool(name) and (tokenizer_class_from_name(name) or tokenizer_class_from_name(name + "Fast")) is not None


# ========================================================================================== local model sources
def looks_like_local_path(source: str) -> bool:
    """Hub ids are `name` or `namespace/name`; anything else shaped like a path is meant as a local file or folder:
    it starts with /, ./, ../ or ~, has more than one separator, ends with .gguf, or its first folder exists here."""
    if source.startswith(("/", "./", "../", "~", ".\\", "..\\")) or source in (".", ".."):
        return True
    if source.lower().endswith(".gguf"):
        return True
    parts = re.split(r"[\\/]", source)
    if len(parts) > 2:
        return True
    return len(parts) == 2 and Path(parts[0]).is_dir()


def check_local_source(source: str, key: str, why: str = "") -> None:
    """A model source (base model, adapter, encoder) that looks like a local path must exist: otherwise transformers
    and huggingface_hub take it for a Hub id and report a confusing repo-id error. `why` adds what to do."""
    if Path(source).expanduser().exists() or not looks_like_local_path(source):
        return
    what = "GGUF file" if source.lower().endswith(".gguf") else "local folder"
    raise ModelFolderError(f"{key}: {what} {source!r} does not exist" + (f"; {why}" if why else ""))


@contextlib.contextmanager
def hub_source_errors(source: str, key: str) -> Iterator[None]:
    """A Hub id that cannot be had (offline, misspelt, private, gated) is a user error naming the key: transformers
    reports it as an OSError with a page of advice, which the CLI would treat as a crash."""
    try:
        yield
    except OSError as e:
        if Path(source).expanduser().exists():
            raise  # a local folder: a real I/O problem, not a Hub one
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise HubError(f"{key}: {source!r} is not a local folder and could not be loaded from the Hub ({reason}). "
                       f"Check the id; without network access, download it once where there is "
                       f"(`hf download {source}`), or give a local folder or a packaged short name "
                       f"(smollm2, minilm)") from None
