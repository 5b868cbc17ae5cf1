"""An llm's causal LM in float32 with any adapter merged: what the GGUF export converts and checks against.

`Model.load` reads the base weights in the dtype this machine serves in (bf16 where it has bf16 units). An export
keeps the saved precision, so weights held in a narrower dtype are read again from the model folder in float32."""

from __future__ import annotations

import torch

from ..adapters import load_adapter
from ..artifacts import LLM_WEIGHTS
from ..data.cache import cache_root, configured_cache_dir
from ..llm.load import load_causal_lm, plain_model_dir


def float32_causal_lm(model):
    """(causal LM, tokenizer) of a loaded llm `cadenza.api.Model`: float32, adapter merged, in eval mode."""
    llm = model.model
    lm = llm.model
    if any(p.dtype != torch.float32 for p in lm.parameters()):
        lm = _read_float32(model)
    if hasattr(lm, "merge_and_unload"):  # a PEFT model: fold the adapter into the base weights
        lm = lm.merge_and_unload()
    return lm.eval(), llm.tokenizer


def _read_float32(model):
    config, llm = model.config, model.model
    weights = model.model_dir / LLM_WEIGHTS
    trust = config.trust_remote_code
    if llm.weights_kind in ("merged", "full"):
        return load_causal_lm(str(weights), dtype=torch.float32, trust_remote_code=trust)
    # an adapter (or no fine-tuning): the base model named by the config, unquantized, in float32
    params = config.model_parameters
    base = load_causal_lm(plain_model_dir(config.base_model, str(cache_root(configured_cache_dir(config)))),
                          dtype=torch.float32, trust_remote_code=trust,
                          rope_scaling=params.rope_scaling if params else None)
    return load_adapter(base, weights, is_trainable=False) if llm.weights_kind == "adapter" else base
