"""`-f safetensors`: the model as plain files other libraries load, safetensors weights only.

llm: the transformers folder of a merged or fully fine-tuned model (AutoModelForCausalLM loads it), or the PEFT
adapter folder of an adapter (PeftModel on the base model the export info names); a model that was never
fine-tuned is its base model in float32. ecd: the model folder's files (head weights, config, preprocessing
metadata; `Model.load` reads the export as it is), plus `encoders/<feature>/` as a transformers folder for each
text encoder whose own weights were trained (an adapted encoder's PEFT folder is already in the model folder)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..artifacts import CONFIG_FILE, ECD_WEIGHTS, ENCODERS_DIR, LLM_WEIGHTS, METADATA_FILE, MODEL_INFO
from ..data.cache import cache_root, configured_cache_dir
from ..ecd.text_encoder import encoder_source, load_tokenizer
from .llm_weights import float32_causal_lm


def write_llm_folder(model, folder: Path) -> dict:
    """Returns what the export info records: the kind of weights and, for an adapter, its base model."""
    kind = model.model.weights_kind
    if kind == "base":
        lm, tokenizer = float32_causal_lm(model)
        lm.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        return {"weights": "base"}
    shutil.copytree(model.model_dir / LLM_WEIGHTS, folder, dirs_exist_ok=True)
    if kind == "adapter":
        return {"weights": "adapter", "base_model": model.config.base_model}
    return {"weights": kind}


def write_ecd_folder(model, folder: Path) -> dict:
    source = model.model_dir
    for name in (MODEL_INFO, CONFIG_FILE, METADATA_FILE, ECD_WEIGHTS):
        shutil.copy2(source / name, folder / name)
    if (source / ENCODERS_DIR).is_dir():
        shutil.copytree(source / ENCODERS_DIR, folder / ENCODERS_DIR)
    trained = [f for f in model.config.input_features
               if f.type == "text" and f.encoder.trainable and f.encoder.adapter is None]
    for feature in trained:
        _write_encoder(model, feature, folder / ENCODERS_DIR / feature.name)
    return {"trained_encoders": [f.name for f in trained],
            "pretrained_encoders": {f.name: encoder_source(f.encoder) for f in model.config.input_features
                                    if f.type == "text" and f.name not in {t.name for t in trained}}}


def _write_encoder(model, feature, folder: Path) -> None:
    """A trained text encoder (weights inside model_weights.safetensors) as a transformers folder of its own."""
    model.model.net.inputs[feature.name].backbone.save_pretrained(folder, safe_serialization=True)
    load_tokenizer(feature.encoder, str(cache_root(configured_cache_dir(model.config)))).save_pretrained(folder)
