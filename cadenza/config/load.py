"""Load a config (dict or YAML file), validate it against `schema.CadenzaConfig`, fill model-type defaults.

Every problem is collected and reported at once with its key path and, for a misspelt key, a suggestion.
Validation never touches the network: a base model is only looked at when it is loaded.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from .schema import CadenzaConfig

ConfigSource = Union[dict, str, Path, CadenzaConfig]

_DEFAULT_LR = {"ecd": 1e-3, "llm_adapter": 2e-4, "llm_full": 2e-5}


def load_config(source: ConfigSource) -> CadenzaConfig:
    """A validated config with model-type defaults filled; raises ConfigError listing every problem."""
    if isinstance(source, CadenzaConfig):
        return source
    raw = read_config_file(source) if isinstance(source, (str, Path)) else copy.deepcopy(source)
    if not isinstance(raw, dict):
        raise ConfigError([("", f"a config is a mapping of keys, got {type(raw).__name__}")])
    raw = _merge_type_defaults(raw)
    try:
        config = CadenzaConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_merge_union_alternatives([_describe(err, raw) for err in e.errors()])) from None
    problems = check_semantics(config)
    if problems:
        raise ConfigError(problems)
    return fill_model_type_defaults(config)


def read_config_file(path: Union[str, Path]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([("", f"config file {str(path)!r} does not exist")])
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError([("", f"{path} is not valid YAML{at}: {getattr(e, 'problem', e)}")]) from None


def render_config(config: ConfigSource) -> dict:
    """The config with every default filled, as plain data (what `cadenza render_config` prints)."""
    return load_config(config).model_dump(mode="json")


def to_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)


# ------------------------------------------------------------------------------------------- defaults
def _merge_type_defaults(raw: dict) -> dict:
    """Ludwig's `defaults.<type>` sections merged under each feature's own keys (the feature wins)."""
    defaults = raw.get("defaults")
    if not isinstance(defaults, dict):
        return raw
    for key in ("input_features", "output_features"):
        features = raw.get(key)
        if not isinstance(features, list):
            continue
        for feature in features:
            if isinstance(feature, dict) and isinstance(defaults.get(feature.get("type")), dict):
                merged = _deep_merge(defaults[feature["type"]], feature)
                feature.clear()
                feature.update(merged)
    return raw


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def fill_model_type_defaults(config: CadenzaConfig) -> CadenzaConfig:
    """Defaults that depend on the model type (shown by render_config, documented in the schema)."""
    trainer = config.trainer
    if config.model_type == "llm":
        if "type" not in trainer.model_fields_set:
            trainer.type = "none"  # Ludwig's llm default: zero-shot unless a trainer type is given
        if "epochs" not in trainer.model_fields_set:
            trainer.epochs = 3
        if "early_stop" not in trainer.model_fields_set:
            trainer.early_stop = -1
    if trainer.learning_rate is None:
        if config.model_type == "ecd":
            trainer.learning_rate = _DEFAULT_LR["ecd"]
        else:
            trainer.learning_rate = _DEFAULT_LR["llm_adapter" if config.adapter else "llm_full"]
    return config


# ------------------------------------------------------------------------------------ semantic checks
def check_semantics(config: CadenzaConfig) -> list[tuple[str, str]]:
    """Cross-field rules a single field's type cannot express."""
    problems: list[tuple[str, str]] = []
    add = lambda path, msg: problems.append((path, msg))  # noqa: E731

    names: dict[str, str] = {}
    for group in ("input_features", "output_features"):
        for i, f in enumerate(getattr(config, group)):
            path = f"{group}[{i}]"
            if f.name in names:
                add(f"{path}.name", f"feature name {f.name!r} is already used by {names[f.name]}")
            names[f.name] = path
            if getattr(f, "dependencies", None):
                add(f"{path}.dependencies", "output dependencies are not supported by Cadenza")
    input_columns = {f.column or f.name for f in config.input_features}
    for i, f in enumerate(config.output_features):
        if (f.column or f.name) in input_columns:
            add(f"output_features[{i}].name", f"column {(f.column or f.name)!r} is both an input and an output")

    outputs = [f.name for f in config.output_features]
    if config.trainer.validation_field and config.trainer.validation_field not in outputs + ["combined"]:
        add("trainer.validation_field", f"{config.trainer.validation_field!r} is not an output feature; "
            f"choose one of {outputs}")
    pre = config.preprocessing
    for key in ("oversample_minority", "undersample_majority"):
        if getattr(pre, key) is not None:
            add(f"preprocessing.{key}", "not supported by Cadenza; use loss.class_weights instead")
    if config.trainer.increase_batch_size_on_plateau:
        add("trainer.increase_batch_size_on_plateau", "not supported; set batch_size (or effective_batch_size)")

    if config.model_type == "ecd":
        _check_ecd(config, add)
    else:
        _check_llm(config, add)
    return problems


def _check_ecd(config: CadenzaConfig, add) -> None:
    for key, where in (("adapter", "input_features[i].encoder.adapter"),
                       ("quantization", "input_features[i].encoder (llm encoder)"),
                       ("base_model", "input_features[i].encoder.pretrained_model_name_or_path")):
        if getattr(config, key) is not None:
            add(key, f"only for model_type: llm; for an ecd text encoder put it under {where}")
    for i, f in enumerate(config.input_features):
        if f.type == "text" and f.encoder is None:
            add(f"input_features[{i}].encoder", "an ecd text input needs an encoder, e.g. "
                "{type: auto_transformer, pretrained_model_name_or_path: minilm}")
    for i, f in enumerate(config.output_features):
        if f.type == "text":
            add(f"output_features[{i}].type", "text outputs need model_type: llm")
        if f.type == "category" and (f.match or f.fallback_label):
            add(f"output_features[{i}].match", "match/fallback_label extract labels from generated text: llm only")
    if config.prompt.template or config.prompt.task:
        add("prompt", "prompts are for model_type: llm")
    for i, f in enumerate(config.output_features):
        if f.loss.class_similarities or f.loss.class_similarities_temperature:
            add(f"output_features[{i}].loss.class_similarities_temperature",
                "class similarities are not supported; use label_smoothing or class_weights")


def _check_llm(config: CadenzaConfig, add) -> None:
    if not config.base_model:
        add("base_model", "model_type: llm needs a base_model (hub id, local folder, .gguf file or `smollm2`)")
    for i, f in enumerate(config.input_features):
        if f.type != "text":
            add(f"input_features[{i}].type", "llm inputs are text placed into the prompt")
        elif f.encoder is not None:
            add(f"input_features[{i}].encoder", "llm inputs have no encoder; the base_model reads the prompt. "
                "For a classifier on LLM embeddings use model_type: ecd")
    if len(config.output_features) != 1:
        add("output_features", "model_type: llm takes exactly one output feature (text or category)")
    for i, f in enumerate(config.output_features):
        if f.type not in ("text", "category"):
            add(f"output_features[{i}].type", f"llm outputs are text or category, not {f.type}")
    if config.trainer.type == "finetune" and config.output_features and config.output_features[0].type != "text" \
            and "type" in config.trainer.model_fields_set:
        add("output_features[0].type", "fine-tuning an llm needs a text output (use category for zero-shot)")
    if config.quantization is not None:
        if config.adapter is None:
            add("quantization", "a quantized base model can only be trained with an adapter (QLoRA): add adapter")
        elif config.adapter.postprocessor.merge_adapter_into_base_model:
            add("adapter.postprocessor.merge_adapter_into_base_model", "an adapter cannot be merged into a 4/8-bit "
                "quantized base model; save the adapter alone or train without quantization")
        from ..device import is_cuda

        if not is_cuda():
            add("quantization", "bitsandbytes 4/8-bit quantization needs a CUDA GPU, and none is available here; "
                "remove `quantization` to train in bf16/fp32")
    for ph in _placeholders(config.prompt.template or ""):
        columns = {f.column or f.name for f in config.input_features}
        specials = {"__task__", "__sample__", "__context__"}
        outs = {f.column or f.name for f in config.output_features}
        if ph in outs:
            add("prompt.template", f"the template mentions the output column {{{ph}}}: it would leak the answer")
        elif ph not in columns | specials:
            hint = difflib.get_close_matches(ph, sorted(columns | specials), n=1)
            add("prompt.template", f"placeholder {{{ph}}} names no input feature"
                + (f"; did you mean {{{hint[0]}}}?" if hint else f"; inputs are {sorted(columns)}"))
    rope = config.model_parameters.rope_scaling if config.model_parameters else None
    if rope is not None:
        kind = rope.get("rope_type", rope.get("type"))
        if kind not in ROPE_TYPES:
            add("model_parameters.rope_scaling.type", f"{kind!r} is not a RoPE scaling type; one of {ROPE_TYPES}")
        if not isinstance(rope.get("factor"), (int, float)) or rope.get("factor") <= 0:
            add("model_parameters.rope_scaling.factor", "needs a positive number (e.g. 2.0 for twice the context)")


ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")


def _placeholders(template: str) -> list[str]:
    import string

    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError:
        return []


# ----------------------------------------------------------------------------- pydantic error -> path
def _describe(err: dict, raw: dict) -> tuple[str, str]:
    loc = err["loc"]
    path, schema_loc = _clean_path(loc, raw)
    kind = err["type"]
    if kind == "extra_forbidden":
        key = loc[-1]
        allowed = _allowed_keys(schema_loc[:-1])
        hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        msg = f"unknown key {key!r}"
        msg += f"; did you mean {hint[0]!r}?" if hint else (f"; allowed here: {', '.join(allowed)}" if allowed else "")
        return path, msg
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        tag, expected = ctx.get("tag"), ctx.get("expected_tags", "")
        options = [t.strip().strip("'") for t in str(expected).split(",")]
        hint = difflib.get_close_matches(str(tag), options, n=1)
        return path + ".type", f"unknown type {tag!r}" + (f"; did you mean {hint[0]!r}?" if hint else "") + \
            f" (one of {expected})"
    if kind == "union_tag_not_found":
        return path + ".type", "missing `type`"
    if kind == "missing":
        return path, "required key is missing"
    if kind == "literal_error":
        given = err.get("input")
        expected = err.get("ctx", {}).get("expected", "")
        options = [t.strip().strip("'") for t in str(expected).replace(" or ", ",").split(",")]
        hint = difflib.get_close_matches(str(given), options, n=1)
        return path, f"{given!r} is not allowed; expected {expected}" + (f"; did you mean {hint[0]!r}?" if hint else "")
    return path, err["msg"]


def _merge_union_alternatives(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A value that fits no member of a union yields one error per member: report them as one line."""
    merged: dict[str, list[str]] = {}
    for path, msg in problems:
        merged.setdefault(path, [])
        if msg not in merged[path]:
            merged[path].append(msg)
    return [(path, " — or — ".join(msgs)) for path, msgs in merged.items()]


def _clean_path(loc: tuple, raw: Any) -> tuple[str, tuple]:
    """Drop pydantic's union-tag entries from a location by walking the raw data alongside it."""
    parts, kept, node = [], [], raw
    for item in loc:
        if isinstance(node, list) and isinstance(item, int):
            parts.append(f"[{item}]")
            kept.append(item)
            node = node[item] if item < len(node) else None
        elif isinstance(node, dict) and item in node:
            parts.append(("." if parts else "") + str(item))
            kept.append(item)
            node = node[item]
        elif isinstance(node, dict) and isinstance(item, str) and node.get("type") == item:
            kept.append(("tag", item))  # discriminator tag: not part of the user's path
        elif node is not None and not isinstance(node, (dict, list)):
            continue  # a scalar value: what follows names union members (int, literal[...]), not keys
        elif isinstance(item, str):
            parts.append(("." if parts else "") + item)
            kept.append(item)
            node = None
        else:
            parts.append(f"[{item}]")
            kept.append(item)
            node = None
    return "".join(parts), tuple(kept)


def _allowed_keys(loc: tuple) -> list[str]:
    ann: Any = CadenzaConfig
    for item in loc:
        models = _models(ann)
        if isinstance(item, tuple):  # a union tag picks the member
            ann = next((m for m in models if item[1] in _type_tags(m)), None)
        elif isinstance(item, int):
            ann = _list_item(ann)
        elif len(models) >= 1 and item in models[0].model_fields:
            ann = models[0].model_fields[item].annotation
        else:
            return []
        if ann is None:
            return []
    models = _models(ann)
    return sorted(models[0].model_fields) if len(models) == 1 else []


def _models(ann) -> list[type[BaseModel]]:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    out = []
    for arg in typing.get_args(ann):
        if typing.get_origin(ann) is list:
            continue
        out.extend(_models(arg))
    return out


def _list_item(ann):
    if typing.get_origin(ann) is list:
        return typing.get_args(ann)[0]
    for arg in typing.get_args(ann):
        item = _list_item(arg)
        if item is not None:
            return item
    return None


def _type_tags(model: type[BaseModel]) -> tuple:
    field = model.model_fields.get("type")
    return typing.get_args(field.annotation) if field else ()
