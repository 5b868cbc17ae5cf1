"""Load a config (dict or YAML file), validate it against `schema.CadenzaConfig`, fill model-type defaults.

Every problem is collected and reported at once with its key path and, for a misspelt key, a suggestion: the
schema's own checks (types, ranges, unknown keys) and the cross-field checks, which run on the config with the
failing values set aside. Validation never touches the network: a base model is only looked at when it is loaded.
"""

from __future__ import annotations

import copy
import difflib
import functools
import typing
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import yaml
from pydantic import BaseModel, ValidationError

from .. import metrics
from ..errors import ConfigError
from .schema import CadenzaConfig, field_range

Problem = tuple[str, str]  # (key path, message)

ConfigSource = Union[dict, str, Path, CadenzaConfig]

_DEFAULT_LR = {"ecd": 1e-3, "llm_adapter": 2e-4, "llm_full": 2e-5}
OUTPUT_TYPES = {"ecd": ("category", "binary", "number", "set"), "llm": ("text", "category")}


def load_config(source: ConfigSource) -> CadenzaConfig:
    """A validated config with model-type defaults filled; raises ConfigError listing every problem."""
    if isinstance(source, CadenzaConfig):
        return source
    raw = read_config_file(source) if isinstance(source, (str, Path)) else copy.deepcopy(source)
    if not isinstance(raw, dict):
        raise ConfigError([("", f"a config is a mapping of keys, got {type(raw).__name__}")])
    raw = _merge_type_defaults(raw)
    problems, config = validate_schema(raw)
    if config is not None:
        problems += [p for p in check_semantics(config) if p not in problems]
    if problems:
        raise ConfigError(problems)
    return fill_model_type_defaults(config)


def validate_schema(raw: dict) -> tuple[list[Problem], Optional[CadenzaConfig]]:
    """The schema's problems, and a config for the cross-field checks: the config itself when it is valid, else the
    config validated again with each failing value set aside (so its default stands in), which lets one run report
    every problem. None when a failure has nothing to stand in for it (a required key, a section's unknown type)."""
    problems: list[Problem] = []
    data: Optional[dict] = raw
    for _ in range(_ROUNDS):
        try:
            return problems, CadenzaConfig.model_validate(data)
        except ValidationError as e:
            errors = e.errors()
        found = _merge_union_alternatives([_describe(err, data) for err in errors])
        problems += [p for p in found if p not in problems]
        data = _set_aside(data, errors)
        if data is None:
            break
    return problems, None


# A corrected section `type` lets pydantic look inside that section, which can reveal further problems: a few rounds
# of setting aside report those too.
_ROUNDS = 3


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
    target = validation_target(config)
    trainer.validation_field, trainer.validation_metric = target.field, target.metric
    return config


# ------------------------------------------------------------------------- validation field and metric
class ValidationTarget(NamedTuple):
    field: str  # an output feature's name or "combined"
    metric: str  # the metrics table's name (an alias given in the config is replaced by it)
    problems: list[Problem]


def validation_target(config: CadenzaConfig) -> ValidationTarget:
    """What the training loop watches, by Ludwig's rule: a metric given without a field picks the output feature
    that computes it (an error when several do); a field given without a metric watches its loss. The metric must
    be one the field computes while training, as the metrics table says."""
    trainer = config.trainer
    given_field = trainer.validation_field if "validation_field" in trainer.model_fields_set else None
    given_metric = trainer.validation_metric if "validation_metric" in trainer.model_fields_set else None
    types = {f.name: f.type for f in config.output_features}
    kind = (config.model_type, trainer.type)  # what a validation round computes depends on both
    metric = metrics.canonical_name(given_metric) if given_metric else "loss"
    if metric is None:
        problem = ("trainer.validation_metric", _unknown_metric(given_metric, types, kind))
        return ValidationTarget(given_field or metrics.COMBINED, given_metric, [problem])
    field, no_field = (given_field, None) if given_field else _field_computing(metric, types, kind)
    if no_field:
        return ValidationTarget(field, metric, [("trainer.validation_metric", no_field)])
    if field != metrics.COMBINED and field not in types:
        hint = difflib.get_close_matches(field, list(types), n=1)
        return ValidationTarget(field, metric, [("trainer.validation_field", f"{field!r} is not an output feature; "
                                + (f"did you mean {hint[0]!r}?" if hint else f"choose one of {_choices(types)}"))])
    watchable = metrics.validation_metric_names(types.get(field, metrics.COMBINED), *kind)
    if metric not in watchable:
        return ValidationTarget(field, metric, [("trainer.validation_metric",
                                                 _not_watchable(metric, field, types, kind))])
    return ValidationTarget(field, metric, [])


def _field_computing(metric: str, types: dict[str, str], kind: tuple[str, str]) -> tuple[str, Optional[str]]:
    """(the one output feature that computes `metric`, None), or ("combined", why there is not one)."""
    if metric == "loss":
        return metrics.COMBINED, None
    # Searched among everything evaluate computes, so that a metric only evaluate has is explained afterwards
    found = [name for name, output in types.items() if metric in metrics.metric_names(output, *kind)]
    if len(found) == 1:
        return found[0], None
    if found:
        return metrics.COMBINED, (f"{metric!r} is computed by several output features ({', '.join(found)}); set "
                                  f"trainer.validation_field to the one to watch")
    return metrics.COMBINED, f"no output feature computes {metric!r}; {_offers(types, kind)}"


def _unknown_metric(metric: str, types: dict[str, str], kind: tuple[str, str]) -> str:
    known = [m.name for m in metrics.METRICS] + [a for m in metrics.METRICS for a in m.aliases]
    hint = difflib.get_close_matches(metric, known, n=1)
    return f"unknown metric {metric!r}; " + (f"did you mean {hint[0]!r}?" if hint else _offers(types, kind))


def _not_watchable(metric: str, field: str, types: dict[str, str], kind: tuple[str, str]) -> str:
    output = types.get(field, metrics.COMBINED)
    watchable = ", ".join(metrics.validation_metric_names(output, *kind))
    what = field if field == metrics.COMBINED else f"{field!r} ({output})"
    if metric in metrics.metric_names(output, *kind) and kind[1] in metrics.PREFERENCE_TRAINERS:
        return (f"{metric!r}: {kind[1]} validation rounds score chosen/rejected completions, so only evaluate "
                f"computes it; while training {what} computes: {watchable}")
    if metric in metrics.metric_names(output, *kind):  # an llm's generation metrics come from evaluate only
        return (f"{metric!r} needs generated text, so only evaluate computes it; while training {what} computes: "
                f"{watchable}")
    return f"{what} does not compute {metric!r}; choose one of: {watchable}"


def _offers(types: dict[str, str], kind: tuple[str, str]) -> str:
    return "; ".join(f"{name} ({output}) computes: {', '.join(metrics.validation_metric_names(output, *kind))}"
                     for name, output in types.items())


def _choices(types: dict[str, str]) -> str:
    return ", ".join(repr(name) for name in [*types, metrics.COMBINED])


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

    problems += validation_target(config).problems
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
    if config.distill is not None:
        problems += distill_problems(config)
    return problems


def _check_ecd(config: CadenzaConfig, add) -> None:
    if config.trainer.type in ("dpo", "orpo", "kto", "none"):
        add("trainer.type", f"{config.trainer.type!r} is for model_type: llm; an ecd model trains with type: trainer")
    for key, where in (("adapter", "input_features[i].encoder.adapter"),
                       ("quantization", "input_features[i].encoder (llm encoder)"),
                       ("base_model", "input_features[i].encoder.pretrained_model_name_or_path")):
        if getattr(config, key) is not None:
            add(key, f"only for model_type: llm; for an ecd text encoder put it under {where}")
    for i, f in enumerate(config.input_features):
        if f.type == "text" and f.encoder is None:
            add(f"input_features[{i}].encoder", "an ecd text input needs an encoder, e.g. "
                "{type: auto_transformer, pretrained_model_name_or_path: minilm}")
        if f.type == "text" and f.preprocessing.format == "messages":
            add(f"input_features[{i}].preprocessing.format", "conversations (format: messages) are llm training "
                "data; an ecd text encoder reads plain text (format: text)")
    for i, f in enumerate(config.output_features):
        if f.type not in OUTPUT_TYPES["ecd"]:
            add(f"output_features[{i}].type", f"{f.type} outputs need model_type: llm")
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
        if f.type not in OUTPUT_TYPES["llm"]:
            add(f"output_features[{i}].type", f"llm outputs are text or category, not {f.type}")
    t = config.trainer
    if t.precompute_ref_log_probs and not (t.type == "dpo" and not t.dpo_reference_free):
        add("trainer.precompute_ref_log_probs", "only for type: dpo with a reference model (kto's reference point "
            "pairs completions per micro-batch, orpo and dpo_reference_free have no reference model); remove it")
    if t.type == "kto" and t.kto_label_column and metrics.canonical_name(t.validation_metric or "") == \
            "rewards/accuracies":
        add("trainer.validation_metric", "kto on a kto_label_column has unpaired rows, hence no rewards/accuracies; "
            "watch rewards/margins or loss")
    if config.trainer.type == "finetune" and config.output_features and config.output_features[0].type != "text" \
            and "type" in config.trainer.model_fields_set:
        add("output_features[0].type", "fine-tuning an llm needs a text output (use category for zero-shot)")
    if config.quantization is not None:
        if config.adapter is None:
            add("quantization", "a quantized base model can only be trained with an adapter (QLoRA): add adapter")
        elif config.adapter.postprocessor.merge_adapter_into_base_model:
            add("adapter.postprocessor.merge_adapter_into_base_model", "an adapter cannot be merged into a 4/8-bit "
                "quantized base model; save the adapter alone or train without quantization")
        if config.backend is not None and config.backend.type == "fsdp":
            add("backend.type", "fsdp does not shard 4/8-bit bitsandbytes weights: with quantization use backend.type: "
                "ddp (each GPU holds the quantized base), or fsdp without quantization")
        zero = config.backend.deepspeed if config.backend is not None else None
        if zero is not None and zero.zero_stage == 3 and not zero.config_file:
            add("backend.deepspeed.zero_stage", "ZeRO-3 partitions every parameter, and 4/8-bit bitsandbytes weights "
                "cannot be partitioned: with quantization use zero_stage 0-2 (the quantized base stays whole) or "
                "backend.type: ddp")
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
    if config.generation.do_sample and config.generation.temperature == 0:
        add("generation.temperature", "temperature 0 means greedy decoding: set do_sample: false, or a temperature "
            "> 0 to sample")
    rope = config.model_parameters.rope_scaling if config.model_parameters else None
    if rope is not None:
        kind = rope.get("rope_type", rope.get("type"))
        if kind not in ROPE_TYPES:
            add("model_parameters.rope_scaling.type", f"{kind!r} is not a RoPE scaling type; one of {ROPE_TYPES}")
        if not isinstance(rope.get("factor"), (int, float)) or rope.get("factor") <= 0:
            add("model_parameters.rope_scaling.factor", "needs a positive number (e.g. 2.0 for twice the context)")


ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")


# ------------------------------------------------------------------------------------------- distillation
def distill_problems(config: CadenzaConfig) -> list[Problem]:
    """The distill section: an ecd student with a category/binary output to fill, and an llm teacher (checked
    like any config, its problems under distill.teacher.config) whose classes are known before it runs."""
    section = config.distill
    if config.model_type != "ecd":
        return [("distill", "the distill section belongs to the student's config, which is model_type: ecd; the "
                 "llm goes under distill.teacher")]
    problems: list[Problem] = []
    student = distill_output(config)
    if student is None:
        names = [f.name for f in config.output_features]
        where = "distill.output_feature"
        if section.output_feature is None:
            problems.append((where, f"the student has several output features ({', '.join(names)}): name the one "
                             "the teacher labels"))
        else:
            hint = difflib.get_close_matches(section.output_feature, names, n=1)
            problems.append((where, f"{section.output_feature!r} is not an output feature"
                             + (f"; did you mean {hint[0]!r}?" if hint else f"; one of {', '.join(names)}")))
    elif student.type not in ("category", "binary"):
        problems.append(("distill.output_feature", f"{student.name!r} is a {student.type} output; the teacher's "
                         "labels fill a category or binary output"))
    teacher = section.teacher
    if teacher.config is None:
        return problems  # a model folder: its classes are read when it is loaded
    try:
        teacher_config = load_teacher_config(teacher.config)
    except ConfigError as e:
        return problems + [(_join("distill.teacher.config", path), message) for path, message in e.problems]
    problems += teacher_problems(teacher_config, teacher.method, teacher.verbalizer, "distill.teacher.config")
    classes = teacher_classes(teacher_config, teacher.verbalizer)
    if student is not None and student.type == "binary" and classes and len(classes) != 2:
        problems.append(("distill.output_feature", f"{student.name!r} is binary but the teacher has "
                         f"{len(classes)} classes ({', '.join(classes)}); use a category output"))
    return problems


def distill_output(config: CadenzaConfig):
    """The student's output feature that the teacher's labels fill (None when the section names none that exists)."""
    name = config.distill.output_feature
    if name is None:
        return config.output_features[0] if len(config.output_features) == 1 else None
    return next((f for f in config.output_features if f.name == name), None)


def load_teacher_config(source: Union[str, dict]) -> CadenzaConfig:
    """The teacher's llm config from distill.teacher.config: a mapping, or a YAML path (relative to the current
    folder, like every other path in a config)."""
    return load_config(source if isinstance(source, dict) else Path(source))


def teacher_problems(teacher: CadenzaConfig, method: str, verbalizer: Optional[dict], where: str,
                     saved: tuple = ()) -> list[Problem]:
    """A teacher must be an llm with one category or text output whose classes are named somewhere."""
    if teacher.model_type != "llm":
        return [(f"{where}.model_type", "the teacher is an llm config (model_type: llm)")]
    if teacher.trainer.type != "none":
        return [(f"{where}.trainer.type", "a teacher config is used as it is (zero-shot): set trainer.type: none, "
                 "or train the llm first (cadenza train) and give its folder as distill.teacher.model")]
    if teacher.prompt.retrieval.type is not None:
        return [(f"{where}.prompt.retrieval", "few-shot examples come from labelled training rows: build the "
                 "teacher with cadenza train (trainer.type: none) on them and give its folder as "
                 "distill.teacher.model")]
    output = teacher.output_features[0]
    if output.type == "category" and output.match and verbalizer:
        unknown = [label for label in verbalizer if label not in output.match]
        if unknown:
            return [("distill.teacher.verbalizer", f"{', '.join(map(repr, unknown))} not among the teacher's "
                     f"classes (its output's match keys: {', '.join(output.match)})")]
    classes = teacher_classes(teacher, verbalizer, saved)
    if len(classes) < 2:
        return [("distill.teacher.verbalizer", "the teacher's classes are unknown: name at least two, as keys of "
                 f"distill.teacher.verbalizer or of {where}.output_features[0].match")]
    if method == "generate" and output.type == "category" and not output.match:
        return [(f"{where}.output_features[0].match", "method: generate reads the class from generated text with "
                 "these rules (label: {type: contains | regex, value: ...}); add them, or use method: score")]
    return []


def teacher_classes(teacher: CadenzaConfig, verbalizer: Optional[dict], saved: tuple = ()) -> list[str]:
    """The classes the teacher chooses among, in order: its output's match keys, then verbalizer keys, then the
    labels a trained teacher saved, then its fallback_label."""
    output = teacher.output_features[0]
    match = list(output.match or {}) if output.type == "category" else []
    fallback = [output.fallback_label] if output.type == "category" and output.fallback_label else []
    classes: list[str] = []
    for label in [*match, *(verbalizer or {}), *saved, *fallback]:
        if label not in classes:
            classes.append(label)
    return classes


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if path else prefix


def _placeholders(template: str) -> list[str]:
    import string

    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError:
        return []


# ----------------------------------------------------------------------------- pydantic error -> path
class Location(NamedTuple):
    path: str  # as the user reads it: `trainer.optimizer.betas[0]`
    schema_loc: tuple  # keys and list indices, with ("tag", x) where a union member was picked by its type x
    raw_keys: tuple  # the keys and indices that exist in the user's data, outermost first


# What a value must be, by pydantic error type. A union's members each fail; their expectations are joined with "or"
# ("must be ≥ 1 or 'auto', got 0"). A range is looked up on the field, so both ends show ("must be in [0, 1)").
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "a whole number",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
    "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
    "model_attributes_type": "a mapping", "none_required": "null",
}
_RANGE_ERRORS = {"greater_than_equal": "≥", "greater_than": ">", "less_than_equal": "≤", "less_than": "<"}


class Described(NamedTuple):
    path: str
    message: str
    expected: Optional[str] = None  # set for "must be ..." problems, which merge across union members
    given: Any = None


def _describe(err: dict, raw: dict) -> Described:
    loc = err["loc"]
    where = _locate(loc, raw)
    path, kind, ctx, given = where.path, err["type"], err.get("ctx", {}), err.get("input")
    if kind == "extra_forbidden":
        return Described(path, _unknown_key(str(loc[-1]), where.schema_loc[:-1]))
    if kind == "union_tag_invalid":
        tag, expected = ctx.get("tag"), ctx.get("expected_tags", "")
        hint = _suggest(tag, str(expected))
        return Described(path + ".type", f"unknown type {tag!r}" + (f"; did you mean {hint!r}?" if hint else "")
                         + f" (one of {expected})")
    if kind == "union_tag_not_found":
        return Described(path + ".type", "missing `type`")
    if kind == "missing":
        return Described(path, "required key is missing")
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        hint = _suggest(given, expected)
        return Described(path, f"{given!r} is not allowed; expected {expected}"
                         + (f"; did you mean {hint!r}?" if hint else ""), expected, given)
    if kind in _RANGE_ERRORS:
        bound = next(v for v in ctx.values())
        expected = _range_at(where.schema_loc) or f"{_RANGE_ERRORS[kind]} {bound}"
        return Described(path, f"must be {expected}, got {given!r}", expected, given)
    if kind in _EXPECTED:
        return Described(path, f"must be {_EXPECTED[kind]}, got {given!r}", _EXPECTED[kind], given)
    if kind == "value_error":  # our own validators' messages, without pydantic's "Value error, " prefix
        return Described(path, str(ctx.get("error", err["msg"])))
    return Described(path, err["msg"])


def _suggest(given: Any, expected: str) -> Optional[str]:
    """The allowed choice closest to a misspelt one, from pydantic's "'a', 'b' or 'c'"."""
    options = [t.strip().strip("'") for t in str(expected).replace(" or ", ",").split(",")]
    hint = difflib.get_close_matches(str(given), options, n=1)
    return hint[0] if hint else None


def _merge_union_alternatives(described: list[Described]) -> list[Problem]:
    """A value that fits no member of a union yields one error per member: report them as one line."""
    merged: dict[str, list[Described]] = {}
    for d in described:
        merged.setdefault(d.path, [])
        if d not in merged[d.path]:
            merged[d.path].append(d)
    problems = []
    for path, ds in merged.items():
        if _went_deeper(path, merged) and all(d.expected in _EXPECTED.values() for d in ds):
            continue  # a union member for scalars rejected a list or mapping that another member looked into
        if len(ds) > 1 and all(d.expected for d in ds):
            expected = " or ".join(dict.fromkeys(d.expected for d in ds))
            problems.append((path, f"must be {expected}, got {ds[0].given!r}"))
        else:
            problems.append((path, " — or — ".join(d.message for d in ds)))
    return problems


def _went_deeper(path: str, paths) -> bool:
    return any(other.startswith(path + "[") or other.startswith(path + ".") for other in paths)


def _locate(loc: tuple, raw: Any) -> Location:
    """Drop pydantic's union entries from a location by walking the raw data alongside it."""
    parts, kept, raw_keys, node = [], [], [], raw
    for item in loc:
        if isinstance(node, list) and isinstance(item, int):
            parts.append(f"[{item}]")
            kept.append(item)
            exists = item < len(node)
            raw_keys += [item] * exists
            node = node[item] if exists else None
        elif isinstance(node, dict) and item in node:
            parts.append(("." if parts else "") + str(item))
            kept.append(item)
            raw_keys.append(item)
            node = node[item]
        elif isinstance(node, dict) and isinstance(item, str) and node.get("type") == item:
            kept.append(("tag", item))  # discriminator tag: not part of the user's path
        elif node is not None and not isinstance(node, dict):
            continue  # in a scalar or list value, a string names a union member (int, list[int]), not a key
        elif isinstance(item, str):
            parts.append(("." if parts else "") + item)
            kept.append(item)
            node = None
        else:
            parts.append(f"[{item}]")
            kept.append(item)
            node = None
    return Location("".join(parts), tuple(kept), tuple(raw_keys))


# ------------------------------------------------------------------------ set aside what failed
def _set_aside(raw: dict, errors: list[dict]) -> Optional[dict]:
    """A copy of `raw` without the values that failed, so their defaults stand in for the cross-field checks.
    A misspelt choice of variant (`model_type`, a feature's or adapter's `type`) is replaced by its suggestion
    instead, since a default would run another variant's checks; without a suggestion, or where a required key is
    missing, the cross-field checks wait for the next run (None)."""
    patched = copy.deepcopy(raw)
    for err in errors:
        kind, keys = err["type"], _locate(err["loc"], raw).raw_keys
        if kind in ("missing", "union_tag_not_found"):
            return None
        if kind == "union_tag_invalid" or keys == ("model_type",):
            ctx = err.get("ctx", {})
            hint = _suggest(ctx.get("tag", err["input"]), ctx.get("expected_tags", ctx.get("expected", "")))
            if hint is None:
                return None
            if kind == "union_tag_invalid":
                _walk(patched, keys)["type"] = hint
            else:
                patched["model_type"] = hint
        else:
            _drop_nearest_key(patched, keys)
    return patched


def _walk(node: Any, keys: tuple) -> Any:
    for key in keys:
        node = node[key]
    return node


def _drop_nearest_key(data: dict, keys: tuple) -> None:
    """Delete the innermost mapping key on the path (a list item is dropped with the key that holds its list, so
    that the indices in other problems' paths stay right)."""
    for depth in range(len(keys), 0, -1):
        try:
            holder = _walk(data, keys[: depth - 1])
        except (KeyError, IndexError, TypeError):
            continue  # an outer key went already
        if isinstance(holder, dict):
            holder.pop(keys[depth - 1], None)
            return


# ------------------------------------------------------------------------ the schema at a location
def _model_at(loc: tuple) -> Optional[type[BaseModel]]:
    """The section model at a schema location (None where it is not one section)."""
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
            return None
        if ann is None:
            return None
    models = _models(ann)
    return models[0] if len(models) == 1 else None


def _allowed_keys(loc: tuple) -> list[str]:
    model = _model_at(loc)
    return sorted(model.model_fields) if model else []


def _range_at(loc: tuple) -> str:
    """The range of the number field at a schema location (list indices of a tuple/list value dropped)."""
    while loc and isinstance(loc[-1], int):
        loc = loc[:-1]
    model = _model_at(loc[:-1]) if loc else None
    field = model.model_fields.get(loc[-1]) if model and isinstance(loc[-1], str) else None
    return field_range(field) if field else ""


def _unknown_key(key: str, section_loc: tuple) -> str:
    """'unknown key', with the closest key of this section, else the sections where the key belongs."""
    allowed = _allowed_keys(section_loc)
    hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if hint:
        return f"unknown key {key!r}; did you mean {hint[0]!r}?"
    homes = _key_homes().get(key)
    if homes:
        return f"unknown key {key!r} here; it belongs under {' or '.join(homes[:3])}"
    return f"unknown key {key!r}" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")


@functools.cache
def _key_homes() -> dict[str, list[str]]:
    """Every key name -> the sections that take it (`trainer`, `input_features[].preprocessing`), shallowest first,
    for telling a misplaced key where it goes."""
    homes: dict[str, list[str]] = {}
    seen, queue = set(), [(CadenzaConfig, "")]
    while queue:
        model, prefix = queue.pop(0)
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            home = prefix or "the top level"
            if home not in homes.setdefault(name, []):
                homes[name].append(home)
            suffix = "[]" if _list_item(field.annotation) is not None and not _models(field.annotation) else ""
            key = f"{prefix}.{name}" if prefix else name
            queue += [(m, key + suffix) for m in _models(field.annotation) + _models(_list_item(field.annotation))]
    return homes


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


def flatten(value: Any, prefix: str = "", index: str = "[{}]") -> dict[str, Any]:
    """Nested config data as {"trainer.learning_rate": 0.001, "input_features[0].name": "review", ...}: the key
    paths errors print. `index` spells list positions (MLflow, which refuses brackets, takes ".{}")."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key), index))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, prefix + index.format(i), index))
        return out
    return {prefix: value} if prefix else {}
