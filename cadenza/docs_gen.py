"""Generate docs/configuration.md from the schema (the single source of keys, types, defaults and meanings).

    python -m cadenza.docs_gen          # write docs/configuration.md
    python -m cadenza.docs_gen --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from . import config as config_module
from . import schema as S

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

# (title, model, key path prefix); order follows a config file from top to bottom
SECTIONS: list[tuple[str, type[BaseModel], str]] = [
    ("Top level", S.CadenzaConfig, ""),
    ("Text input", S.TextInput, "input_features[]"),
    ("Text encoder `auto_transformer`", S.AutoTransformerEncoder, "input_features[].encoder"),
    ("Text encoder `llm`", S.LLMEncoder, "input_features[].encoder"),
    ("Text preprocessing", S.TextPreprocessing, "input_features[].preprocessing"),
    ("Number input", S.NumberInput, "input_features[]"),
    ("Number preprocessing", S.NumberPreprocessing, "…preprocessing"),
    ("Number/binary encoder", S.DenseEncoder, "input_features[].encoder"),
    ("Category input", S.CategoryInput, "input_features[]"),
    ("Category encoder", S.CategoryEncoder, "input_features[].encoder"),
    ("Category preprocessing", S.CategoryPreprocessing, "…preprocessing"),
    ("Binary input", S.BinaryInput, "input_features[]"),
    ("Binary preprocessing", S.BinaryPreprocessing, "…preprocessing"),
    ("Category output", S.CategoryOutput, "output_features[]"),
    ("Category match rule (llm)", S.MatchRule, "output_features[].match.<label>"),
    ("Binary output", S.BinaryOutput, "output_features[]"),
    ("Number output", S.NumberOutput, "output_features[]"),
    ("Set output", S.SetOutput, "output_features[]"),
    ("Set preprocessing", S.SetPreprocessing, "output_features[].preprocessing"),
    ("Text output (llm)", S.TextOutput, "output_features[]"),
    ("Output decoder", S.Decoder, "output_features[].decoder"),
    ("Output loss", S.Loss, "output_features[].loss"),
    ("Combiner `concat`", S.ConcatCombiner, "combiner"),
    ("Trainer", S.TrainerConfig, "trainer"),
    ("Optimizer", S.Optimizer, "trainer.optimizer"),
    ("Learning-rate schedule", S.LRScheduler, "trainer.learning_rate_scheduler"),
    ("Gradient clipping", S.GradientClipping, "trainer.gradient_clipping"),
    ("Preprocessing (global)", S.GlobalPreprocessing, "preprocessing"),
    ("Split", S.SplitConfig, "preprocessing.split"),
    ("Adapter `lora`", S.LoraConfig, "adapter"),
    ("Adapter `adalora`", S.AdaloraConfig, "adapter"),
    ("Adapter `ia3`", S.IA3Config, "adapter"),
    ("Adapter `loha`", S.LohaConfig, "adapter"),
    ("Adapter `lokr`", S.LokrConfig, "adapter"),
    ("Adapter `vera`", S.VeraConfig, "adapter"),
    ("Adapter `oft`", S.OftConfig, "adapter"),
    ("Adapter postprocessor", S.AdapterPostprocessor, "adapter.postprocessor"),
    ("Quantization (llm, CUDA)", S.QuantizationConfig, "quantization"),
    ("Prompt (llm)", S.PromptConfig, "prompt"),
    ("Few-shot retrieval (llm)", S.PromptRetrieval, "prompt.retrieval"),
    ("Generation (llm)", S.GenerationConfig, "generation"),
    ("Model parameters (llm)", S.ModelParameters, "model_parameters"),
    ("Backend", S.BackendConfig, "backend"),
    ("Per-type defaults", S.Defaults, "defaults"),
]


def type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of: " + ", ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Union or str(origin) == "types.UnionType":
        members = [a for a in args if typing.get_origin(a) is not typing.Literal]
        literals = [v for a in args if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
        parts = [type_name(a) for a in members]
        if literals:
            parts.append(" or ".join(f"`{v}`" for v in literals))
        return " or ".join(parts)
    if origin in (list, tuple, dict):
        inner = ", ".join(type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        title = next((t for t, m, _ in SECTIONS if m is annotation), annotation.__name__)
        return f"[{title}](#{_anchor(title)})"
    return getattr(annotation, "__name__", str(annotation))


def _anchor(title: str) -> str:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def constraints(field: FieldInfo) -> str:
    marks = []
    for meta in field.metadata:
        for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "min items")):
            value = getattr(meta, attr, None)
            if value is not None:
                marks.append(f"{symbol} {value}")
    return f" ({', '.join(marks)})" if marks else ""


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return ""
    if isinstance(value, BaseModel):
        return "its section's defaults"
    if isinstance(value, list) and not value:
        return "`[]`"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value}`"


def section_table(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        description = (field.description or S.COMMON_DESCRIPTIONS.get(name, "")).replace("|", "\\|")
        rows.append(f"| `{key}` | {type_name(field.annotation)}{constraints(field)} | {default_text(field)} | "
                    f"{description} |")
    return rows


def ludwig_differences() -> list[str]:
    rows = []
    for title, model, prefix in SECTIONS:
        for name, field in model.model_fields.items():
            if field.description and "Ludwig:" in field.description:
                key = f"{prefix}.{name}" if prefix else name
                rows.append(f"- `{key}` ({title}): {field.description}")
    lr = config_module._DEFAULT_LR
    rows.append(f"- `trainer.learning_rate` when null: {lr['ecd']:g} for ecd, {lr['llm_adapter']:g} for llm with an "
                f"adapter, {lr['llm_full']:g} for full llm fine-tuning (Ludwig: 0.001 everywhere).")
    rows.append("- For `model_type: llm`, unset trainer keys become `type: none` (Ludwig's zero-shot default), "
                "`epochs: 3` and `early_stop: -1`.")
    return sorted(set(rows), key=rows.index)


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m cadenza.docs_gen` from cadenza/schema.py; do not edit by hand. -->",
        "",
        "Cadenza reads Ludwig's config language for `model_type: ecd` and `model_type: llm`. Every key below is "
        "checked: an unknown or misplaced key is an error naming its path (with a suggestion for typos), and all "
        "problems are reported at once. `cadenza render_config --config c.yaml` prints a config with every default "
        "filled in.",
        "",
        "## Defaults that differ from Ludwig",
        "",
        *ludwig_differences(),
        "",
    ]
    for title, model, prefix in SECTIONS:
        lines += [f"## {title}", ""]
        if model.__doc__ and model.__doc__.strip() and not model.__doc__.startswith(model.__name__ + "("):
            lines += [model.__doc__.strip().splitlines()[0], ""]
        lines += section_table(model, prefix) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if not DOC_PATH.exists() or DOC_PATH.read_text() != text:
            print(f"{DOC_PATH} is out of date: run `python -m cadenza.docs_gen`", file=sys.stderr)
            return 1
        return 0
    DOC_PATH.write_text(text)
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
