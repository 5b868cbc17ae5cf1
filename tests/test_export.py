"""Exports in their own runtimes: GGUF through transformers' GGUF loader (logits of the merged model, the
tokenizer, the metadata llama.cpp reads) and the Ollama Modelfile; ONNX through onnxruntime against Cadenza's
predictions, fed from the export's own description; safetensors folders through plain transformers/peft; MLflow
through mlflow.pyfunc.load_model; and the two CLI commands."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cadenza import Model
from cadenza.cli import main
from cadenza.errors import CadenzaError
from cadenza.export.formats import export_model

QUESTIONS = pd.DataFrame([{"question": f"what comes after {i}", "answer": str(i + 1)} for i in range(12)])
WORDS = ["good", "great", "bad", "awful", "plot", "music", "actor"]


def quiet(_):
    pass


def reviews(n: int = 48, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    text = [" ".join(rng.choice(WORDS, rng.integers(2, 9))) for _ in range(n)]
    score = np.array([t.count("good") + t.count("great") - t.count("bad") - t.count("awful") for t in text])
    return pd.DataFrame({"review": text, "x": rng.normal(size=n), "genre": rng.choice(["drama", "comedy"], n),
                         "flag": rng.choice(["yes", "no"], n), "sentiment": np.where(score > 0, "pos", "neg"),
                         "liked": score > 0, "rating": 3 * score + rng.normal(size=n),
                         "tags": [" ".join(sorted({w for w in t.split() if w in ("plot", "music")})) for t in text]})


def llm_config(base, **extra) -> dict:
    return {"model_type": "llm", "base_model": str(base), "input_features": [{"name": "question", "type": "text"}],
            "output_features": [{"name": "answer", "type": "text"}], "generation": {"max_new_tokens": 3},
            "trainer": {"type": "finetune", "epochs": 1, "batch_size": 4, "learning_rate": 0.05}, **extra}


def ecd_config(bert, trainable: bool) -> dict:
    return {"model_type": "ecd",
            "input_features": [{"name": "review", "type": "text", "preprocessing": {"max_sequence_length": 12},
                                "encoder": {"type": "auto_transformer", "pretrained_model_name_or_path": str(bert),
                                            "trainable": trainable}},
                               {"name": "x", "type": "number"}, {"name": "genre", "type": "category"},
                               {"name": "flag", "type": "binary"}],
            "output_features": [{"name": "sentiment", "type": "category"}, {"name": "liked", "type": "binary"},
                                {"name": "rating", "type": "number"}, {"name": "tags", "type": "set"}],
            # fp32 everywhere: Cadenza's cached embeddings then match the float32 graph to 1e-4 on any CPU
            "trainer": {"epochs": 2, "batch_size": 16, "learning_rate": 0.01, "use_mixed_precision": False}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir, tiny_bert_dir):
    """Four tiny models trained once: an llm LoRA adapter (bf16 weights, so the export reads them again in
    float32; chat template), an llm adapter merged at the end of training (fp32; plain prompt template), an ecd on
    cached embeddings and an ecd training its encoder."""
    root = tmp_path_factory.mktemp("export-models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CADENZA_CACHE_DIR", str(root / "cache"))
        configs = {
            "lora": (llm_config(tiny_llama_dir, adapter={"type": "lora", "r": 4},
                                trainer={"type": "finetune", "epochs": 1, "batch_size": 4, "learning_rate": 0.05,
                                         "use_mixed_precision": True}), QUESTIONS),
            "merged": (llm_config(tiny_llama_dir, prompt={"template": "Q: {question}\nA:", "use_chat_template": False},
                                  adapter={"type": "lora", "r": 4,
                                           "postprocessor": {"merge_adapter_into_base_model": True}},
                                  trainer={"type": "finetune", "epochs": 1, "batch_size": 4, "learning_rate": 0.05,
                                           "use_mixed_precision": False}), QUESTIONS),
            "ecd": (ecd_config(tiny_bert_dir, trainable=False), reviews()),
            "ecd_trained_encoder": (ecd_config(tiny_bert_dir, trainable=True), reviews()),
        }
        runs = {name: Model(config, log=quiet).train(rows, output_directory=root / name).run_dir
                for name, (config, rows) in configs.items()}
        yield runs


@torch.no_grad()
def logits(model, tokenizer, text: str) -> torch.Tensor:
    return model(**tokenizer(text, return_tensors="pt")).logits.float()


def merged_reference(run, base):
    """The adapter merged into the base with plain transformers + peft: what the GGUF file must equal."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(base_model, run / "model" / "model_weights").merge_and_unload().eval()


# ----------------------------------------------------------------------------------------------------- GGUF
def test_gguf_f32_loads_in_transformers_with_the_merged_models_logits_tokenizer_and_chat_template(
        trained, tiny_llama_dir, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "gguf"
    assert main(["export_model", "-m", str(trained["lora"]), "-o", str(out), "-f", "gguf", "--dtype", "f32",
                 "--skip_verify"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "cadenza_export.json", "model.gguf"]

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "what comes after 7"}], tokenize=False,
                                         add_generation_prompt=True)
    loaded_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    texts = [chat, "Plain text, 12345 digits and <|im_end|> a special token."]
    assert loaded_tokenizer(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert loaded_tokenizer.chat_template == tokenizer.chat_template

    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    reference = merged_reference(trained["lora"], tiny_llama_dir)
    want, got = logits(reference, tokenizer, chat), logits(loaded, tokenizer, chat)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    assert (logits(base, tokenizer, chat) - want).abs().max() > 1e-3  # the adapter changed the model: it is merged
    assert (got - want).abs().max() < 1e-4

    reader = gguf.GGUFReader(out / "model.gguf")
    meta = {key: field.contents() for key, field in reader.fields.items()
            if key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt2")
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id == 2
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["llama.attention.head_count_kv"] == 2 and meta["llama.block_count"] == 2
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied embeddings, as the model has

    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in modelfile
    assert "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n" in modelfile and "<|im_start|>assistant\n" in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile  # the template's default system
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "PARAMETER num_predict 3" in modelfile
    assert "check" not in json.loads((out / "cadenza_export.json").read_text())  # --skip_verify


def test_gguf_q8_0_is_quantized_checked_in_transformers_and_keeps_the_plain_prompt_template(trained, tmp_path):
    import gguf

    out = export_model(trained["merged"], tmp_path / "q8", "gguf", dtype="q8_0", log=quiet)
    check = json.loads((out / "cadenza_export.json").read_text())["check"]
    # quantization moves the logits, within the q8_0 tolerance the export checked
    assert 0 < check["max_abs_logit_diff"] <= check["tolerance"] <= 0.1 * max(1.0, check["max_abs_logit"])
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    modelfile = (out / "Modelfile").read_text()
    assert 'TEMPLATE """Q: {{ .Prompt }}\nA:"""' in modelfile and "SYSTEM" not in modelfile


def test_gguf_refuses_what_llama_cpp_would_read_wrongly(tiny_llama_dir):
    from transformers import LlamaConfig, Qwen2Config

    from cadenza.export.gguf_vocab import pre_tokenizer_name
    from cadenza.export.to_gguf import _architecture

    with pytest.raises(CadenzaError, match="'qwen2'"):
        _architecture(Qwen2Config(num_hidden_layers=1))
    scaled = LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(CadenzaError, match="RoPE scaling 'linear'"):
        _architecture(scaled)
    with pytest.raises(CadenzaError, match="no pre-tokenizer"):
        pre_tokenizer_name({"type": "Metaspace", "replacement": "▁"})
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}) == "smollm"


# ----------------------------------------------------------------------------------------------------- ONNX
def onnx_feeds(out, rows: pd.DataFrame) -> dict:
    """The graph's inputs built from the export's own description, as a client in another language would."""
    from transformers import AutoTokenizer

    feeds = {}
    for spec in json.loads((out / "cadenza_export.json").read_text())["inputs"]:
        values = rows[spec["column"]]
        if spec["type"] == "text":
            tokenizer = AutoTokenizer.from_pretrained(out / spec["tokenizer"])
            batch = tokenizer(values.tolist(), truncation=True, max_length=spec["max_length"], padding=True,
                              return_tensors="np")
            feeds.update(zip(spec["onnx_inputs"], (batch["input_ids"], batch["attention_mask"])))
        elif spec["type"] == "category":
            index = {label: i for i, label in enumerate(spec["vocab"])}
            feeds[spec["feature"]] = np.array([index.get(v, 0) for v in values], dtype=np.int64)
        elif spec["type"] == "binary":
            text = values.astype(str).str.strip()
            text = text.str.lower() if spec["case_insensitive"] else text
            feeds[spec["feature"]] = text.isin(spec["true_values"]).to_numpy(np.float32)
        else:
            feeds[spec["feature"]] = values.to_numpy(np.float32)
    return feeds


def test_onnx_runs_in_onnxruntime_with_cadenzas_probabilities_on_real_text(trained, tmp_path):
    import onnxruntime

    out = export_model(trained["ecd"], tmp_path / "onnx", "onnx", log=quiet)
    info = json.loads((out / "cadenza_export.json").read_text())
    assert max(info["check"]["max_abs_diff"].values()) < 1e-4
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["review_input_ids", "review_attention_mask", "x", "genre",
                                                      "flag"]
    assert all(isinstance(d, str) for d in session.get_inputs()[0].shape)  # dynamic batch and sequence axes

    rows = reviews(n=20, seed=7)  # texts of 2 to 8 words: padded batches; unseen category values
    rows.loc[3, "genre"] = "western"
    rows.loc[5, "review"] = "an entirely new sentence with words the model has never seen in training"
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, onnx_feeds(out, rows))))
    predictions = Model.load(trained["ecd"], log=quiet).predict(rows)
    vocab = {o["feature"]: o.get("labels") for o in info["outputs"]}
    sentiment = predictions[[f"sentiment_probabilities_{v}" for v in vocab["sentiment"]]].to_numpy()
    tags = predictions[[f"tags_probabilities_{v}" for v in vocab["tags"]]].to_numpy()
    np.testing.assert_allclose(got["sentiment_probabilities"], sentiment, atol=1e-4)
    np.testing.assert_allclose(got["liked_probability"], predictions["liked_probabilities_true"], atol=1e-4)
    np.testing.assert_allclose(got["rating_predictions"], predictions["rating_predictions"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(got["tags_probabilities"], tags, atol=1e-4)


# ---------------------------------------------------------------------------------------------- safetensors
def test_safetensors_llm_folders_load_with_plain_transformers_and_peft(trained, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    adapter = export_model(trained["lora"], tmp_path / "adapter", "safetensors", log=quiet)
    info = json.loads((adapter / "cadenza_export.json").read_text())
    assert (info["weights"], info["base_model"]) == ("adapter", str(tiny_llama_dir))
    assert not list(adapter.glob("*.bin")) and (adapter / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(info["base_model"], dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    np.testing.assert_allclose(logits(with_adapter, tokenizer, "what comes after 3"),
                               logits(merged_reference(trained["lora"], tiny_llama_dir), tokenizer,
                                      "what comes after 3"), atol=1e-4)

    merged = export_model(trained["merged"], tmp_path / "merged", "safetensors", log=quiet)
    assert json.loads((merged / "cadenza_export.json").read_text())["weights"] == "merged"
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    cadenza = Model.load(trained["merged"], log=quiet).model.model.float()
    np.testing.assert_allclose(logits(plain, AutoTokenizer.from_pretrained(merged), "what comes after 3"),
                               logits(cadenza, tokenizer, "what comes after 3"), atol=1e-5)


def test_safetensors_ecd_folder_predicts_as_the_model_and_holds_the_trained_encoder(trained, tmp_path):
    from transformers import AutoModel

    out = export_model(trained["ecd_trained_encoder"], tmp_path / "ecd", "safetensors", log=quiet)
    rows = reviews(n=10, seed=3)
    original = Model.load(trained["ecd_trained_encoder"], log=quiet)
    pd.testing.assert_frame_equal(Model.load(out, log=quiet).predict(rows), original.predict(rows))
    encoder = AutoModel.from_pretrained(out / "encoders" / "review").eval()
    ids = torch.tensor([[101, 2204, 5436, 102]])
    with torch.no_grad():
        mine = original.model.net.inputs["review"].backbone(input_ids=ids).last_hidden_state
        theirs = encoder(input_ids=ids).last_hidden_state
    torch.testing.assert_close(theirs, mine)


# --------------------------------------------------------------------------------------------------- MLflow
@pytest.mark.parametrize("name,rows", [("ecd", reviews(n=12, seed=5)), ("merged", QUESTIONS.head(4))])
def test_mlflow_pyfunc_predicts_what_cadenza_predicts(trained, tmp_path, name, rows):
    import mlflow.pyfunc

    out = tmp_path / "mlflow"
    assert main(["export_mlflow", "-m", str(trained[name]), "-o", str(out)]) == 0
    assert not list(out.rglob("*.pkl"))  # a model from code: nothing pickled
    loaded = mlflow.pyfunc.load_model(str(out))
    pd.testing.assert_frame_equal(loaded.predict(rows), Model.load(trained[name], log=quiet).predict(rows))


# ------------------------------------------------------------------------------------------ CLI and folders
def test_cli_refuses_an_unknown_format_or_one_for_the_other_model_type(trained, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export_model", "-m", str(trained["ecd"]), "-o", str(out), "-f", "tflite"]) == 2
    assert "unknown export format 'tflite': choose one of gguf, onnx, safetensors" in capsys.readouterr().err
    assert main(["export_model", "-m", str(trained["ecd"]), "-o", str(out), "-f", "gguf"]) == 2
    assert "format 'gguf' is for llm models" in capsys.readouterr().err
    assert main(["export_model", "-m", str(trained["ecd"]), "-o", str(out), "-f", "onnx", "--dtype", "q8_0"]) == 2
    assert "--dtype is for -f gguf" in capsys.readouterr().err
    assert not out.exists()


def test_an_export_replaces_an_earlier_export_never_a_users_folder_and_a_failure_leaves_nothing(
        trained, tmp_path, monkeypatch):
    from cadenza.export import to_safetensors

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(CadenzaError, match="other files in it"):
        export_model(trained["ecd"], mine, "safetensors", log=quiet)
    assert (mine / "notes.txt").read_text() == "keep me"

    out = export_model(trained["ecd"], tmp_path / "out", "safetensors", log=quiet)
    export_model(trained["ecd"], out, "safetensors", log=quiet)  # an earlier export: replaced
    assert (out / "model_weights.safetensors").is_file()

    def half_then_fail(model, folder):
        (folder / "model_weights.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(to_safetensors, "write_ecd_folder", half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(trained["ecd"], tmp_path / "new", "safetensors", log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]  # no output, no temporary folder
