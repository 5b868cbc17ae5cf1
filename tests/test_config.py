import pytest
import yaml

from cadenza.config.load import load_config, render_config
from cadenza.errors import ConfigError


def ecd(**extra):
    cfg = {"input_features": [{"name": "review", "type": "text",
                               "encoder": {"type": "auto_transformer", "pretrained_model_name_or_path": "minilm"}}],
           "output_features": [{"name": "sentiment", "type": "category"}]}
    cfg.update(extra)
    return cfg


def problems(cfg) -> dict:
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    return dict(e.value.problems)


def test_typos_are_errors_with_path_and_suggestion():
    cfg = ecd(trainer={"epoch": 3, "learning_rat": 0.1})
    cfg["input_features"][0]["encoder"]["trainabel"] = True
    found = problems(cfg)
    assert found["trainer.epoch"] == "unknown key 'epoch'; did you mean 'epochs'?"
    assert "did you mean 'learning_rate'" in found["trainer.learning_rat"]
    assert "did you mean 'trainable'" in found["input_features[0].encoder.trainabel"]


def test_all_problems_reported_at_once():
    cfg = ecd(trainer={"epochs": 0, "batch_size": "big"}, combiner={"type": "concat", "dropuot": 0.1})
    cfg["output_features"][0]["type"] = "categroy"
    found = problems(cfg)
    assert {"trainer.epochs", "trainer.batch_size", "combiner.dropuot", "output_features[0].type"} <= set(found)
    assert "did you mean 'category'" in found["output_features[0].type"]


def test_unknown_top_level_key_lists_nothing_silently():
    found = problems(ecd(hyperparameters={"x": 1}))
    assert "unknown key 'hyperparameters'" in found["hyperparameters"]


def test_misplaced_adapter_for_ecd_points_to_the_right_place():
    found = problems(ecd(adapter={"type": "lora"}))
    assert "input_features[i].encoder.adapter" in found["adapter"]


def test_ecd_text_input_needs_encoder_and_no_text_outputs():
    cfg = ecd()
    del cfg["input_features"][0]["encoder"]
    cfg["output_features"].append({"name": "summary", "type": "text"})
    found = problems(cfg)
    assert "needs an encoder" in found["input_features[0].encoder"]
    assert "model_type: llm" in found["output_features[1].type"]


def test_duplicate_names_and_split_probabilities():
    cfg = ecd()
    cfg["output_features"].append({"name": "sentiment", "type": "binary"})
    assert "already used" in problems(cfg)["output_features[1].name"]
    found = problems(ecd(preprocessing={"split": {"probabilities": [0.5, 0.5, 0.5]}}))
    assert "sum to 1" in found["preprocessing.split"]


def test_llm_checks():
    found = problems({"model_type": "llm", "input_features": [{"name": "q", "type": "text"}],
                      "output_features": [{"name": "a", "type": "text"}],
                      "prompt": {"template": "Q: {question} {a}"}})
    assert "base_model" in found
    assert "{question}" in found["prompt.template"] or "{a}" in found["prompt.template"]


def test_defaults_filled_and_rendered():
    rendered = render_config(ecd())
    assert rendered["trainer"]["learning_rate"] == 1e-3
    assert rendered["input_features"][0]["encoder"]["reduce_output"] == "mean"
    assert rendered["input_features"][0]["preprocessing"]["cache_encoder_embeddings"] is True
    llm = render_config({"model_type": "llm", "base_model": "smollm2", "input_features": [{"name": "q", "type": "text"}],
                         "output_features": [{"name": "a", "type": "text"}], "adapter": {"type": "lora"}})
    assert llm["trainer"]["type"] == "none" and llm["trainer"]["epochs"] == 3
    assert llm["trainer"]["learning_rate"] == 2e-4


def test_ludwig_defaults_section_is_merged():
    cfg = ecd(defaults={"text": {"preprocessing": {"max_sequence_length": 32}}})
    assert load_config(cfg).input_features[0].preprocessing.max_sequence_length == 32


def test_ludwig_style_config_runs_unchanged(tmp_path):
    text = """
ludwig_version: 0.11.0
model_type: ecd
input_features:
  - name: review
    type: text
    encoder:
      type: auto_transformer
      pretrained_model_name_or_path: bert-base-uncased   # validated offline, never loaded
      trainable: false
      reduce_output: mean
    preprocessing:
      max_sequence_length: 64
      cache_encoder_embeddings: true
output_features:
  - name: sentiment
    type: category
combiner:
  type: concat
trainer:
  epochs: 10
  batch_size: 64
  learning_rate: 0.001
  optimizer:
    type: adam
"""
    path = tmp_path / "ludwig.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.trainer.optimizer.type == "adam" and cfg.input_features[0].encoder.trainable is False


def test_yaml_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model_type: ecd\ninput_features: [\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(path)


def test_render_is_valid_yaml_and_reloads():
    from cadenza.config.load import to_yaml

    text = to_yaml(render_config(ecd()))
    assert load_config(yaml.safe_load(text)).model_dump() == load_config(ecd()).model_dump()


def test_partly_written_sections_keep_their_context_defaults():
    cfg = ecd(input_features=[{"name": "x", "type": "number", "preprocessing": {"fill_value": 1}}],
              output_features=[{"name": "y", "type": "number", "decoder": {"num_fc_layers": 1}},
                               {"name": "b", "type": "binary", "preprocessing": {"fill_value": "no"}},
                               {"name": "s", "type": "set", "preprocessing": {"tokenizer": "comma"}}],
              defaults={"category": {"preprocessing": {"lowercase": True}}})
    cfg["output_features"].append({"name": "c", "type": "category"})
    config = load_config(cfg)
    number_in = config.input_features[0].preprocessing
    assert (number_in.fill_value, number_in.normalization) == (1.0, "zscore")
    y, b, s, c = config.output_features
    assert (y.decoder.type, y.decoder.num_fc_layers, y.preprocessing.normalization) == ("regressor", 1, "zscore")
    assert [o.preprocessing.missing_value_strategy for o in (y, b, s, c)] == ["drop_row"] * 4
    assert c.preprocessing.lowercase  # a `defaults` section is partial too
    # a value the user writes still wins over the context's default
    cfg["output_features"][0]["decoder"] = {"type": "classifier"}
    assert load_config(cfg).output_features[0].decoder.type == "classifier"


def test_rope_scaling_needs_a_type_and_a_factor():
    cfg = {"model_type": "llm", "base_model": "smollm2", "input_features": [{"name": "q", "type": "text"}],
           "output_features": [{"name": "a", "type": "text"}],
           "model_parameters": {"rope_scaling": {"type": "lineer", "factor": 0}}}
    found = problems(cfg)
    assert "not a RoPE scaling type" in found["model_parameters.rope_scaling.type"]
    assert "positive number" in found["model_parameters.rope_scaling.factor"]
    cfg["model_parameters"]["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    assert load_config(cfg).model_parameters.rope_scaling["factor"] == 2.0


# ------------------------------------------------------------------------------------------ numeric ranges
def llm(**extra):
    cfg = {"model_type": "llm", "base_model": "smollm2", "input_features": [{"name": "q", "type": "text"}],
           "output_features": [{"name": "a", "type": "text"}], "adapter": {"type": "lora"}}
    cfg.update(extra)
    return cfg


def with_value(cfg: dict, path: str, value) -> dict:
    """Set a dotted path (`trainer.optimizer.betas[1]`) in a config dict, creating sections on the way."""
    keys = [int(k) if k.isdigit() else k for k in path.replace("[", ".").replace("]", "").split(".")]
    node = cfg
    for key, following in zip(keys, keys[1:]):
        if isinstance(node, dict) and key not in node:
            node[key] = [0.7, 0.1, 0.2] if key == "probabilities" else [0.9, 0.999] if key == "betas" else {}
        node = node[key]
    node[keys[-1]] = value
    return cfg


BAD_NUMBERS = [  # (config, key path, a value out of range)
    (ecd, "trainer.batch_size", 0), (ecd, "trainer.eval_batch_size", 0), (ecd, "trainer.epochs", 0),
    (ecd, "trainer.train_steps", 0), (ecd, "trainer.learning_rate", 0), (ecd, "trainer.early_stop", -2),
    (ecd, "trainer.gradient_accumulation_steps", 0), (ecd, "trainer.effective_batch_size", 0),
    (ecd, "trainer.max_batch_size", 0), (ecd, "trainer.eval_steps", 0), (ecd, "trainer.checkpoints_per_epoch", -1),
    (ecd, "trainer.regularization_lambda", -0.1), (ecd, "trainer.optimizer.eps", 0),
    (ecd, "trainer.optimizer.weight_decay", -1), (ecd, "trainer.optimizer.momentum", 1.0),
    (ecd, "trainer.optimizer.betas[1]", 1.0), (ecd, "trainer.learning_rate_scheduler.warmup_fraction", 1.5),
    (ecd, "trainer.learning_rate_scheduler.decay_rate", 1.5), (ecd, "trainer.learning_rate_scheduler.reduce_rate", 0),
    (ecd, "trainer.learning_rate_scheduler.min_lr_fraction", 2), (ecd, "trainer.gradient_clipping.clipglobalnorm", 0),
    (ecd, "combiner.dropout", 1.0), (ecd, "combiner.output_size", 0), (ecd, "combiner.num_fc_layers", -1),
    (ecd, "preprocessing.sample_ratio", 0), (ecd, "preprocessing.sample_size", 0),
    (ecd, "preprocessing.split.probabilities[0]", -0.1),
    (ecd, "input_features[0].preprocessing.max_sequence_length", 0),
    (ecd, "input_features[0].encoder.max_sequence_length", 0), (ecd, "output_features[0].top_k", 0),
    (ecd, "output_features[0].loss.label_smoothing", 1), (ecd, "output_features[0].loss.weight", -1),
    (ecd, "output_features[0].decoder.fc_dropout", 1), (ecd, "output_features[0].preprocessing.most_common", 0),
    (llm, "adapter.r", 0), (llm, "adapter.alpha", 0), (llm, "adapter.dropout", 1),
    (llm, "generation.max_new_tokens", 0), (llm, "generation.temperature", -0.1), (llm, "generation.top_k", -1),
    (llm, "generation.top_p", 0), (llm, "generation.top_p", 1.5), (llm, "generation.num_beams", 0),
    (llm, "generation.num_return_sequences", 0), (llm, "generation.repetition_penalty", 0),
    (llm, "model_parameters.neftune_noise_alpha", -1), (llm, "prompt.retrieval.k", -1),
    (llm, "preprocessing.global_max_sequence_length", 0), (llm, "trainer.packing_max_sequences_per_pack", 0),
    (llm, "trainer.max_tokens_per_batch", 0),
]


@pytest.mark.parametrize("make, path, value", BAD_NUMBERS, ids=[f"{p}={v}" for _, p, v in BAD_NUMBERS])
def test_a_number_out_of_range_names_its_path_and_range(make, path, value):
    found = problems(with_value(make(), path, value))
    assert path in found, found
    assert found[path].startswith("must be ") and found[path].endswith(f", got {value!r}"), found[path]


def test_range_messages_show_both_ends_and_the_alternatives():
    found = problems(ecd(trainer={"batch_size": 0, "learning_rate": -1, "optimizer": {"momentum": 1.5}}))
    assert found["trainer.batch_size"] == "must be ≥ 1 or 'auto', got 0"
    assert found["trainer.learning_rate"] == "must be > 0, got -1"
    assert found["trainer.optimizer.momentum"] == "must be in [0, 1), got 1.5"
    weights = ecd()
    weights["output_features"][0]["loss"] = {"class_weights": {"pos": 2, "neg": -1}}
    assert "must be ≥ 0" in problems(weights)["output_features[0].loss.class_weights"]
    split = ecd(preprocessing={"split": {"probabilities": [0.6, 0.6, 0.1]}})
    assert problems(split)["preprocessing.split"] == "split probabilities must sum to 1, got 1.3"


# Numbers that are values rather than settings, or keys that must stay null: no range to check
UNBOUNDED_NUMBERS = {"NumberPreprocessing.fill_value", "BinaryPreprocessing.fill_value", "Loss.class_weights",
                     "Loss.class_similarities", "GenerationConfig.length_penalty",
                     "GlobalPreprocessing.oversample_minority", "GlobalPreprocessing.undersample_majority",
                     "HyperoptParameter.lower", "HyperoptParameter.upper"}  # a search range's ends: any number


def test_every_number_in_the_schema_has_a_range():
    import typing

    from pydantic import BaseModel

    from cadenza.config import schema

    def numeric(annotation) -> bool:
        return annotation in (int, float) or any(numeric(a) for a in typing.get_args(annotation))

    def sections(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield annotation
        for arg in typing.get_args(annotation):
            yield from sections(arg)

    unbounded, seen, queue = [], set(), [schema.CadenzaConfig]
    while queue:
        model = queue.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            queue += list(sections(field.annotation))
            key = f"{model.__name__}.{name}"
            if numeric(field.annotation) and not schema.field_range(field) and key not in UNBOUNDED_NUMBERS:
                unbounded.append(key)
    assert len(seen) > 30 and not unbounded, unbounded


def test_temperature_zero_is_greedy_and_cannot_sample():
    found = problems(llm(generation={"do_sample": True, "temperature": 0}))
    assert "do_sample: false" in found["generation.temperature"]
    assert load_config(llm(generation={"temperature": 0})).generation.temperature == 0


# ------------------------------------------------------------------------------------------ unknown keys
def test_misplaced_keys_say_where_they_belong():
    found = problems(ecd(learning_rate=0.1, trainer={"max_sequence_length": 64}))
    assert found["learning_rate"] == "unknown key 'learning_rate' here; it belongs under trainer"
    assert found["trainer.max_sequence_length"].startswith("unknown key 'max_sequence_length' here; it belongs under")
    assert "input_features[].preprocessing" in found["trainer.max_sequence_length"]
    found = problems(ecd(trainer={"base_model": "smollm2"}))
    assert "the top level" in found["trainer.base_model"]


# ------------------------------------------------------------------------------------------ validation target
def target(cfg) -> tuple:
    trainer = render_config(cfg)["trainer"]
    return trainer["validation_field"], trainer["validation_metric"]


def outputs(*types) -> list[dict]:
    return [{"name": f"{kind}_{i}", "type": kind} for i, kind in enumerate(types)]


def test_validation_target_follows_ludwig():
    assert target(ecd()) == ("combined", "loss")  # nothing given
    assert target(ecd(trainer={"validation_metric": "accuracy"})) == ("sentiment", "accuracy")  # the field is found
    assert target(ecd(trainer={"validation_metric": "loss"})) == ("combined", "loss")
    assert target(ecd(trainer={"validation_field": "sentiment"})) == ("sentiment", "loss")
    assert target(ecd(trainer={"validation_field": None, "validation_metric": None})) == ("combined", "loss")
    several = ecd(output_features=outputs("category", "set", "number"))
    assert target({**several, "trainer": {"validation_metric": "jaccard"}}) == ("set_1", "jaccard")
    # Ludwig's long metric names work and are stored under the table's name
    assert target({**several, "trainer": {"validation_metric": "mean_squared_error"}}) == ("number_2", "mse")
    assert target(llm(trainer={"validation_metric": "perplexity"})) == ("a", "perplexity")


def test_validation_metric_problems_list_what_is_valid():
    found = problems(ecd(output_features=outputs("category", "binary"), trainer={"validation_metric": "accuracy"}))
    assert found["trainer.validation_metric"] == ("'accuracy' is computed by several output features (category_0, "
                                                  "binary_1); set trainer.validation_field to the one to watch")
    found = problems(ecd(trainer={"validation_field": "sentiment", "validation_metric": "r2"}))
    assert found["trainer.validation_metric"] == ("'sentiment' (category) does not compute 'r2'; choose one of: "
                                                  "loss, accuracy, hits_at_k, precision, recall, f1, roc_auc")
    found = problems(ecd(trainer={"validation_metric": "acuracy"}))
    assert found["trainer.validation_metric"] == "unknown metric 'acuracy'; did you mean 'accuracy'?"
    found = problems(ecd(trainer={"validation_field": "combined", "validation_metric": "accuracy"}))
    assert "combined does not compute 'accuracy'; choose one of: loss" == found["trainer.validation_metric"]
    found = problems(ecd(trainer={"validation_field": "sentimnt"}))
    assert found["trainer.validation_field"] == "'sentimnt' is not an output feature; did you mean 'sentiment'?"
    found = problems(llm(trainer={"validation_field": "a", "validation_metric": "rouge_l"}))
    assert "needs generated text" in found["trainer.validation_metric"]
    assert "loss, perplexity, token_accuracy" in found["trainer.validation_metric"]


def test_resolved_target_is_rendered_and_reloads():
    rendered = render_config(ecd(trainer={"validation_metric": "macro_f1"}))
    assert (rendered["trainer"]["validation_field"], rendered["trainer"]["validation_metric"]) == ("sentiment", "f1")
    assert render_config(rendered) == rendered


# ------------------------------------------------------------------------------------------ all at once
def test_three_different_problems_in_one_run():
    cfg = ecd(trainer={"batch_size": 0, "validation_metric": "acuracy"}, combiner={"dropuot": 0.1})
    found = problems(cfg)
    assert set(found) == {"trainer.batch_size", "combiner.dropuot", "trainer.validation_metric"}


def test_a_misspelt_type_is_read_as_its_suggestion_to_check_the_rest():
    cfg = ecd(trainer={"validation_metric": "jaccard"})
    cfg["output_features"] = [{"name": "tags", "type": "sett", "threshold": 2}]
    found = problems(cfg)
    assert "did you mean 'set'" in found["output_features[0].type"]
    assert found["output_features[0].threshold"] == "must be in (0, 1), got 2"  # inside the misspelt section
    assert "trainer.validation_metric" not in found  # jaccard is right for the set output it was meant to be


def test_an_unknown_model_type_brings_no_checks_of_another_model_type():
    found = problems(llm(model_type="gpt", trainer={"epochs": 0}))
    assert set(found) == {"model_type", "trainer.epochs"}  # no ecd complaints about the adapter or text output


def test_conversations_are_llm_data_not_ecd_text():
    config = {"input_features": [{"name": "m", "type": "text", "preprocessing": {"format": "messages"},
                                  "encoder": {"type": "auto_transformer", "pretrained_model_name_or_path": "minilm"}}],
              "output_features": [{"name": "y", "type": "category"}]}
    with pytest.raises(ConfigError, match=r"input_features\[0\]\.preprocessing\.format: conversations"):
        load_config(config)


@pytest.mark.parametrize("kind", ["dpo", "orpo", "kto", "none"])
def test_llm_trainer_types_are_refused_for_ecd(kind):
    config = {"input_features": [{"name": "x", "type": "number"}], "output_features": [{"name": "y", "type": "binary"}],
              "trainer": {"type": kind}}
    with pytest.raises(ConfigError, match=rf"trainer.type: '{kind}' is for model_type: llm"):
        load_config(config)
