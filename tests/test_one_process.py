"""One process, many models: what a notebook user does. Runs in the Hub client process of hub_fixtures (a fresh
Python process, online to the loopback Hub), so nothing the test session did before can hide or cause a leak:
an llm LoRA run in bf16, an ecd run on cached embeddings, an ecd run training its encoder in fp32, an llm full
fine-tune in fp32, then the first model predicts again, is reloaded and is uploaded."""

from __future__ import annotations

import pytest

from hub_fixtures import ALICE_TOKEN, ORG, client, hub  # noqa: F401  (fixtures)

LLM_ROWS = [{"question": f"what comes after {i}", "answer": str(i + 1)} for i in range(12)]
ECD_ROWS = [{"review": f"{'great fun' if i % 2 else 'dull and slow'} film number {i}",
             "sentiment": "good" if i % 2 else "bad"} for i in range(32)]


def _llm(base: str, adapter: bool, mixed: bool) -> dict:
    return {"model_type": "llm", "base_model": base,
            "input_features": [{"name": "question", "type": "text"}],
            "output_features": [{"name": "answer", "type": "text"}],
            "prompt": {"template": "Q: {question}\nA:"}, "generation": {"max_new_tokens": 3},
            **({"adapter": {"type": "lora", "r": 4}} if adapter else {}),
            "trainer": {"type": "finetune", "epochs": 1, "batch_size": 4, "learning_rate": 0.05,
                        "use_mixed_precision": mixed}}


def _ecd(encoder: str, trainable: bool, mixed) -> dict:
    return {"model_type": "ecd",
            "input_features": [{"name": "review", "type": "text",
                                "encoder": {"type": "auto_transformer", "pretrained_model_name_or_path": encoder,
                                            "trainable": trainable}}],
            "output_features": [{"name": "sentiment", "type": "category"}],
            "trainer": {"epochs": 2, "batch_size": 8, "use_mixed_precision": mixed}}


def remote_many_models(workdir: str, llama: str, bert: str, repo_id: str, token: str) -> dict:
    """Called in the client process (see hub_fixtures); the token comes from the test session, which made it."""
    import pandas as pd

    from cadenza import Model

    quiet = lambda _: None  # noqa: E731
    llm_rows, ecd_rows = pd.DataFrame(LLM_ROWS), pd.DataFrame(ECD_ROWS)
    runs = [("llm lora", _llm(llama, adapter=True, mixed=True), llm_rows),
            ("ecd cached", _ecd(bert, trainable=False, mixed=None), ecd_rows),
            ("ecd trainable", _ecd(bert, trainable=True, mixed=False), ecd_rows),
            ("llm full", _llm(llama, adapter=False, mixed=False), llm_rows)]
    models, out = [], {"precision": {}, "predictions": {}}
    for name, config, rows in runs:
        model = Model(config, log=quiet)
        trained = model.train(rows, output_directory=f"{workdir}/{name.replace(' ', '_')}")
        out["precision"][name] = trained.statistics["precision"]
        models.append((model, trained.run_dir))
    first, first_run = models[0]
    probe = llm_rows.head(4)
    out["predictions"]["first, after the others"] = first.predict(probe)["answer_predictions"].tolist()
    out["predictions"]["first, reloaded"] = Model.load(first_run, log=quiet).predict(probe)["answer_predictions"].tolist()
    for label, ecd in (("ecd cached, after the others", models[1][0]),
                       ("ecd cached, reloaded", Model.load(models[1][1], log=quiet))):
        out["predictions"][label] = ecd.predict(ecd_rows.head(4))["sentiment_probability"].tolist()
    out["upload"] = Model.upload_to_hf_hub(repo_id, first_run, token=token, log=quiet)
    from cadenza.share.hub import plan_upload

    out["card"] = plan_upload(repo_id, first_run).card
    return out


@pytest.mark.integration
def test_four_trainings_in_one_process_then_the_first_model_again(client, hub, tiny_llama_dir, tiny_bert_dir,
                                                                  tmp_path):
    out = client.call("test_one_process:remote_many_models", str(tmp_path), str(tiny_llama_dir),
                      str(tiny_bert_dir), f"{ORG}/first-of-four", ALICE_TOKEN)
    chosen = {name: p["precision"] for name, p in out["precision"].items()}
    assert chosen["llm lora"] == "bf16" and chosen["ecd trainable"] == "fp32" and chosen["llm full"] == "fp32"
    assert out["precision"]["ecd cached"]["part"] == "head" and chosen["ecd cached"] == "fp32"
    p = out["predictions"]
    assert p["first, after the others"] == p["first, reloaded"] and len(p["first, reloaded"]) == 4
    assert p["ecd cached, after the others"] == pytest.approx(p["ecd cached, reloaded"], abs=1e-6)
    assert "adapter_model.safetensors" in hub.files(f"{ORG}/first-of-four")
    assert "Precision: bf16 (trainer.use_mixed_precision: true" in out["card"]  # the model card says how it trained
