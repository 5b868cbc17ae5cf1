"""PEFT adapters from the `adapter:` config section (used for llm base models and ecd text encoders alike)."""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    import peft

from .config.schema import AdaloraConfig, IA3Config, LohaConfig, LokrConfig, LoraConfig, OftConfig, VeraConfig


def peft_config(adapter, task_type: Optional[str], total_steps: Optional[int] = None) -> "peft.PeftConfig":
    """The PEFT config object for one of our adapter sections. task_type: "CAUSAL_LM" or None (a bare encoder)."""
    import peft  # takes seconds to import: only when an adapter is used

    common = {"target_modules": adapter.target_modules, "task_type": task_type}
    if isinstance(adapter, AdaloraConfig):
        return peft.AdaLoraConfig(
            r=adapter.r, lora_alpha=adapter.alpha or 2 * adapter.r, lora_dropout=adapter.dropout,
            target_r=adapter.target_r, init_r=adapter.init_r, tinit=adapter.tinit, tfinal=adapter.tfinal,
            deltaT=adapter.deltaT, total_step=adapter.total_step or total_steps, **common)
    if isinstance(adapter, LoraConfig):
        return peft.LoraConfig(
            r=adapter.r, lora_alpha=adapter.alpha or 2 * adapter.r, lora_dropout=adapter.dropout,
            use_rslora=adapter.use_rslora, use_dora=adapter.use_dora, bias=adapter.bias, **common)
    if isinstance(adapter, IA3Config):
        return peft.IA3Config(feedforward_modules=adapter.feedforward_modules, **common)
    if isinstance(adapter, LokrConfig):
        return peft.LoKrConfig(r=adapter.r, alpha=adapter.alpha, rank_dropout=adapter.rank_dropout,
                               module_dropout=adapter.module_dropout, decompose_both=adapter.decompose_both,
                               decompose_factor=adapter.decompose_factor, **common)
    if isinstance(adapter, LohaConfig):
        return peft.LoHaConfig(r=adapter.r, alpha=adapter.alpha, rank_dropout=adapter.rank_dropout,
                               module_dropout=adapter.module_dropout, **common)
    if isinstance(adapter, VeraConfig):
        return peft.VeraConfig(r=adapter.r, vera_dropout=adapter.vera_dropout, **common)
    if isinstance(adapter, OftConfig):
        return peft.OFTConfig(r=adapter.r, oft_block_size=adapter.oft_block_size,
                              module_dropout=adapter.module_dropout, **common)
    raise TypeError(f"unsupported adapter section {type(adapter).__name__}")


def apply_adapter(model: torch.nn.Module, adapter, task_type: Optional[str],
                  total_steps: Optional[int] = None) -> "peft.PeftModel":
    """Wrap `model` with a trainable adapter, or load `pretrained_adapter_weights` to continue training it."""
    import peft

    if adapter.pretrained_adapter_weights:
        return load_adapter(model, adapter.pretrained_adapter_weights, is_trainable=True)
    with _peft_quietly():
        return peft.get_peft_model(model, peft_config(adapter, task_type, total_steps))


def load_adapter(model: torch.nn.Module, folder, *, is_trainable: bool) -> "peft.PeftModel":
    """A saved adapter (adapter_config.json + adapter_model.safetensors) on `model`."""
    import peft

    with _peft_quietly():
        return peft.PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)


@contextlib.contextmanager
def _peft_quietly():
    # peft reads transformers' deprecated `is_gradient_checkpointing`: a warning for peft, not for our users
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
