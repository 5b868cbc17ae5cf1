"""The Hub model card (README.md) for an uploaded Cadenza model: YAML metadata the Hub indexes, then what the
model is, what it was trained on, how well it did, how to load it (with and without Cadenza) and its config.

Everything here is built from files in the model and run folders; nothing secret lives there, and the token
never reaches this module.
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

# Packaged short names (cadenza.data.assets) and the public models they are copies of. The SmolLM2 asset is a 4-bit
# GGUF dequantized locally, so an adapter trained on it matches the Hub original closely but not bit for bit.
KNOWN_BASE_MODELS = {
    "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "minilm": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
    "all-minilm-l6-v2": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
}
TEXT_TYPES = {"text", "sequence"}
ADAPTER_NAMES = {"lora": "LoRA", "adalora": "AdaLoRA", "ia3": "IA³", "loha": "LoHa", "lokr": "LoKr", "vera": "VeRA",
                 "oft": "OFT"}


@dataclass
class CardInputs:
    """What the card is written from (all plain data read from the model and run folders)."""

    repo_id: str
    model_type: str  # "ecd" | "llm"
    llm_kind: Optional[str]  # "adapter" | "full" | None for ecd
    config: dict
    metadata: dict
    files: list[str]  # paths in the repo
    training_statistics: Optional[dict] = None
    test_statistics: Optional[dict] = None
    description: Optional[dict] = None
    adapter_config: Optional[dict] = None
    encoder_adapters: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ base models
def base_model_reference(name: Optional[str]) -> tuple[Optional[str], Optional[str], bool]:
    """(Hub id for the card's `base_model`, its license if known, whether `name` is a local path).

    Only a real Hub id goes into the metadata: the Hub rejects or mislinks local paths."""
    if not name:
        return None, None, False
    known = KNOWN_BASE_MODELS.get(name.lower())
    if known:
        return known[0], known[1], False
    path = Path(name).expanduser()
    if path.exists() or name.startswith(("/", ".", "~")) or name.endswith(".gguf"):
        return None, _local_license(path), True
    return (name, None, False) if _looks_like_repo_id(name) else (None, None, False)


def _looks_like_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _local_license(path: Path) -> Optional[str]:
    """A local base model folder that came from the Hub usually keeps its card; its license carries over."""
    readme = path / "README.md" if path.is_dir() else None
    if readme is None or not readme.is_file():
        return None
    from huggingface_hub import metadata_load

    try:
        return (metadata_load(readme) or {}).get("license")
    except (yaml.YAMLError, ValueError, UnicodeDecodeError):
        return None


def model_base_name(config: dict) -> Optional[str]:
    """The base model of an llm, or the (first) pretrained text encoder of an ecd model."""
    if config.get("model_type") == "llm":
        return config.get("base_model")
    for feature in config.get("input_features", []):
        encoder = feature.get("encoder") or {}
        name = encoder.get("pretrained_model_name_or_path") or encoder.get("base_model")
        if name:
            return name
    return None


# -------------------------------------------------------------------------------------------- metadata
def pipeline_tag(config: dict) -> str:
    if config.get("model_type") == "llm":
        return "text-generation"
    inputs = {f.get("type") for f in config.get("input_features", [])}
    outputs = [f.get("type") for f in config.get("output_features", [])]
    if inputs & TEXT_TYPES:
        return "text-classification"
    return "tabular-regression" if outputs and outputs[0] == "number" else "tabular-classification"


def library_name(model_type: str, llm_kind: Optional[str]) -> str:
    if model_type == "llm":
        return "peft" if llm_kind == "adapter" else "transformers"
    return "cadenza"


def card_metadata(inputs: CardInputs) -> dict:
    base_id, license_, _ = base_model_reference(model_base_name(inputs.config))
    tags = ["cadenza", inputs.model_type]
    if inputs.llm_kind == "adapter" or inputs.encoder_adapters:
        tags.append("peft")
        adapter_type = (inputs.config.get("adapter") or {}).get("type")
        if adapter_type:
            tags.append(adapter_type)
    if inputs.model_type == "llm":
        tags.append("fine-tuned")
    data: dict[str, Any] = {}
    if base_id:
        data["base_model"] = base_id
    data["library_name"] = library_name(inputs.model_type, inputs.llm_kind)
    data["pipeline_tag"] = pipeline_tag(inputs.config)
    if license_:
        data["license"] = license_
    data["tags"] = tags
    return data


def _metadata_yaml(data: dict) -> str:
    from huggingface_hub import ModelCardData

    return ModelCardData(**data).to_yaml()


# ------------------------------------------------------------------------------------------------ body
def render_card(inputs: CardInputs) -> str:
    sections = [
        f"---\n{_metadata_yaml(card_metadata(inputs))}\n---\n",
        f"# {inputs.repo_id}\n\n{_summary(inputs)}",
        _training_data(inputs),
        _results(inputs),
        _usage(inputs),
        _files(inputs),
        _config(inputs),
    ]
    return "\n".join(s.rstrip() + "\n" for s in sections if s)


def _summary(inputs: CardInputs) -> str:
    config = inputs.config
    base = model_base_name(config)
    base_id, _, local = base_model_reference(base)
    shown = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{base}`" if base else None
    if inputs.model_type == "llm":
        adapter = config.get("adapter") or {}
        what = (f"A {ADAPTER_NAMES.get(adapter.get('type'), 'PEFT')} adapter" if inputs.llm_kind == "adapter"
                else "A fully fine-tuned (or adapter-merged) causal language model")
        text = f"{what} trained with Cadenza on top of {shown}."
    else:
        outputs = ", ".join(f"`{f['name']}` ({f.get('type')})" for f in config.get("output_features", []))
        inputs_ = ", ".join(f"`{f['name']}` ({f.get('type')})" for f in config.get("input_features", []))
        text = (f"A predictive (ecd) model trained with Cadenza: "
                f"it predicts {outputs} from {inputs_}.")
        if shown:
            text += f" Text is encoded with {shown}."
    if local:
        text += (f"\n\nThe base model was a local folder (`{base}`) when this model was trained: loading needs "
                 "that model (or the Hub model it was copied from) at hand.")
    if base and base.lower() in KNOWN_BASE_MODELS and KNOWN_BASE_MODELS[base.lower()][0].endswith("SmolLM2-135M-Instruct"):
        text += ("\n\nThe base weights were Cadenza's packaged SmolLM2 (a 4-bit GGUF dequantized to float32), "
                 "so outputs on the original Hub weights are close but not identical.")
    return text + "\n"


def _training_data(inputs: CardInputs) -> str:
    lines = ["## Training data", ""]
    rows = (inputs.description or {}).get("rows") or {}
    if rows:
        lines.append("Rows per split: " + ", ".join(f"{k} {v}" for k, v in rows.items()) + ".")
        lines.append("")
    precision = (inputs.training_statistics or {}).get("precision") or {}
    if precision.get("precision"):
        lines.append(f"Precision: {precision['precision']} ({precision.get('reason', '')}).")
        lines.append("")
    lines.append("| feature | role | type | details |")
    lines.append("|---|---|---|---|")
    for role, key in (("input", "input_features"), ("output", "output_features")):
        for feature in inputs.config.get(key, []):
            details = _feature_details(feature, inputs.metadata.get(feature.get("name"), {}))
            lines.append(f"| `{feature.get('name')}` | {role} | {feature.get('type')} | {details} |")
    prompt = (inputs.config.get("prompt") or {}).get("template")
    if inputs.model_type == "llm" and prompt:
        lines += ["", "Prompts were built with this template (use the same one at inference):", "",
                  "```text", prompt, "```"]
    return "\n".join(lines) + "\n"


def _feature_details(feature: dict, meta: Any) -> str:
    meta = meta if isinstance(meta, dict) else {}
    vocab = meta.get("idx2str") or meta.get("vocab") or meta.get("labels")
    if isinstance(vocab, list) and vocab and len(vocab) <= 20:
        return "labels: " + ", ".join(f"`{v}`" for v in vocab)
    if isinstance(vocab, list) and vocab:
        return f"{len(vocab)} labels"
    encoder = feature.get("encoder") or {}
    if encoder.get("type"):
        return f"encoder `{encoder['type']}`"
    return ""


def _results(inputs: CardInputs) -> str:
    rows = list(_test_rows(inputs.test_statistics)) + list(_validation_rows(inputs.training_statistics))
    if not rows:
        return ""
    lines = ["## Results", "", "| split | feature | metric | value |", "|---|---|---|---|"]
    lines += [f"| {split} | {feature} | {metric} | {_fmt(value)} |" for split, feature, metric, value in rows]
    return "\n".join(lines) + "\n"


def _test_rows(stats: Optional[dict]):
    for feature, metrics in (stats or {}).items():
        if isinstance(metrics, dict):
            for metric, value in metrics.items():
                if _is_number(value):
                    yield "test", feature, metric, value


def _validation_rows(stats: Optional[dict]):
    """The validation figures of the saved (best) epoch, and that epoch's training loss."""
    if not stats:
        return
    best = stats.get("best_epoch")
    validation, training = stats.get("validation") or [], stats.get("training") or []
    index = best - 1 if isinstance(best, int) and 0 < best <= len(validation) else len(validation) - 1
    if validation and index >= 0:
        for feature, metrics in validation[index].items():
            for metric, value in (metrics.items() if isinstance(metrics, dict) else []):
                if _is_number(value):
                    yield f"validation (epoch {index + 1})", feature, metric, value
    t_index = best - 1 if isinstance(best, int) and 0 < best <= len(training) else len(training) - 1
    if training and t_index >= 0 and _is_number(training[t_index].get("loss")):
        yield f"training (epoch {t_index + 1})", "combined", "loss", training[t_index]["loss"]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _usage(inputs: CardInputs) -> str:
    repo = inputs.repo_id
    parts = ["## How to use", ""]
    if inputs.model_type == "llm":
        parts += _plain_llm_snippet(inputs)
    parts += ["With Cadenza (`pip install cadenza`):", "", "```python", "import pandas as pd",
              "from cadenza import Model", "", f'model = Model.from_pretrained("{repo}")']
    names = [f["name"] for f in inputs.config.get("input_features", [])]
    example = ", ".join(f'"{n}": [...]' for n in names)
    outputs = [f["name"] for f in inputs.config.get("output_features", [])]
    parts += [f"predictions = model.predict(pd.DataFrame({{{example}}}))  # prompt template applied"
              if inputs.model_type == "llm" else f"predictions = model.predict(pd.DataFrame({{{example}}}))",
              f'print(predictions["{outputs[0]}_predictions"])' if outputs else "", "```", ""]
    if inputs.model_type == "ecd":
        parts += ["The weights are plain safetensors (`model_weights.safetensors`, and a PEFT adapter per adapted "
                  "text encoder under `encoders/`); the preprocessing they need (vocabularies, normalisation) is in "
                  "`training_set_metadata.json`.", ""]
    return "\n".join(parts)


def _plain_llm_snippet(inputs: CardInputs) -> list[str]:
    repo = inputs.repo_id
    base = (inputs.adapter_config or {}).get("base_model_name_or_path") or inputs.config.get("base_model")
    base_id, _, _ = base_model_reference(inputs.config.get("base_model"))
    base_shown = base_id or base
    lines = ["With transformers" + (" and PEFT:" if inputs.llm_kind == "adapter" else ":"), "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if inputs.llm_kind == "adapter":
        lines += ["from peft import PeftModel", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base_shown}")',
                  f'model = PeftModel.from_pretrained(base, "{repo}")']
    else:
        lines += ["", f'model = AutoModelForCausalLM.from_pretrained("{repo}")']
    lines += [f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', ""]
    lines += _prompt_lines(inputs)
    lines += ["inputs = tokenizer(prompt, return_tensors=\"pt\", add_special_tokens=" + str(not _uses_chat(inputs)) + ")",
              "output = model.generate(**inputs, max_new_tokens=32)",
              "print(tokenizer.decode(output[0][inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
              "```", ""]
    return lines


def _prompt_settings(inputs: CardInputs) -> dict:
    """The prompt as trained: the llm model type records it in the metadata; the config is the fallback."""
    for value in inputs.metadata.values():
        if isinstance(value, dict) and "use_chat_template" in value:
            return value
    prompt = inputs.config.get("prompt") or {}
    return {"template": prompt.get("template"), "use_chat_template": prompt.get("use_chat_template"),
            "system_prompt": prompt.get("system_prompt")}


def _uses_chat(inputs: CardInputs) -> bool:
    return bool(_prompt_settings(inputs).get("use_chat_template"))


def _prompt_lines(inputs: CardInputs) -> list[str]:
    """Build the prompt the way training did, so the snippet's output matches Cadenza's."""
    settings = _prompt_settings(inputs)
    template = settings.get("template")
    names = [f["name"] for f in inputs.config.get("input_features", [])]
    fields = [n for _, n, _, _ in string.Formatter().parse(template or "") if n]
    if template and fields and all(f in names for f in fields):
        args = ", ".join(f'{f}="..."' for f in dict.fromkeys(fields))
        lines = [f"prompt = {template!r}.format({args})"]
    else:
        lines = ['prompt = "..."  # the input text' + (f" (template: {template!r})" if template else "")]
    if settings.get("use_chat_template"):
        system = settings.get("system_prompt")
        messages = ([f'{{"role": "system", "content": {system!r}}}, '] if system else []) + \
            ['{"role": "user", "content": prompt}']
        lines.append(f"prompt = tokenizer.apply_chat_template([{''.join(messages)}], tokenize=False, "
                     "add_generation_prompt=True)")
    return lines


def _files(inputs: CardInputs) -> str:
    lines = ["## Files", ""]
    for path in sorted(inputs.files):
        lines.append(f"- `{path}`")
    return "\n".join(lines) + "\n"


def _config(inputs: CardInputs) -> str:
    shown = {k: v for k, v in inputs.config.items() if v is not None}
    text = yaml.safe_dump(shown, sort_keys=False, default_flow_style=None, width=110)
    return ("## Cadenza config\n\nThe resolved config (`model_hyperparameters.json`), every default filled in:\n\n"
            f"<details><summary>config</summary>\n\n```yaml\n{text}```\n\n</details>\n")


def load_optional_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
