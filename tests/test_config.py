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
