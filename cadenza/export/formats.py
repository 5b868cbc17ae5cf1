"""`export_model` and `export_mlflow`: which format fits which model type, loading the model (`Model.load` checks
the folder), and writing the export atomically with its cadenza_export.json. Each format's own work lives in its
to_*.py module; GGUF and ONNX exports are checked in their own runtime before they are moved into place."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

from ..errors import CadenzaError
from .folder import export_folder, write_export_info

FORMATS = {"gguf": ("llm",), "onnx": ("ecd",), "safetensors": ("llm", "ecd")}
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_GGUF_DTYPE = "f16"  # llama.cpp's converter's default for float32 weights
GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"


def export_model(model_path: Union[str, Path], output_path: Union[str, Path], format: str, *,
                 dtype: Optional[str] = None, verify: bool = True, log: Callable[[str], None] = print) -> Path:
    """Export a trained model (run or model folder) to `output_path` (a folder, replaced only when it holds an
    earlier export). format: gguf (llm; dtype f32|f16|bf16|q8_0), onnx (ecd) or safetensors (both)."""
    _check_options(format, dtype)
    from ..api import Model

    model = Model.load(model_path, log=log)
    model_type = model.config.model_type
    if model_type not in FORMATS[format]:
        fits = ", ".join(name for name, kinds in FORMATS.items() if model_type in kinds)
        raise CadenzaError(f"format {format!r} is for {' and '.join(FORMATS[format])} models, and {model_path} is an "
                           f"{model_type} model: export it as {fits}")
    write = {"gguf": _gguf, "onnx": _onnx, "safetensors": _safetensors}[format]
    with export_folder(output_path) as folder:
        details = write(model, folder, dtype=dtype or DEFAULT_GGUF_DTYPE, verify=verify, log=log)
        write_export_info(folder, model.model_dir, format, model_type=model_type, **details)
    log(f"exported {format} to {output_path}")
    return Path(output_path)


def export_mlflow(model_path: Union[str, Path], output_path: Union[str, Path],
                  log: Callable[[str], None] = print) -> Path:
    """Export a trained model as an MLflow pyfunc model (see to_mlflow)."""
    from ..api import Model
    from .to_mlflow import write_mlflow

    model = Model.load(model_path, log=log)
    with export_folder(output_path) as folder:
        details = write_mlflow(model, folder)
        write_export_info(folder, model.model_dir, "mlflow", model_type=model.config.model_type, **details)
    log(f"exported an MLflow pyfunc model to {output_path} (mlflow.pyfunc.load_model({str(output_path)!r}))")
    return Path(output_path)


def _check_options(format: str, dtype: Optional[str]) -> None:
    if format not in FORMATS:
        raise CadenzaError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)} "
                           "(MLflow: `cadenza export_mlflow`)")
    if dtype is not None and format != "gguf":
        raise CadenzaError(f"--dtype is for -f gguf; {format} keeps the model's own precision")
    if dtype is not None and dtype not in GGUF_DTYPES:
        raise CadenzaError(f"unknown GGUF dtype {dtype!r}: choose one of {', '.join(GGUF_DTYPES)}")


def _gguf(model, folder: Path, *, dtype: str, verify: bool, log) -> dict:
    from .llm_weights import float32_causal_lm
    from .modelfile import modelfile
    from .to_gguf import write_gguf
    from .verify import check_gguf

    lm, tokenizer = float32_causal_lm(model)
    path = folder / GGUF_FILE
    log(f"writing {GGUF_FILE} ({dtype})")
    write_gguf(lm, tokenizer, path, dtype, name=Path(model.config.base_model).stem)
    (folder / MODELFILE).write_text(modelfile(model.model.builder, tokenizer, model.config.generation, GGUF_FILE))
    details: dict = {"file": GGUF_FILE, "dtype": dtype, "modelfile": MODELFILE}
    if verify:
        details["check"] = check_gguf(path, lm, tokenizer, dtype)
        log(f"checked with transformers: max logit difference {details['check']['max_abs_logit_diff']:.2e}")
    return details


def _onnx(model, folder: Path, *, dtype: str, verify: bool, log) -> dict:
    from .to_onnx import ONNX_FILE, write_onnx
    from .verify import check_onnx

    log(f"writing {ONNX_FILE}")
    details: dict = {"file": ONNX_FILE, **write_onnx(model, folder)}
    if verify:
        details["check"] = check_onnx(folder, model)
        log(f"checked with onnxruntime: max difference {max(details['check']['max_abs_diff'].values()):.2e}")
    return details


def _safetensors(model, folder: Path, *, dtype: str, verify: bool, log) -> dict:
    from .to_safetensors import write_ecd_folder, write_llm_folder

    write = write_llm_folder if model.config.model_type == "llm" else write_ecd_folder
    return write(model, folder)
