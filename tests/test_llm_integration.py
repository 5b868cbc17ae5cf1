"""LoRA-tune the packaged SmolLM2-135M-Instruct (GGUF, converted once and cached) on a few chatterbot pairs."""

import pytest

from cadenza.data import assets
from cadenza.config.load import load_config
from cadenza.llm import LlmModel


@pytest.mark.integration
def test_smollm2_lora_few_steps(tmp_path):
    pairs = assets.chatterbot_pairs()
    train = pairs[pairs.category == "greetings"].head(12).reset_index(drop=True)
    cfg = load_config({"model_type": "llm", "base_model": "smollm2",
                       "input_features": [{"name": "question", "type": "text"}],
                       "output_features": [{"name": "answer", "type": "text"}],
                       "adapter": {"type": "lora", "r": 8},
                       "trainer": {"type": "finetune", "epochs": 2, "batch_size": 4, "learning_rate": 1e-3},
                       "generation": {"max_new_tokens": 24}})
    m = LlmModel(cfg)
    lines = []
    result = m.fit({"training": train, "validation": train.head(4)}, run_dir=tmp_path / "run", resume=False,
                   seed=0, log=lines.append)
    losses = [s["loss"] for s in result.statistics["training"]]
    assert losses[1] < losses[0]  # it learns
    assert result.throughput["tokens_per_second"] > 0 and 0 < result.throughput["mfu"] < 1
    before_answer = train.answer[0]
    out = m.generate(["What is the capital of France?"])[0]
    assert "paris" in out.lower()  # the base model's knowledge survives a short LoRA run
    # generations stop at EOS well before the token limit on a short greeting
    tokens = len(m.tokenizer(m.predict(train.head(2))["answer_predictions"][0])["input_ids"])
    assert 0 < tokens < 24, before_answer
