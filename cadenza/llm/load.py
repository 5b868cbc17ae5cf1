"""Find and load a base model: hub id, local folder, .gguf file or a packaged short name (`smollm2`).

A GGUF file is dequantized once through transformers' GGUF support and the plain safetensors copy is cached
under `$CADENZA_CACHE_DIR/models/` (default ~/.cache/cadenza), keyed by the file's path, size and mtime, so the
next load reads safetensors in about a second instead of dequantizing again (~25 s for SmolLM2-135M).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..artifacts import (check_local_source, check_remote_code, hub_source_errors, refuse_pickled_weights,
                         sweep_abandoned, temporary_sibling)
from ..data import assets
from ..data.cache import cache_root

CONVERTED_MARKER = ".cadenza-complete"


def resolve_source(base_model: str) -> tuple[str, Optional[Path]]:
    """(what from_pretrained takes, the .gguf file or None). Short names become their packaged paths; a path that
    does not exist is reported as such (transformers would call it a bad Hub id)."""
    name = assets.resolve_model_name(base_model)
    check_local_source(name, "base_model")
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        return str(path), path
    return (str(path) if path.exists() else name), None


def gguf_cache_dir(gguf: Path, cache: Optional[str] = None) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|v1".encode()).hexdigest()[:16]
    return cache_root(cache) / "models" / f"{gguf.stem}-{key}"


def plain_model_dir(base_model: str, cache: Optional[str] = None, log=print) -> str:
    """A folder or hub id that `from_pretrained` loads without GGUF handling (converting a GGUF file once)."""
    source, gguf = resolve_source(base_model)
    if gguf is None:
        return source
    folder = gguf_cache_dir(gguf, cache)
    if not (folder / CONVERTED_MARKER).exists():
        log(f"converting {gguf.name} to safetensors once (cached in {folder})")
        _convert_gguf(gguf, folder)
    return str(folder)


def _convert_gguf(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_abandoned(folder.parent)  # a conversion killed half-way leaves a model-sized folder
    tmp = temporary_sibling(folder)
    try:
        # a GGUF file carries no code; saying so keeps transformers from ever asking
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                      trust_remote_code=False)
        # save_pretrained refuses a model whose config carries the GGUF quantization entry: the weights are
        # already dequantized, so rebuild a plain model from the config without it
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = type(loaded.config).from_dict(config_dict)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED_MARKER).write_text(str(gguf))
        if folder.exists():  # a concurrent conversion finished first; keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
            return
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_local_model(source: str, trust_remote_code: bool) -> None:
    """A local base model folder: no auto_map code the config does not trust, no pickled weights (named, refused)."""
    folder = Path(source)
    if folder.is_dir():
        check_remote_code(folder, trust_remote_code, "trust_remote_code")
        refuse_pickled_weights(folder)


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_local_model(source, trust_remote_code)
    with hub_source_errors(source, "base_model"):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    fix_special_tokens(tokenizer)
    return tokenizer


def fix_special_tokens(tokenizer) -> None:
    """Every causal LM we train needs an EOS (generation stops on it) and a pad id. When the tokenizer has no
    pad token we reuse UNK or, failing that, EOS: padding is masked out of attention and labels either way,
    and the EOS that ends each target is appended explicitly, so pad == EOS cannot hide it from the loss."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of this base model has no EOS token, so generation could not stop; "
                         f"special tokens: {tokenizer.special_tokens_map}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token_id is not None else tokenizer.eos_token


def load_causal_lm(source: str, *, dtype: torch.dtype, trust_remote_code: bool = False,
                   quantization=None, attn_implementation: Optional[str] = None, rope_scaling: Optional[dict] = None):
    """A causal LM from a plain folder or hub id (see `plain_model_dir`), optionally 4/8-bit via bitsandbytes.
    Safetensors weights only: transformers would otherwise fall back on pickled .bin files."""
    from transformers import AutoModelForCausalLM

    check_local_model(source, trust_remote_code)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if rope_scaling:
        with hub_source_errors(source, "base_model"):
            kwargs["config"] = scaled_rope_config(source, rope_scaling, trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = bnb_config(quantization)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    with hub_source_errors(source, "base_model"):
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def scaled_rope_config(source: str, rope_scaling: dict, trust_remote_code: bool = False):
    """The model's config with Ludwig's `model_parameters.rope_scaling` ({type, factor, ...}) merged into its RoPE
    parameters. Merged rather than passed as `rope_scaling=`: transformers 5 would then drop the model's
    rope_theta."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    update = {("rope_type" if k == "type" else k): v for k, v in rope_scaling.items()}
    if hasattr(config, "rope_parameters"):  # transformers >= 5
        config.rope_parameters = {**(config.rope_parameters or {}), **update}
    else:
        config.rope_scaling = update
    return config


def bnb_config(q):
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=q.llm_int8_threshold,
                                  llm_int8_has_fp16_weight=q.llm_int8_has_fp16_weight)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=getattr(torch, q.bnb_4bit_compute_dtype),
                              bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
                              bnb_4bit_quant_type=q.bnb_4bit_quant_type)
