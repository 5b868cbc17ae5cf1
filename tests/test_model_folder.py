"""Damaged, unsafe and misplaced model folders: one ModelFolderError naming the file (or the config key) and what
to do, from the one validator (cadenza.artifacts.check_model_folder) that Model.load, the CLI and upload share.

The model folders are real ones, trained here on the tiny random models of conftest; each test damages a copy.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pandas as pd
import pytest
import torch

from cadenza import Model
from cadenza.artifacts import check_local_source, check_model_folder, check_safetensors, looks_like_local_path
from cadenza.cli import main
from cadenza.errors import HubError, ModelFolderError
from cadenza.llm.load import resolve_source

ECD_ROWS = pd.DataFrame({"review": ["good fine plot", "bad dull scene", "great music", "awful actor"] * 6,
                         "sentiment": ["pos", "neg", "pos", "neg"] * 6})
LLM_ROWS = pd.DataFrame({"question": [f"what comes after {i}" for i in range(8)],
                         "answer": [str(i + 1) for i in range(8)]})


def quiet(_):
    pass


def ecd_config(encoder: str) -> dict:
    return {"input_features": [{"name": "review", "type": "text", "preprocessing": {"max_sequence_length": 8},
                                "encoder": {"type": "auto_transformer", "pretrained_model_name_or_path": encoder}}],
            "output_features": [{"name": "sentiment", "type": "category"}], "trainer": {"epochs": 1}}


def llm_config(base: str, **extra) -> dict:
    return {"model_type": "llm", "base_model": base, "input_features": [{"name": "question", "type": "text"}],
            "output_features": [{"name": "answer", "type": "text"}], "generation": {"max_new_tokens": 2},
            "trainer": {"type": "finetune", "epochs": 1, "batch_size": 8}, **extra}


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Model folders written by Cadenza itself: ecd (frozen encoder), llm LoRA adapter, llm full fine-tune."""
    root = tmp_path_factory.mktemp("trained")
    runs = {"ecd": (ecd_config(str(tiny_bert_dir)), ECD_ROWS),
            "adapter": (llm_config(str(tiny_llama_dir), adapter={"type": "lora", "r": 2}), LLM_ROWS),
            "full": (llm_config(str(tiny_llama_dir)), LLM_ROWS)}
    return {kind: Model(config, log=quiet).train(rows, output_directory=root / kind).model_dir
            for kind, (config, rows) in runs.items()}


@pytest.fixture
def copy_of(trained, tmp_path):
    def copy(kind: str) -> Path:
        return Path(shutil.copytree(trained[kind], tmp_path / kind / "model"))

    return copy


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def pickle_instead(path: Path, name: str) -> None:
    """Replace safetensors weights by a torch.save pickle of the same tensors (written, never loaded)."""
    path.unlink()
    torch.save({"weight": torch.zeros(2)}, path.with_name(name))


def load_error(model_dir: Path) -> str:
    with pytest.raises(ModelFolderError) as err:
        Model.load(model_dir, log=quiet)
    return str(err.value)


# ============================================================================================ damaged folders
ECD_DAMAGE = {
    "config missing": (lambda m: (m / "model_hyperparameters.json").unlink(), "model_hyperparameters.json is missing"),
    "metadata missing": (lambda m: (m / "training_set_metadata.json").unlink(), "training_set_metadata.json is missing"),
    "weights missing": (lambda m: (m / "model_weights.safetensors").unlink(), "model_weights.safetensors is missing"),
    "truncated metadata": (lambda m: truncate(m / "training_set_metadata.json"),
                           "training_set_metadata.json is truncated or not valid JSON"),
    "truncated info": (lambda m: truncate(m / "cadenza_model.json"), "cadenza_model.json is truncated or not valid"),
    "truncated weights": (lambda m: truncate(m / "model_weights.safetensors", 0.9),
                          "model_weights.safetensors is truncated or damaged"),
    "garbled header": (lambda m: _garble_header(m / "model_weights.safetensors"),
                       "model_weights.safetensors is not a readable safetensors file"),
    "pickle beside": (lambda m: pickle_instead(m / "model_weights.safetensors", "model_weights.pt"),
                      "model_weights.pt: Cadenza loads only safetensors"),
    "pickle renamed": (lambda m: torch.save({"w": torch.zeros(2)}, m / "model_weights.safetensors"),
                       "model_weights.safetensors: Cadenza loads only safetensors"),
    "newer format": (lambda m: edit_json(m / "cadenza_model.json", format=99, cadenza_version="9.0.0"),
                     "cadenza_model.json: this model folder has format 99 (written by Cadenza 9.0.0)"),
}


def _garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8:8 + header_len] = b"{" + b" " * (header_len - 1)  # same length, not JSON any more
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", list(ECD_DAMAGE))
def test_damaged_ecd_folder_is_one_error_naming_the_file(case, copy_of):
    damage, expected = ECD_DAMAGE[case]
    model = copy_of("ecd")
    damage(model)
    message = load_error(model)
    what_to_do = "upgrade cadenza" if case == "newer format" else "retrain"
    assert expected in message and what_to_do in message


LLM_DAMAGE = {
    "weights folder missing": ("adapter", lambda w: shutil.rmtree(w), "model_weights/ is missing"),
    "adapter weights missing": ("adapter", lambda w: (w / "adapter_model.safetensors").unlink(),
                                "adapter_model.safetensors is missing"),
    "adapter config truncated": ("adapter", lambda w: truncate(w / "adapter_config.json"),
                                 "adapter_config.json is truncated or not valid JSON"),
    "adapter as pickle": ("adapter", lambda w: pickle_instead(w / "adapter_model.safetensors", "adapter_model.bin"),
                          "adapter_model.bin: Cadenza loads only safetensors"),
    "tokenizer truncated": ("adapter", lambda w: truncate(w / "tokenizer.json"),
                            "tokenizer.json is truncated or not valid JSON"),
    "no tokenizer": ("adapter", lambda w: (w / "tokenizer_config.json").unlink(), "tokenizer_config.json is missing"),
    "full weights truncated": ("full", lambda w: truncate(w / "model.safetensors", 0.99),
                               "model.safetensors is truncated or damaged"),
    "full weights as pickle": ("full", lambda w: pickle_instead(w / "model.safetensors", "pytorch_model.bin"),
                               "pytorch_model.bin: Cadenza loads only safetensors"),
    "model config missing": ("full", lambda w: (w / "config.json").unlink(), "config.json is missing"),
}


@pytest.mark.parametrize("case", list(LLM_DAMAGE))
def test_damaged_llm_folder_is_one_error_naming_the_file(case, copy_of):
    kind, damage, expected = LLM_DAMAGE[case]
    model = copy_of(kind)
    damage(model / "model_weights")
    message = load_error(model)
    assert expected in message and "retrain" in message


def test_saved_config_this_cadenza_rejects_names_the_file(copy_of):
    model = copy_of("ecd")
    config = json.loads((model / "model_hyperparameters.json").read_text())
    config["trainer"]["a_key_from_the_future"] = 1
    (model / "model_hyperparameters.json").write_text(json.dumps(config))
    edit_json(model / "cadenza_model.json", cadenza_version="9.0.0")
    message = load_error(model)
    assert message.startswith(f"{model / 'model_hyperparameters.json'} does not load (saved by Cadenza 9.0.0; this is ")
    assert "upgrade cadenza if that is newer" in message and "trainer.a_key_from_the_future: unknown key" in message


def test_pickle_message_says_how_to_convert(copy_of):
    model = copy_of("full")
    pickle_instead(model / "model_weights" / "model.safetensors", "pytorch_model.bin")
    message = load_error(model)
    assert f"{model / 'model_weights' / 'pytorch_model.bin'}: Cadenza loads only safetensors" in message
    assert "safetensors.torch.save_file(torch.load('pytorch_model.bin', weights_only=True), " \
           "'model.safetensors')" in message


def test_cli_predict_reports_the_damaged_file(copy_of, tmp_path, capsys):
    model = copy_of("ecd")
    truncate(model / "training_set_metadata.json")
    data = tmp_path / "rows.csv"
    ECD_ROWS.to_csv(data, index=False)
    assert main(["predict", "-m", str(model), "--dataset", str(data)]) == 2
    assert f"{model / 'training_set_metadata.json'} is truncated or not valid JSON" in capsys.readouterr().err


def test_run_folder_and_model_folder_both_pass(trained):
    for kind, model_dir in trained.items():
        assert check_model_folder(model_dir.parent).model_dir == model_dir
    assert check_model_folder(trained["adapter"]).llm_weights == "adapter"
    assert check_model_folder(trained["full"]).llm_weights == "full"
    assert check_model_folder(trained["ecd"]).llm_weights is None


# ================================================================================================= remote code
def _custom_code(folder: Path, file: str) -> None:
    """An auto_map entry for a model or tokenizer class transformers does not have: loading would run its code."""
    if file == "config.json":
        edit_json(folder / file, model_type="cadenza_custom", auto_map={"AutoModelForCausalLM": "modeling.Custom"})
    else:
        edit_json(folder / file, tokenizer_class="CadenzaCustomTokenizer",
                  auto_map={"AutoTokenizer": ["tokenization.CadenzaCustomTokenizer", None]})


@pytest.mark.parametrize("kind, file", [("full", "config.json"), ("adapter", "tokenizer_config.json")])
def test_auto_map_without_trust_remote_code_is_refused(kind, file, copy_of):
    model = copy_of(kind)
    _custom_code(model / "model_weights", file)
    message = load_error(model)
    assert f"{model / 'model_weights' / file}: auto_map asks to run Python code" in message
    assert "does not set trust_remote_code: true" in message
    edit_json(model / "model_hyperparameters.json", trust_remote_code=True)
    assert check_model_folder(model).llm_weights == kind  # the config trusts it: the folder check passes


def test_auto_map_of_a_built_in_model_runs_no_code_and_loads(copy_of, trained):
    """transformers saves the auto_map of a base model it supports natively; such a folder loads with the
    built-in classes and trust_remote_code false, so it is not refused."""
    model = copy_of("full")
    edit_json(model / "model_weights" / "config.json", auto_map={"AutoModelForCausalLM": "modeling.Custom"})
    rows = LLM_ROWS.head(2)
    assert Model.load(model, log=quiet).predict(rows).equals(Model.load(trained["full"], log=quiet).predict(rows))


def test_local_base_model_with_custom_code_is_refused_before_loading(tiny_llama_dir, tmp_path):
    base = Path(shutil.copytree(tiny_llama_dir, tmp_path / "custom-base"))
    _custom_code(base, "config.json")
    with pytest.raises(ModelFolderError) as err:
        Model(llm_config(str(base)), log=quiet).train(LLM_ROWS, output_directory=tmp_path / "out")
    assert f"{base / 'config.json'}: auto_map" in str(err.value) and "trust_remote_code: true" in str(err.value)


def test_local_encoder_with_custom_code_names_the_feature_key(tiny_bert_dir, tmp_path):
    encoder = Path(shutil.copytree(tiny_bert_dir, tmp_path / "custom-encoder"))
    _custom_code(encoder, "config.json")
    with pytest.raises(ModelFolderError) as err:
        Model(ecd_config(str(encoder)), log=quiet).train(ECD_ROWS, output_directory=tmp_path / "out")
    assert f"{encoder / 'config.json'}: auto_map" in str(err.value)
    assert "input_features[0].encoder.trust_remote_code: true" in str(err.value)


def test_local_encoder_with_pickled_weights_only_is_refused(tiny_bert_dir, tmp_path):
    encoder = Path(shutil.copytree(tiny_bert_dir, tmp_path / "pickled-encoder"))
    pickle_instead(encoder / "model.safetensors", "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="pytorch_model.bin: Cadenza loads only safetensors"):
        Model(ecd_config(str(encoder)), log=quiet).train(ECD_ROWS, output_directory=tmp_path / "out")


# ====================================================================================== missing local sources
@pytest.mark.parametrize("source", ["/nonexistent/tiny-llama", "./missing-model", "../missing-model",
                                    "~/missing-cadenza-model", "models/org/name", "/nowhere/model.Q4_1.gguf"])
def test_missing_local_base_model_is_a_missing_path(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    what = "GGUF file" if source.endswith(".gguf") else "local folder"
    with pytest.raises(ModelFolderError) as err:
        Model(llm_config(source), log=quiet).train(LLM_ROWS, output_directory=tmp_path / "out")
    assert str(err.value) == f"base_model: {what} {source!r} does not exist"


def test_a_path_whose_first_folder_exists_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_local_path("models/tiny")  # no models/ here: a Hub id
    (tmp_path / "models").mkdir()
    assert looks_like_local_path("models/tiny")
    with pytest.raises(ModelFolderError, match="base_model: local folder 'models/tiny' does not exist"):
        resolve_source("models/tiny")


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_a_hub_id_stays_a_hub_id(hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_local_source(hub_id, "base_model")  # nothing raised: transformers gets it as a Hub id
    assert resolve_source(hub_id) == (hub_id, None)


def test_missing_adapter_weights_folder(tiny_llama_dir, tmp_path):
    config = llm_config(str(tiny_llama_dir), adapter={"type": "lora", "r": 2,
                                                       "pretrained_adapter_weights": str(tmp_path / "no-adapter")})
    with pytest.raises(ModelFolderError) as err:
        Model(config, log=quiet).train(LLM_ROWS, output_directory=tmp_path / "out")
    assert str(err.value) == f"adapter.pretrained_adapter_weights: local folder {str(tmp_path / 'no-adapter')!r} " \
                             "does not exist"


def test_pretrained_adapter_with_pickled_weights_is_refused(trained, tiny_llama_dir, tmp_path):
    adapter = Path(shutil.copytree(trained["adapter"] / "model_weights", tmp_path / "adapter"))
    pickle_instead(adapter / "adapter_model.safetensors", "adapter_model.bin")
    config = llm_config(str(tiny_llama_dir), adapter={"type": "lora", "r": 2, "pretrained_adapter_weights": str(adapter)})
    with pytest.raises(ModelFolderError, match="adapter_model.bin: Cadenza loads only safetensors"):
        Model(config, log=quiet).train(LLM_ROWS, output_directory=tmp_path / "out")


def test_missing_encoder_folder_names_the_feature_key(tmp_path):
    with pytest.raises(ModelFolderError) as err:
        Model(ecd_config("/nonexistent/encoder"), log=quiet).train(ECD_ROWS, output_directory=tmp_path / "out")
    assert str(err.value) == ("input_features[0].encoder.pretrained_model_name_or_path: local folder "
                              "'/nonexistent/encoder' does not exist")


def test_saved_ecd_model_whose_frozen_encoder_is_gone(copy_of):
    model = copy_of("ecd")
    config = json.loads((model / "model_hyperparameters.json").read_text())
    config["input_features"][0]["encoder"]["pretrained_model_name_or_path"] = "/moved/away/encoder"
    (model / "model_hyperparameters.json").write_text(json.dumps(config))
    message = load_error(model)
    assert message.startswith("input_features[0].encoder.pretrained_model_name_or_path: local folder "
                              "'/moved/away/encoder' does not exist; the model folder holds no copy of the "
                              "pretrained encoder")


def test_saved_adapter_whose_base_model_is_gone(copy_of):
    model = copy_of("adapter")
    edit_json(model / "model_hyperparameters.json", base_model="/moved/away/base")
    message = load_error(model)
    assert message.startswith("base_model: local folder '/moved/away/base' does not exist; the model folder holds "
                              "no copy of the base model")


# ===================================================================================== safetensors header check
def _safetensors(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


@pytest.mark.parametrize("content, expected", [
    (b"", "not a readable safetensors file (shorter than a safetensors header)"),
    (struct.pack("<Q", 10**9) + b"{}", "its header is longer than the file"),
    (_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "truncated or damaged"),
    (_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b""), "data_offsets"),
    (_safetensors({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "not a readable safetensors file"),
])
def test_safetensors_check_reads_only_the_header(content, expected, tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFolderError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        check_safetensors(path)


def test_whole_safetensors_file_passes(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(3), "b": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    check_safetensors(tmp_path / "w.safetensors")


def test_unreachable_hub_base_model_is_a_user_error(tmp_path):
    """Offline (as the tests run), a Hub id that is not cached cannot be had: a HubError naming the key."""
    model = Model(llm_config("no-such-org/no-such-model"), log=quiet)
    with pytest.raises(HubError) as err:
        model.train(LLM_ROWS, output_directory=tmp_path / "out")
    assert str(err.value).startswith("base_model: 'no-such-org/no-such-model' is not a local folder and could not be "
                                     "loaded from the Hub (")
    assert "hf download no-such-org/no-such-model" in str(err.value)


def test_unreachable_hub_encoder_names_the_feature_key(tmp_path):
    with pytest.raises(HubError, match=r"^input_features\[0\]\.encoder\.pretrained_model_name_or_path: "
                                       r"'no-such-org/encoder' is not a local folder"):
        Model(ecd_config("no-such-org/encoder"), log=quiet).train(ECD_ROWS, output_directory=tmp_path / "out")


def test_statistics_files_are_strict_json(tmp_path):
    """A metric that cannot be computed on a split (NaN) is written as null, so jq and JavaScript can read it."""
    import numpy as np

    from cadenza.artifacts import write_json

    write_json(tmp_path / "s.json", {"roc_auc": float("nan"), "f1": [np.float32("inf"), 0.5], "n": np.int64(3)})
    assert json.loads((tmp_path / "s.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == \
        {"roc_auc": None, "f1": [None, 0.5], "n": 3}
