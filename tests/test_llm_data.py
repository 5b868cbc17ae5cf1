"""llm preprocessing without a model forward: prompts, targets, EOS, truncation, caches, config errors, labels."""

import numpy as np
import pytest

from cadenza.config.load import load_config
from cadenza.errors import ConfigError
from cadenza.llm import batching
from cadenza.llm.outputs import extract_label, rouge_l, text_scores
from cadenza.llm.prompt import PromptBuilder
from cadenza.llm.tokenize import tokenize_rows, truncate


def llm_config(base, **extra):
    cfg = {"model_type": "llm", "base_model": str(base),
           "input_features": [{"name": "question", "type": "text"}],
           "output_features": [{"name": "answer", "type": "text"}]}
    cfg.update(extra)
    return load_config(cfg)


@pytest.fixture(scope="module")
def tokenizer(llama_tokenizer_dir):
    from cadenza.llm.load import load_tokenizer

    return load_tokenizer(str(llama_tokenizer_dir))


def test_targets_masked_on_prompt_and_end_with_eos(tokenizer, llama_tokenizer_dir, tmp_path):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2: pad == EOS, the case we must handle
    cfg = llm_config(llama_tokenizer_dir, prompt={"template": "Q: {question}\nA:"})
    b = PromptBuilder(cfg, tokenizer)
    assert b.use_chat  # the tokenizer has a chat template and use_chat_template is unset
    prompt = b.prompt({"question": "What is 2+2?"})
    assert prompt.startswith("<|im_start|>") and "Q: What is 2+2?\nA:" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    rows = tokenize_rows(tokenizer, [prompt], [b.target(prompt, "four")], max_len=None,
                         add_special_tokens=b.add_special_tokens, cache_dir=tmp_path)
    ids, plen = rows.ids[0], int(rows.prompt_lens[0])
    assert tokenizer.decode(ids[:plen]) == prompt
    assert ids[-1] == tokenizer.eos_token_id
    batch = batching.make_batch(rows, [0], packed=True)
    # targets: exactly the response tokens plus EOS, each predicted from the position before it
    assert tokenizer.decode(batch["target_ids"][:-1]) == "four"
    assert batch["target_ids"][-1] == tokenizer.eos_token_id
    assert batch["target_index"].tolist() == list(range(plen - 1, len(ids) - 1))
    everything = batching.make_batch(rows, [0], packed=True, train_on_inputs=True)
    assert everything["target_ids"].tolist() == ids[1:].tolist()


def test_plain_prompt_without_chat_template(tokenizer, llama_tokenizer_dir):
    cfg = llm_config(llama_tokenizer_dir, prompt={"template": "### Q: {question}\n### A:", "use_chat_template": False})
    b = PromptBuilder(cfg, tokenizer)
    prompt = b.prompt({"question": "hi"})
    assert prompt == "### Q: hi\n### A:" and b.target(prompt, "hello") == " hello"


def test_default_task_template_and_several_inputs(tokenizer, llama_tokenizer_dir):
    cfg = load_config({"model_type": "llm", "base_model": "x",
                       "input_features": [{"name": "title", "type": "text"}, {"name": "body", "type": "text"}],
                       "output_features": [{"name": "label", "type": "category"}],
                       "prompt": {"task": "Is the review positive?", "use_chat_template": False}})
    text = PromptBuilder(cfg, tokenizer).prompt({"title": "Great", "body": "Loved it", "label": "pos"})
    assert "Is the review positive?" in text and '"title": "Great"' in text and '"body": "Loved it"' in text
    assert "pos" not in text.replace("positive", "")  # the answer never leaks into the prompt


def test_truncation_keeps_prompt_end_and_counts_rows(tokenizer, tmp_path):
    p, t, cut = truncate(list(range(10)), [100, 101, 102], max_len=8)
    assert cut and p == list(range(5, 10)) and t == [100, 101, 102]
    p, t, cut = truncate(list(range(10)), list(range(100, 120)), max_len=8)
    assert p == list(range(6, 10)) and t == [100, 101, 102, 103]
    rows = tokenize_rows(tokenizer, ["short", "a much longer prompt " * 20], ["x", "y"], max_len=16,
                         add_special_tokens=False, cache_dir=None)
    assert rows.truncated == 1 and max(rows.lengths) == 16


def test_tokenized_cache_hit_and_key(tokenizer, tmp_path):
    args = dict(max_len=None, add_special_tokens=False, cache_dir=tmp_path)
    first = tokenize_rows(tokenizer, ["hello there", "bye"], ["a", "b"], **args)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    again = tokenize_rows(tokenizer, ["hello there", "bye"], ["a", "b"], **args)
    assert [x.tolist() for x in again.ids] == [x.tolist() for x in first.ids]
    assert again.prompt_lens.tolist() == first.prompt_lens.tolist()
    tokenize_rows(tokenizer, ["hello there", "bye"], ["a", "c"], **args)  # other data: other key
    tokenize_rows(tokenizer, ["hello there", "bye"], ["a", "b"], max_len=3, add_special_tokens=False,
                  cache_dir=tmp_path)  # other truncation: other key
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    files[0].write_bytes(b"garbage")  # a damaged entry is rebuilt, not trusted
    rebuilt = tokenize_rows(tokenizer, ["hello there", "bye"], ["a", "b"], **args)
    assert [x.tolist() for x in rebuilt.ids] == [x.tolist() for x in first.ids]


def test_packing_groups_respect_token_budget(tokenizer):
    from cadenza.llm.tokenize import TokenizedRows

    rows = TokenizedRows([np.arange(n) for n in (5, 9, 3, 12, 4)], np.array([2, 2, 1, 3, 2]))
    groups = batching.pack_indices([0, 1, 2, 3, 4], rows.lengths, rows_per_batch=2, max_tokens=14)
    assert groups == [[0, 1], [2], [3], [4]]  # 5+9 fits 14; 3+12 and 12+4 do not
    assert batching.pack_indices([0, 1, 2, 3, 4], rows.lengths, rows_per_batch=2, max_tokens=None) == [[0, 1], [2, 3], [4]]
    e1 = batching.epoch_groups(rows, 1, 7, packed=False, rows_per_batch=2, max_tokens=None)
    assert e1 == batching.epoch_groups(rows, 1, 7, packed=False, rows_per_batch=2, max_tokens=None)  # resumable
    # a row's last token predicts nothing and nothing attends to it: the model runs the others (9 + 3 - 2 tokens)
    padded = batching.make_batch(rows, [1, 2], packed=False, pad_id=0)
    assert padded["input_ids"].shape == (2, 8) and padded["attention_mask"].sum() == 10
    packed = batching.make_batch(rows, [1, 2], packed=True)
    assert packed["input_ids"].shape == (1, 10) and packed["position_ids"][0].tolist() == list(range(8)) + [0, 1]
    assert packed["target_ids"].tolist() == padded["target_ids"].tolist() == list(range(2, 9)) + [1, 2]
    assert packed["num_tokens"] == 12 and packed["computed_tokens"] == 10
    assert packed["target_index"].tolist() == list(range(1, 8)) + [8, 9]  # the predictors: each target's position - 1


@pytest.mark.parametrize("template, message", [
    ("Q: {questoin}", "did you mean {question}"),
    ("Q: {question} A: {answer}", "leak the answer"),
])
def test_template_errors(template, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")) as err:
        llm_config("anything", prompt={"template": template})
    assert err.value.problems[0][0] == "prompt.template"


def test_category_extraction_rules_and_fallback():
    labels = ["positive", "negative", "neutral"]
    assert extract_label("I think it is Negative overall.", labels) == "negative"
    assert extract_label("positive? no: negative", labels) == "positive"  # the earliest mention wins
    assert extract_label("no idea", labels, fallback="neutral") == "neutral"
    assert extract_label("no idea", labels) is None
    rules = {"positive": {"type": "regex", "value": r"\b(good|great|pos)"}, "negative": {"type": "contains", "value": "bad"}}
    assert extract_label("This was GREAT", labels, rules) == "positive"
    assert extract_label("pretty bad", labels, rules, fallback="neutral") == "negative"
    assert extract_label("meh", labels, rules, fallback="neutral") == "neutral"


def test_rouge_l_and_exact_match():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS "the cat the mat" = 4 of 6 and 4 of 5 tokens
    assert rouge_l("the cat sat on the mat", "the cat lay the mat") == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    assert rouge_l("", "something") == 0.0
    scores = text_scores(["Hello  World", "x"], ["hello world", "y"])
    assert scores["exact_match"] == 0.5 and scores["rouge_l"] == 0.5


def test_retrieval_random_and_semantic(tokenizer):
    from cadenza.llm.retrieval import Retriever

    examples = [{"q": t, "a": str(i)} for i, t in enumerate(
        ["how do I bake bread", "what is the capital of France", "how to cook pasta", "who won the world cup"])]
    texts = [e["q"] for e in examples]
    rnd = Retriever("random", 2, examples, texts, seed=0)
    picks = rnd.select(texts, self_index=[0, 1, 2, 3])
    assert all(len(p) == 2 and examples[i] not in p for i, p in enumerate(picks))
    sem = Retriever("semantic", 1, examples, texts)
    assert sem.select(["which city is France's capital"])[0][0]["a"] == "1"
    assert sem.select(["recipe for baking a loaf"])[0][0]["a"] == "0"
    assert sem.select([texts[2]], self_index=[2])[0][0]["a"] != "2"


def test_few_shot_context_goes_into_prompt(tokenizer, llama_tokenizer_dir):
    cfg = llm_config(llama_tokenizer_dir, prompt={"template": "{__context__}Q: {question}\nA:", "use_chat_template": False})
    b = PromptBuilder(cfg, tokenizer)
    ctx = b.context([{"question": "2+2?", "answer": "4"}])
    assert b.prompt({"question": "3+3?"}, ctx) == "Examples:\n\nQ: 2+2?\nA: 4\n\nQ: 3+3?\nA:"
    no_slot = PromptBuilder(llm_config(llama_tokenizer_dir, prompt={"template": "Q: {question}\nA:",
                                                                    "use_chat_template": False}), tokenizer)
    assert no_slot.prompt({"question": "3+3?"}, ctx).startswith("Examples:\n\nQ: 2+2?\nA: 4\n\n")


def test_merge_into_quantized_base_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        llm_config("anything", quantization={"bits": 4},
                   adapter={"type": "lora", "postprocessor": {"merge_adapter_into_base_model": True}})
    assert "adapter.postprocessor.merge_adapter_into_base_model" in [p for p, _ in err.value.problems]


def test_fsdp_with_quantization_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        llm_config("anything", quantization={"bits": 4}, adapter={"type": "lora"}, backend={"type": "fsdp"})
    assert any(p == "backend.type" and "fsdp does not shard 4/8-bit" in m for p, m in err.value.problems)


def test_zero_3_with_quantization_is_a_config_error():
    def problems(stage: int) -> list:
        with pytest.raises(ConfigError) as err:  # (always an error here: quantization needs CUDA)
            llm_config("anything", quantization={"bits": 4}, adapter={"type": "lora"},
                       backend={"type": "deepspeed", "deepspeed": {"zero_stage": stage}})
        return [p for p, m in err.value.problems if "cannot be partitioned" in m]

    assert problems(3) == ["backend.deepspeed.zero_stage"]
    assert problems(2) == []  # stages 0-2 leave the quantized base whole
