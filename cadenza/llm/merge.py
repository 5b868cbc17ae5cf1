"""`cadenza merge`: combine LoRA adapters trained on one base model into one adapter, or into a merged model.

The combinations are PEFT's (`LoraModel.add_weighted_adapter`): PEFT combines the A and B matrices separately,
each scaled by sqrt(weight x the adapter's scaling), so `linear` gives (sum_i c_i B_i)(sum_i c_i A_i), not
sum_i w_i B_i A_i; TIES, DARE and magnitude pruning trim (density) the same stacks before summing.
The result is written as a Cadenza model folder (atomically) that predict, serve and upload read like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from ..adapters import load_adapter
from ..artifacts import LLM_WEIGHTS, atomic_dir, check_model_folder, write_model_header
from ..config.load import load_config
from ..errors import ConfigError, ModelFolderError
from .model import LlmModel

# combination -> whether it takes a density (the fraction of each adapter's entries kept before summing)
COMBINATIONS = {
    "linear": False, "cat": False, "svd": False,
    "ties": True, "ties_svd": True, "dare_linear": True, "dare_ties": True, "dare_linear_svd": True,
    "dare_ties_svd": True, "magnitude_prune": True, "magnitude_prune_svd": True,
}


def merge_models(model_paths: Sequence, output: Path, *, weights: Optional[Sequence[float]] = None,
                 combination: str = "linear", density: Optional[float] = None, merge_into_base: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """Combine the adapters of Cadenza models (run or model folders) trained on one base model; write the result
    to `output` as a Cadenza model folder, with the first model's config, prompt and tokenizer. weights: one per
    model (default 1/n each). merge_into_base: save a plain transformers model instead of an adapter."""
    weights = _check_arguments(len(model_paths), weights, combination, density)
    saved = [check_model_folder(p) for p in model_paths]
    _check_same_base(saved)
    config = load_config(saved[0].config)
    llm = LlmModel.load(saved[0].model_dir, config)
    llm.model = combine(llm.model.unload(), [s.model_dir / LLM_WEIGHTS for s in saved], weights, combination,
                        density)
    llm.weights_kind = "adapter"
    log(f"combined {len(saved)} adapters ({combination}, weights {weights}"
        + (f", density {density}" if density is not None else "") + ")")
    if merge_into_base:
        llm._merge(log)  # checks the merged model's logits against the adapter model's before saving
    output = Path(output)
    with atomic_dir(output) as tmp:
        write_model_header(tmp, config.model_dump(mode="json"))
        llm.save(tmp)
    log(f"merged model saved to {output}")
    return output


def combine(base, adapter_folders: Sequence[Path], weights: Sequence[float], combination: str,
            density: Optional[float]):
    """A PeftModel on `base` whose active adapter ("default") is PEFT's weighted combination of the adapters."""
    names = [f"adapter_{i}" for i in range(len(adapter_folders))]
    model = load_adapter(base, adapter_folders[0], is_trainable=False, adapter_name=names[0])
    for name, folder in zip(names[1:], adapter_folders[1:]):
        model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
    _check_plain_lora(model, names, adapter_folders)
    # PEFT copies the first adapter's config for the result and sets alpha = r; with use_rslora copied along the
    # result would be scaled by sqrt(r) instead of 1. The input adapters keep their own (already computed) scaling.
    model.peft_config[names[0]].use_rslora = False
    model.add_weighted_adapter(names, list(weights), "default", combination_type=combination, density=density)
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    return model.eval()


def _check_arguments(n: int, weights, combination: str, density) -> list[float]:
    problems = []
    if n < 2:
        problems.append(("--model_path", f"give at least two models to merge, not {n}"))
    if combination not in COMBINATIONS:
        problems.append(("--combination", f"{combination!r} is not one of {', '.join(COMBINATIONS)}"))
    elif COMBINATIONS[combination] and density is None:
        problems.append(("--density", f"{combination} needs a density in (0, 1]: the fraction of entries kept"))
    elif not COMBINATIONS[combination] and density is not None:
        trimming = ", ".join(k for k, takes in COMBINATIONS.items() if takes)
        problems.append(("--density", f"{combination} takes no density (only {trimming})"))
    if density is not None and not 0 < density <= 1:
        problems.append(("--density", f"{density} is not in (0, 1]"))
    if weights is not None and len(weights) != n:
        problems.append(("--weights", f"{len(weights)} weights for {n} models: give one per model"))
    if problems:
        raise ConfigError(problems)
    return [float(w) for w in weights] if weights is not None else [1.0 / n] * n


def _check_same_base(saved) -> None:
    for s in saved:
        if s.model_type != "llm" or s.llm_weights != "adapter":
            raise ModelFolderError(f"{s.model_dir}: holds no adapter ({s.model_type}, weights {s.llm_weights}); "
                                   "merge combines llm models trained with adapter: {type: lora}")
    bases = {s.config.get("base_model") for s in saved}
    if len(bases) > 1:
        raise ModelFolderError(f"the models were trained on different base models ({', '.join(map(str, bases))}); "
                               "only adapters of one base model can be combined")


def _check_plain_lora(model, names: Sequence[str], folders: Sequence[Path]) -> None:
    for name, folder in zip(names, folders):
        cfg = model.peft_config[name]
        if getattr(cfg, "peft_type", None) is None or cfg.peft_type.value != "LORA":
            raise ModelFolderError(f"{folder}: a {cfg.peft_type.value} adapter; merge combines LoRA adapters only")
        if cfg.use_dora:  # PEFT's combinations ignore DoRA's magnitude vectors: the result would be wrong
            raise ModelFolderError(f"{folder}: a DoRA adapter (use_dora); PEFT cannot combine DoRA adapters")
