"""PEFT adapters from the `adapter:` config section (used for llm base models and ecd text encoders alike)."""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import torch

if TYPE_CHECKING:
    import peft

from . import device
from .config.schema import (CONVERTED_INITS, AdaloraConfig, IA3Config, LohaConfig, LokrConfig, LoraConfig,
                            OftConfig, VeraConfig)
from .errors import ConfigError, HardwareError

# Initialisers that look at data: they need the training rows' forward passes before training starts.
CALIBRATED_INITS = ("eva", "corda")


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
            use_rslora=adapter.use_rslora, use_dora=adapter.use_dora, bias=adapter.bias, **_lora_options(adapter),
            **common)
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


def _lora_options(adapter: LoraConfig) -> dict:
    """The LoRA-only keys (Ludwig's spelling) as PEFT's LoraConfig arguments."""
    import peft
    from peft.tuners.lora.config import CordaConfig

    init = adapter.init_lora_weights
    replication = [list(r) for r in adapter.layer_replication] if adapter.layer_replication else None
    options = {"init_lora_weights": True if init == "default" else init,  # Ludwig's "default" is PEFT's True
               "rank_pattern": adapter.rank_pattern or {}, "alpha_pattern": adapter.alpha_pattern or {},
               "layer_replication": replication}
    if init == "loftq":  # PEFT requires the section; Ludwig's defaults (4 bits, 1 iteration) when it is absent
        options["loftq_config"] = peft.LoftQConfig(**(adapter.loftq_config.model_dump() if adapter.loftq_config
                                                      else {}))
    if init == "eva":
        options["eva_config"] = peft.EvaConfig(**(adapter.eva_config.model_dump() if adapter.eva_config else {}))
    if init == "corda":  # PEFT's defaults (ipm), given so that PEFT does not warn that it picked them
        options["corda_config"] = CordaConfig()
    return options


def needs_calibration(adapter) -> bool:
    """EVA and CorDA initialise from activations: the caller must pass `calibration` to apply_adapter."""
    return _init(adapter) in CALIBRATED_INITS and not adapter.pretrained_adapter_weights


def needs_conversion(adapter) -> bool:
    """PiSSA, OLoRA and CorDA change the base weights: the adapter is saved converted to one on the original base."""
    return _init(adapter) in CONVERTED_INITS and not adapter.pretrained_adapter_weights


def _init(adapter) -> str:
    return str(getattr(adapter, "init_lora_weights", "default"))


def apply_adapter(model: torch.nn.Module, adapter, task_type: Optional[str], total_steps: Optional[int] = None,
                  calibration: Optional[Callable[[], Iterable[dict]]] = None) -> "peft.PeftModel":
    """Wrap `model` with a trainable adapter, or load `pretrained_adapter_weights` to continue training it.
    `calibration()` yields model-input batches (input_ids, attention_mask, labels) for EVA and CorDA."""
    import peft

    if adapter.pretrained_adapter_weights:
        return load_adapter(model, adapter.pretrained_adapter_weights, is_trainable=True)
    init = _init(adapter)
    if init == "loftq":
        _require_loftq_hardware()
    if needs_calibration(adapter) and calibration is None:
        raise ConfigError([("adapter.init_lora_weights", f"{init} calibrates on the training rows' activations, "
                            "which only llm training provides; use default, gaussian, orthogonal, pissa or olora")])
    config = peft_config(adapter, task_type, total_steps)
    with _peft_quietly():
        if init == "corda":  # CorDA decomposes the weights against the inputs' covariance, before wrapping
            _fill_default_targets(model, config)
            _corda_preprocess()(model, config, run_model=lambda: _forward_rows(model, calibration()))
        wrapped = peft.get_peft_model(model, config, low_cpu_mem_usage=init == "eva")
        if init == "eva":
            peft.initialize_lora_eva_weights(wrapped, dataloader=calibration(), show_progress_bar=False)
    return use_fast_lora_dropout(wrapped)


def _fill_default_targets(model: torch.nn.Module, config) -> None:
    # get_peft_model picks the architecture's default modules, but CorDA's preprocessing runs before it
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if config.target_modules is None:
        config.target_modules = set(DEFAULTS.get(getattr(model.config, "model_type", ""), []))


def _corda_preprocess() -> Callable:
    try:  # PEFT's CorDA module imports `attrs`, which PEFT does not depend on
        from peft.tuners.lora.corda import preprocess_corda
    except ImportError as e:
        raise ConfigError([("adapter.init_lora_weights", f"corda needs a package PEFT's CorDA imports ({e.name}): "
                            f"pip install {'attrs' if e.name == 'attr' else e.name}")]) from e
    return preprocess_corda


@torch.no_grad()
def _forward_rows(model: torch.nn.Module, batches: Iterable[dict]) -> None:
    # one unpadded row per forward: PEFT's CorDA hooks accumulate covariances of single sequences
    model.eval()
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            model(input_ids=ids[mask.bool()][None])


def _require_loftq_hardware() -> None:
    # PEFT's LoftQ quantizes each weight with bitsandbytes on a CUDA (or XPU) device; there is no CPU path
    import importlib.util

    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if not (device.is_cuda() and has_bnb):
        raise HardwareError("adapter.init_lora_weights: loftq quantizes the base weights with bitsandbytes on a "
                            "CUDA GPU" + ("" if has_bnb else " (bitsandbytes is not installed)") + "; this machine "
                            "has none. Use init_lora_weights: pissa (no quantization) or run on a GPU")


def snapshot_initial_adapter(model: "peft.PeftModel") -> tempfile.TemporaryDirectory:
    """The adapter as initialised, before training: PEFT needs it to convert a PiSSA/OLoRA/CorDA adapter to a plain
    LoRA. Saved as an ordinary LoRA (init True), or PEFT would decompose the base again when reading it back."""
    folder = tempfile.TemporaryDirectory(prefix="cadenza-initial-adapter-")
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        model.save_pretrained(str(Path(folder.name) / "initial"), safe_serialization=True)
    finally:
        config.init_lora_weights = init
    return folder


def save_adapter(model: "peft.PeftModel", folder: Path, initial: Optional[tempfile.TemporaryDirectory]) -> None:
    """save_pretrained; an adapter whose initialiser changed the base (snapshot in `initial`) is written as a plain
    LoRA of twice the rank on the original base (delta = AB - A0B0), so plain PEFT loads it on the unchanged model."""
    if initial is None:
        model.save_pretrained(str(folder), safe_serialization=True)
        return
    with _peft_quietly(), warnings.catch_warnings():
        # PEFT warns, while converting, about the very thing the conversion fixes (a base changed by the init)
        warnings.filterwarnings("ignore", message=".*changes the base weights of the model", category=UserWarning)
        warnings.filterwarnings("ignore", message="`corda_config` specified but will be ignored", category=UserWarning)
        model.save_pretrained(str(folder), safe_serialization=True,
                              path_initial_model_for_weight_conversion=str(Path(initial.name) / "initial"))


def lora_plus_lr_ratio(adapter) -> Optional[Callable[[str], float]]:
    """LoRA+ (`loraplus_lr_ratio`): a learning-rate factor per parameter name, as PEFT's create_loraplus_optimizer
    groups them: the B matrices learn ratio times faster than A (and the rest)."""
    ratio = getattr(adapter, "loraplus_lr_ratio", None)
    if not ratio:
        return None
    return lambda name: ratio if ("lora_B" in name or "lora_embedding_B" in name) else 1.0


def load_adapter(model: torch.nn.Module, folder, *, is_trainable: bool,
                 adapter_name: str = "default") -> "peft.PeftModel":
    """A saved adapter (adapter_config.json + adapter_model.safetensors) on `model`."""
    import peft

    with _peft_quietly():
        loaded = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable,
                                                adapter_name=adapter_name)
    return use_fast_lora_dropout(loaded) if is_trainable else loaded


class LoraDropout(torch.nn.Dropout):
    """nn.Dropout on a LoRA adapter's input, whose mask on CPU comes from 16-bit slices of 64-bit random words.

    torch draws one random number per element on CPU, ~5 ns each: for SmolLM2-135M's q/v adapters that was ~13%
    of a bf16 LoRA step (train time 15.0-16.3 s with dropout 0.05 vs 13.6-13.8 s with 0). Four elements per
    random word make the dropout 2.2x faster, forward and backward (943 vs 429 us on 270 x 576 bf16). The drop
    probability is p rounded to a multiple of 1/65536 (0.05 -> 0.0500031), and kept values are scaled by the
    inverse of that probability's complement, so the expectation is unchanged. Other devices take nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        drop = round(self.p * 65536)
        n = x.numel()
        words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        keep = words.view(torch.int16)[:n].view(x.shape) >= drop - 32768
        noise = keep.to(x.dtype).mul_(65536 / (65536 - drop))  # like nn.Dropout: the scaled mask in x's dtype
        return x * noise


def use_fast_lora_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Swap PEFT's nn.Dropout on LoRA inputs for LoraDropout (same p; no weights, so checkpoints are unchanged)."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, layer in dropouts.items():
                if type(layer) is torch.nn.Dropout:
                    dropouts[name] = LoraDropout(layer.p)
    return model


@contextlib.contextmanager
def _peft_quietly():
    # peft reads transformers' deprecated `is_gradient_checkpointing`: a warning for peft, not for our users
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
