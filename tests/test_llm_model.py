"""llm training/inference on the tiny random Llama (2 layers, SmolLM2's real tokenizer)."""

import contextlib
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cadenza.config.load import load_config
from cadenza.llm import LlmModel, attention, batching
from cadenza.llm.load import load_causal_lm, load_tokenizer
from cadenza.llm.loss import TargetLoss
from cadenza.llm.tokenize import tokenize_rows
from conftest import signal_in_step, tolerance

pytestmark = pytest.mark.usefixtures("simulated_hardware")  # every test runs as fp32 and as bf16 hardware


def make_config(base, **extra):
    cfg = {"model_type": "llm", "base_model": str(base),
           "input_features": [{"name": "question", "type": "text"}],
           "output_features": [{"name": "answer", "type": "text"}],
           "generation": {"max_new_tokens": 12}}
    for k, v in extra.items():
        cfg[k] = v
    return load_config(cfg)


def qa_frame(n=12):
    words = ["red", "green", "blue", "yellow"]
    fruit = ["apple", "banana", "cherry", "grape", "lemon", "mango"]
    return pd.DataFrame({"question": [f"what colour is the {fruit[i % 6]}?" + " really" * (i // 6) for i in range(n)],
                         "answer": [" ".join(words[: 1 + i % 4]) for i in range(n)]})


@pytest.fixture(scope="module")
def rows_and_model(tiny_llama_dir):
    tok = load_tokenizer(str(tiny_llama_dir))
    df = qa_frame(6)
    prompts = [f"Q: {q}\nA:" for q in df.question]
    rows = tokenize_rows(tok, prompts, [" " + a for a in df.answer], max_len=None, add_special_tokens=True)
    return rows, tok


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(tiny_llama_dir, rows_and_model, attn):
    rows, tok = rows_and_model
    model = load_causal_lm(str(tiny_llama_dir), dtype=torch.float32, attn_implementation=attn).eval()
    module = TargetLoss(model)
    idx = list(range(len(rows)))
    assert len(set(rows.lengths.tolist())) > 1  # rows of different lengths, so padding/packing matter
    with torch.no_grad():
        packed = module(batching.make_batch(rows, idx, packed=True))
        padded = module(batching.make_batch(rows, idx, packed=False, pad_id=tok.pad_token_id))
        one_by_one = sum(module(batching.make_batch(rows, [i], packed=True)) for i in idx)
        # the same packed tokens with positions that do not restart: attention crosses rows, the loss changes
        leaky = batching.make_batch(rows, idx, packed=True)
        leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1]).view(1, -1)
        crossed = module(leaky)
    assert torch.allclose(packed, one_by_one, rtol=1e-5, atol=1e-4)
    assert torch.allclose(packed, padded, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(packed, crossed, rtol=1e-4, atol=1e-3)


def test_token_weighted_accumulation_equals_big_batch(tiny_llama_dir, simulated_hardware):
    """Two micro-batches of 2 rows with accumulation == one micro-batch of 4 rows, through the real trainer
    (in bf16 up to bf16 rounding: the two batch shapes round differently)."""
    df = qa_frame(4)
    trained = []
    for batch_size, accum in ((2, 2), (4, 1)):
        cfg = make_config(tiny_llama_dir, adapter={"type": "lora", "dropout": 0.0},
                          trainer={"type": "finetune", "epochs": 1, "batch_size": batch_size,
                                   "gradient_accumulation_steps": accum, "optimizer": {"type": "sgd"},
                                   "learning_rate": 1.0, "gradient_clipping": {"clipglobalnorm": None},
                                   "should_shuffle": False})
        m = LlmModel(cfg)
        result = m.fit({"training": df}, run_dir=None, resume=False, seed=3, log=lambda *_: None)
        assert result.steps == 1
        trained.append({n: p.detach().clone() for n, p in m.model.named_parameters() if p.requires_grad})
    assert trained[0].keys() == trained[1].keys() and len(trained[0]) > 0
    moved = max((trained[0][k] - 0).abs().max().item() for k in trained[0] if "lora_B" in k)
    assert moved > 1e-4  # the step did change the adapter
    rtol = tolerance(simulated_hardware, fp32=1e-4, bf16=3e-2)
    for k in trained[0]:
        assert torch.allclose(trained[0][k], trained[1][k], rtol=rtol, atol=rtol * 1e-2), k


def test_mean_of_means_would_differ(tiny_llama_dir, rows_and_model):
    """Guards the test above: micro-batches with unequal target counts give a different mean-of-means."""
    rows, _ = rows_and_model
    model = load_causal_lm(str(tiny_llama_dir), dtype=torch.float32).eval()
    module = TargetLoss(model)
    a, b = batching.make_batch(rows, [0, 1], packed=True), batching.make_batch(rows, [2, 3, 4, 5], packed=True)
    na, nb = a["target_ids"].numel(), b["target_ids"].numel()
    assert na != nb
    with torch.no_grad():
        la, lb = module(a), module(b)
    assert abs(((la + lb) / (na + nb)) - (la / na + lb / nb) / 2) > 1e-4


def train_small(tiny_llama_dir, tmp_path, epochs=60, **extra):
    df = qa_frame(4)
    trainer = {"type": "finetune", "epochs": epochs, "batch_size": 4, "learning_rate": 1e-2,
               "gradient_clipping": {"clipglobalnorm": None}}
    trainer.update(extra.pop("trainer", {}))
    extra.setdefault("prompt", {"template": "{question} =", "use_chat_template": False})
    cfg = make_config(tiny_llama_dir, trainer=trainer, **extra)
    m = LlmModel(cfg)
    m.fit({"training": df}, run_dir=None, resume=False, seed=0, log=lambda *_: None)
    return m, df, cfg


def test_full_finetune_learns_answers_that_stop_at_eos(tiny_llama_dir, tmp_path, cache_dir):
    # a decaying rate settles on the memorised answers (a constant 1e-2 keeps bf16 runs hopping around the edge)
    m, df, cfg = train_small(tiny_llama_dir, tmp_path, epochs=80,
                             trainer={"learning_rate_scheduler": {"decay": "cosine"}})
    preds = m.predict(df)
    assert list(preds["answer_predictions"]) == list(df.answer)  # memorised, and stopped right after
    metrics, _ = m.evaluate(df)
    assert metrics["answer"]["exact_match"] == 1.0 and metrics["answer"]["rouge_l"] == 1.0
    assert metrics["answer"]["token_accuracy"] == 1.0 and metrics["answer"]["perplexity"] < 1.5
    m.save(tmp_path / "model")
    weights = tmp_path / "model" / "model_weights"
    assert (weights / "model.safetensors").is_file() and (weights / "config.json").is_file()
    assert (weights / "generation_config.json").is_file() and (weights / "tokenizer.json").is_file()
    meta = json.loads((tmp_path / "model" / "training_set_metadata.json").read_text())
    assert meta["weights"] == "full" and meta["prompt"]["template"] == "{question} ="
    loaded = LlmModel.load(tmp_path / "model", cfg)
    assert list(loaded.predict(df)["answer_predictions"]) == list(df.answer)
    assert list(cache_dir.glob("tokens/*.safetensors"))  # tokenized data went to the configured cache


def test_lora_save_load_generations_identical_and_continue(tiny_llama_dir, tmp_path, cache_dir):
    m, df, cfg = train_small(tiny_llama_dir, tmp_path, epochs=3, adapter={"type": "lora", "r": 4},
                             trainer={"learning_rate": 2e-2})
    before = m.generate(["what colour is the banana?", "hello"])
    preds = m.predict(df)
    m.save(tmp_path / "model")
    files = sorted(p.name for p in (tmp_path / "model" / "model_weights").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files and "model.safetensors" not in files
    loaded = LlmModel.load(tmp_path / "model", cfg)
    assert loaded.generate(["what colour is the banana?", "hello"]) == before
    assert loaded.predict(df).equals(preds)
    # continue training from the saved adapter: starts from exactly its weights
    cont = make_config(tiny_llama_dir, adapter={"type": "lora", "r": 4,
                                                "pretrained_adapter_weights": str(tmp_path / "model")},
                       trainer={"type": "finetune", "epochs": 1, "batch_size": 4, "learning_rate": 1e-9})
    m2 = LlmModel(cont)
    m2.fit({"training": df}, run_dir=None, resume=False, seed=0, log=lambda *_: None)
    saved = {k: v for k, v in m.model.state_dict().items() if "lora_" in k}
    again = {k: v for k, v in m2.model.state_dict().items() if "lora_" in k}
    assert saved.keys() == again.keys()
    assert all(torch.allclose(saved[k], again[k], atol=1e-6) for k in saved)


def test_merge_adapter_matches_and_saves_plain_model(tiny_llama_dir, tmp_path, cache_dir):
    m, df, cfg = train_small(tiny_llama_dir, tmp_path, epochs=2,
                             adapter={"type": "lora", "r": 4, "postprocessor": {"merge_adapter_into_base_model": True}},
                             trainer={"learning_rate": 2e-2})
    assert m.weights_kind == "merged" and not hasattr(m.model, "peft_config")
    m.save(tmp_path / "model")
    weights = tmp_path / "model" / "model_weights"
    assert (weights / "model.safetensors").is_file() and not (weights / "adapter_config.json").exists()
    loaded = LlmModel.load(tmp_path / "model", cfg)
    assert loaded.predict(df).equals(m.predict(df))


def test_merge_refuses_when_logits_differ(tiny_llama_dir, tmp_path, cache_dir):
    """The merge check is real: an adapter whose merge is wrong (here: a scaled weight) is refused."""
    cfg = make_config(tiny_llama_dir, adapter={"type": "lora", "r": 4, "postprocessor": {"merge_adapter_into_base_model": True}},
                      trainer={"type": "finetune", "epochs": 1, "batch_size": 4})
    m = LlmModel(cfg)
    m._ensure_base(log=lambda *_: None)
    m._prepare_for_training(lambda *_: None)
    for name, p in m.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    layer = next(mod for mod in m.model.modules() if hasattr(mod, "scaling") and isinstance(mod.scaling, dict))
    original = layer.merge

    def bad_merge(*args, **kwargs):  # a merge that writes a wrong weight
        original(*args, **kwargs)
        layer.get_base_layer().weight.data.mul_(1.5)

    layer.merge = bad_merge
    with pytest.raises(RuntimeError, match="refusing to save a wrong merge"):
        m._merge(log=lambda *_: None)


def test_zero_shot_category_without_fit(tiny_llama_dir, cache_dir, simulated_hardware):
    cfg = load_config({"model_type": "llm", "base_model": str(tiny_llama_dir),
                       "input_features": [{"name": "review", "type": "text"}],
                       "output_features": [{"name": "label", "type": "category",
                                            "match": {"pos": {"type": "contains", "value": "zzzz"}},
                                            "fallback_label": "neg"}],
                       "prompt": {"task": "Is this review positive or negative?"},
                       "generation": {"max_new_tokens": 4}})
    assert cfg.trainer.type == "none"
    m = LlmModel(cfg)
    df = pd.DataFrame({"review": ["great film", "awful film", "fine"], "label": ["pos", "neg", "neg"]})
    preds = m.predict(df)  # no fit: the base model is loaded lazily
    assert set(preds.columns) == {"label_predictions", "label_response", "label_probability",
                                  "label_probabilities_pos", "label_probabilities_neg"}
    # the random model never says "zzzz", so every row falls back
    assert list(preds["label_predictions"]) == ["neg", "neg", "neg"]
    probs = preds[["label_probabilities_pos", "label_probabilities_neg"]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0) and (probs > 0).all()
    assert np.allclose(preds["label_probability"], probs[:, 1])
    # the scores are the model's likelihood of each label as the answer: check one by hand
    row = m._prompts([{"review": "great film"}])[0]
    ids = m.tokenizer(row, add_special_tokens=m.builder.add_special_tokens)["input_ids"]
    model = m.model
    logps = []
    for label in ("pos", "neg"):
        answer = m.tokenizer(m.builder.target(row, label), add_special_tokens=False)["input_ids"] + [m.tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + answer])).logits[0, len(ids) - 1:-1]
        logps.append(torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(answer).view(-1, 1)).sum())
    # bf16 weights (auto on bf16 hardware): the batched scoring and this single forward round differently
    assert np.allclose(probs[0], torch.softmax(torch.stack(logps), 0).numpy(),
                       atol=tolerance(simulated_hardware, fp32=1e-4, bf16=1e-3))
    metrics, _ = m.evaluate(df)
    assert metrics["label"]["accuracy"] == pytest.approx(2 / 3)
    assert metrics["label"]["f1"] == pytest.approx((0 + 0.8) / 2)
    assert metrics["label"]["hits_at_k"] == 1.0  # two labels, top-3


def test_batched_generation_gives_the_lm_head_a_contiguous_input(tiny_llama_dir, cache_dir, monkeypatch):
    """The first token's logits come from hidden[:, -1:, :]. Given as is, torch.matmul copies the head's weight
    once per row (pytorch/pytorch#186148): 3.4 GB and 3.7 s for 60 prompts on SmolLM2 in bf16. Generation makes the
    head's input contiguous while it runs, and the texts stay the same."""
    from cadenza.llm import generate as generation

    m = LlmModel(make_config(tiny_llama_dir, generation={"max_new_tokens": 5}))
    m._ensure_base()
    head = m.model.get_output_embeddings()
    inputs = []
    recorder = head.register_forward_hook(lambda module, args, out: inputs.append(args[0].is_contiguous()))
    prompts = ["hi", "what colour is the banana really really", "one two three four five six", "a b"]
    texts = m.generate(prompts, batch_size=4)
    assert len(inputs) >= 2 and all(inputs)  # the prompt's pass and each new token's
    assert not head._forward_pre_hooks  # nothing left on the model
    inputs.clear()
    monkeypatch.setattr(generation, "contiguous_head_input", lambda model: contextlib.nullcontext())
    assert m.generate(prompts, batch_size=4) == texts
    assert not inputs[0]  # as transformers hands it over: the case above is the one that needed the fix
    recorder.remove()


@pytest.mark.parametrize("budget", [None, 1])
def test_candidate_likelihoods_from_one_cached_prompt_equal_whole_sequences(tiny_llama_dir, budget, monkeypatch):
    """Label scores: each prompt runs once (left-padded batches, its cache repeated for its candidates) and must give
    what a forward pass over each whole prompt + candidate gives. Prompts of different lengths, candidates of 1-4
    tokens, batches of 2 (padding in every batch); budget 1: one row's log-softmax at a time."""
    from cadenza.llm import likelihood

    if budget:
        monkeypatch.setattr(likelihood, "LOGIT_BUDGET", budget)
    model = load_causal_lm(str(tiny_llama_dir), dtype=torch.float32).eval()
    tok = load_tokenizer(str(tiny_llama_dir))
    prompts = [np.asarray(tok(text)["input_ids"]) for text in
               ["Is this good?", "A long review of a film that goes on and on, then asks: is it good?", "Hm", "Rate it"]]
    candidates = [[np.asarray(tok(word, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for word in words]
                  for words in (["yes", " no way at all", "maybe"], ["no", "yes", "perhaps not"],
                                ["positive", "negative", "x"], ["a", "bb", " c c c"])]
    assert {len(c) for cs in candidates for c in cs} >= {2, 3, 4}
    found = likelihood.candidate_log_likelihoods(model, prompts, candidates, pad_id=tok.pad_token_id, batch_size=2 * 3)
    expected = np.zeros_like(found)
    for i, (p, cs) in enumerate(zip(prompts, candidates)):
        for j, c in enumerate(cs):
            with torch.no_grad():
                logits = model(input_ids=torch.as_tensor(np.concatenate([p, c]))[None]).logits[0, len(p) - 1:-1]
            expected[i, j] = torch.log_softmax(logits.double(), -1).gather(1, torch.as_tensor(c)[:, None]).sum()
    assert np.allclose(found, expected, atol=1e-4), (found, expected)
    # a model left in training mode: its LoRA dropout is off while scoring, and the mode comes back
    import peft

    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    scored = [likelihood.candidate_log_likelihoods(lora.eval() if mode == "eval" else lora.train(), prompts,
                                                   candidates, pad_id=tok.pad_token_id, batch_size=6)
              for mode in ("eval", "train")]
    assert lora.training and np.allclose(scored[0], scored[1]) and not np.allclose(scored[0], found, atol=1e-3)


def test_label_scores_of_a_prompt_cut_for_a_long_label_still_add_up(tiny_llama_dir, cache_dir, simulated_hardware):
    """With global_max_sequence_length short enough, a longer label leaves less of the prompt: that row's
    candidates follow different prompts and are scored one by one."""
    cfg = load_config({"model_type": "llm", "base_model": str(tiny_llama_dir),
                       "input_features": [{"name": "review", "type": "text"}],
                       "output_features": [{"name": "label", "type": "category"}],
                       "preprocessing": {"global_max_sequence_length": 12},
                       "prompt": {"template": "{review} ->", "use_chat_template": False},
                       "generation": {"max_new_tokens": 2}})
    m = LlmModel(cfg)
    m._ensure_base()
    m.labels = ["ok", "a very long label with many words"]
    records = [{"review": "short"}, {"review": "a much longer review that the sequence limit has to cut"}]
    probs = m._label_probabilities(records)
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1.0) and (probs > 0).all()
    model = m.model
    for r, record in enumerate(records):  # by hand: each (prompt, label) as tokenized, in one forward pass
        prompt = m._prompts([record])[0]
        rows = tokenize_rows(m.tokenizer, [prompt] * 2, [m.builder.target(prompt, x) for x in m.labels], max_len=12,
                             add_special_tokens=m.builder.add_special_tokens)
        cut = r == 1  # the long review: the long label leaves it fewer tokens than the short one does
        assert (rows.prompt_lens[0] != rows.prompt_lens[1]) == cut
        logps = []
        for ids, n in zip(rows.ids, rows.prompt_lens):
            with torch.no_grad():
                logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0, n - 1:-1]
            logps.append(torch.log_softmax(logits.double(), -1).gather(1, torch.as_tensor(ids[n:])[:, None]).sum())
        assert np.allclose(probs[r], torch.softmax(torch.stack(logps), 0).numpy(),
                           atol=tolerance(simulated_hardware, fp32=1e-4, bf16=1e-3))


def test_few_shot_random_retrieval_puts_examples_in_prompt(tiny_llama_dir, tmp_path, cache_dir):
    cfg = make_config(tiny_llama_dir, prompt={"template": "{__context__}Q: {question}\nA:", "use_chat_template": False,
                                              "retrieval": {"type": "random", "k": 2}})
    m = LlmModel(cfg)
    df = qa_frame(6)
    m.fit({"training": df}, run_dir=None, resume=False, seed=0, log=lambda *_: None)
    prompt = m._prompts([{"question": "new question?"}])[0]
    assert prompt.count("Q: ") == 3 and prompt.endswith("Q: new question?\nA:")
    shown = [line[3:] for line in prompt.splitlines() if line.startswith("Q: ")][:2]
    assert all(q in set(df.question) for q in shown)
    m.save(tmp_path / "model")
    loaded = LlmModel.load(tmp_path / "model", cfg)
    assert loaded._prompts([{"question": "new question?"}])[0].count("Q: ") == 3


def test_layers_to_freeze_regex_and_truncation_reported(tiny_llama_dir, tmp_path, cache_dir):
    lines = []
    cfg = make_config(tiny_llama_dir, trainer={"type": "finetune", "epochs": 1, "batch_size": 4,
                                               "layers_to_freeze_regex": r"layers\.0\.|embed_tokens"},
                      preprocessing={"global_max_sequence_length": 24})
    m = LlmModel(cfg)
    result = m.fit({"training": qa_frame(4), "validation": qa_frame(2)}, run_dir=None, resume=False, seed=0,
                   log=lines.append)
    val = result.statistics["validation"][0]
    assert val["combined"]["loss"] == val["answer"]["loss"] > 0
    assert val["answer"]["perplexity"] == pytest.approx(np.exp(val["answer"]["loss"]))
    frozen = {n for n, p in m.model.named_parameters() if not p.requires_grad}
    assert frozen and all("layers.0." in n or "embed_tokens" in n for n in frozen)
    assert any(p.requires_grad for n, p in m.model.named_parameters() if "layers.1." in n)
    assert any("4 of 4 training rows truncated" in line for line in lines)  # the chat template alone is > 24 tokens


@pytest.mark.parametrize("attn, train_on_inputs", [("sdpa", False), ("eager", True)])
def test_shared_prefix_batch_equals_separate_rows(tiny_llama_dir, attn, train_on_inputs, monkeypatch):
    """Chat-templated rows share their system prompt: computed once per pack, same loss and gradients."""
    tok = load_tokenizer(str(tiny_llama_dir))
    df = qa_frame(5)
    chat = lambda q: tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,  # noqa: E731
                                             add_generation_prompt=True)
    rows = tokenize_rows(tok, [chat(q) for q in df.question], list(df.answer), max_len=None,
                         add_special_tokens=False)
    idx = list(range(len(rows)))
    shared = batching.make_batch(rows, idx, packed=True, share_prefix=True, train_on_inputs=train_on_inputs)
    assert shared["attention_mask"].dim() == 4  # the shared-prefix layout was used
    assert shared["computed_tokens"] < shared["num_tokens"] - 3 * batching.MIN_SHARED_PREFIX
    model = load_causal_lm(str(tiny_llama_dir), dtype=torch.float32, attn_implementation=attn).eval()
    module = TargetLoss(model)

    def loss_and_grad(batches):
        model.zero_grad()
        loss = sum(module(b) for b in batches)
        loss.backward()
        return loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    one, g_one = loss_and_grad([batching.make_batch(rows, [i], packed=True, train_on_inputs=train_on_inputs)
                                for i in idx])
    both, g_both = loss_and_grad([shared])
    assert shared["target_ids"].numel() == sum(
        batching.make_batch(rows, [i], packed=True, train_on_inputs=train_on_inputs)["target_ids"].numel() for i in idx)
    assert torch.allclose(one, both, rtol=1e-5, atol=1e-4)
    assert torch.allclose(g_one, g_both, rtol=1e-4, atol=1e-5)
    # a mask that lets rows see each other changes the loss: the test can fail (both attention paths)
    leaky_mask = dict(shared, segments=None, attention_mask=torch.ones_like(shared["attention_mask"]).tril())
    segments = shared["segments"]
    leaky_rows = dict(shared, segments=attention.Segments(
        segments.prefix, [attention.RowGroup(g.rows, torch.ones_like(g.mask)) for g in segments.groups],
        segments.inverse))
    with torch.no_grad():
        for leaky in (leaky_mask, leaky_rows) if attn == "sdpa" else (leaky_mask,):  # eager: the mask only
            assert abs(module(leaky) - both) > max(1e-3, 10 * abs(one - both))


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
def test_row_attention_equals_block_mask(tiny_llama_dir, share, bf16, grouped, monkeypatch):
    """Cadenza's attention (cadenza.llm.attention) gives eager attention's loss and gradients, with rows of different
    lengths (padding inside the gathered batch) and grouped-query heads: row by row (long packs, segments), and
    over the block mask of a short pack — in bf16 training the explicit form, in fp32 transformers' sdpa. bf16 runs
    as Cadenza trains an adapter: bf16 weights under autocast."""
    tok = load_tokenizer(str(tiny_llama_dir))
    df = qa_frame(6)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q * (1 + i % 3)}], tokenize=False,
                                       add_generation_prompt=True) for i, q in enumerate(df.question)]
    rows = tokenize_rows(tok, prompts if share else list(df.question), list(df.answer), max_len=None,
                         add_special_tokens=False)
    monkeypatch.setattr(attention, "MIN_ROW_TOKENS_BF16", 0)  # rows in bf16 too (short test rows)
    # grouped: calls cost nothing, so rows of different lengths go to separate groups (several attention calls)
    monkeypatch.setattr(attention, "GROUP_CALL_SCORES", 0 if grouped else 10**9)
    batch = batching.make_batch(rows, list(range(len(rows))), packed=True, share_prefix=True)
    assert (batch["segments"].prefix > 0) == share and len(set(rows.lengths)) > 1
    assert (len(batch["segments"].groups) > 1) == grouped
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = load_causal_lm(str(tiny_llama_dir), dtype=dtype)
    eager = load_causal_lm(str(tiny_llama_dir), dtype=dtype, attn_implementation="eager")
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    explicit_calls = []
    real = attention.masked_attention
    monkeypatch.setattr(attention, "masked_attention", lambda q, *a: explicit_calls.append(q.dtype) or real(q, *a))

    def loss_and_grads(m, b):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = TargetLoss(m)(b)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    ref_loss, ref_grads = loss_and_grads(eager, dict(batch, segments=None))

    def close(g, r):  # bf16: relative error of the whole tensor (single entries round differently)
        return (g - r).float().norm() <= 3e-2 * r.float().norm() if bf16 else torch.allclose(g, r, rtol=1e-4, atol=1e-5)
    for b in (batch, dict(batch, segments=None)):  # row by row; the block mask
        explicit_calls.clear()
        loss, grads = loss_and_grads(model, b)
        assert model.config._attn_implementation == attention.NAME
        assert torch.allclose(loss, ref_loss, rtol=1e-2 if bf16 else 1e-5, atol=1e-4), (loss, ref_loss)
        assert len(grads) == len(ref_grads) and all(close(g, r) for g, r in zip(grads, ref_grads))
        # the path taken: rows always go through masked_attention; the block mask only in bf16 (explicit form)
        assert explicit_calls and set(explicit_calls) == {torch.bfloat16 if bf16 else torch.float32} \
            if b["segments"] is not None or bf16 else not explicit_calls
    # the switched model still generates as an sdpa one (no segments: transformers' sdpa function and masks)
    ids = torch.from_numpy(np.stack([rows.ids[0][:5], rows.ids[1][:5]])).long()
    fresh = load_causal_lm(str(tiny_llama_dir), dtype=dtype)
    generate = dict(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1] * 5]), max_new_tokens=4,
                    do_sample=False)
    assert torch.equal(model.eval().generate(**generate), fresh.eval().generate(**generate))


@pytest.mark.parametrize("bf16", [False, True])
def test_row_attention_where_it_pays(tiny_llama_dir, bf16, monkeypatch):
    """Every pack carries its rows; attention goes row by row in fp32 whatever the pack's length (the flash kernel
    over a block mask computes every masked block) and in bf16 training only from MIN_ROW_TOKENS_BF16 tokens."""
    tok = load_tokenizer(str(tiny_llama_dir))
    df = qa_frame(4)
    rows = tokenize_rows(tok, list(df.question), list(df.answer), max_len=None, add_special_tokens=False)
    batch = batching.make_batch(rows, list(range(len(rows))), packed=True, share_prefix=True)
    assert batch["segments"] is not None and batch["computed_tokens"] < attention.MIN_ROW_TOKENS_BF16
    assert attention.rows_pay(10, low_precision=False) and not attention.rows_pay(10, low_precision=True)
    assert attention.rows_pay(attention.MIN_ROW_TOKENS_BF16, low_precision=True)
    dtype = torch.bfloat16 if bf16 else torch.float32
    module = TargetLoss(load_causal_lm(str(tiny_llama_dir), dtype=dtype))
    moved = []
    real_to = attention.Segments.to
    monkeypatch.setattr(attention.Segments, "to", lambda self, device: moved.append(1) or real_to(self, device))

    def row_attention_used() -> bool:
        moved.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            module(batch).backward()
        return bool(moved)
    assert row_attention_used() == (not bf16)
    monkeypatch.setattr(attention, "MIN_ROW_TOKENS_BF16", 0)
    assert row_attention_used()


def test_length_groups_minimise_the_attention_work():
    """Rows sorted by length are cut where padding costs more than another call: one long row among short ones gets
    its own group, rows of one length share a call, and the cuts are the cheapest (checked against every cut)."""
    call = attention.GROUP_CALL_SCORES
    assert attention.length_groups([30] * 7 + [139], 25) == [range(0, 7), range(7, 8)]
    assert attention.length_groups([40] * 8, 25) == [range(0, 8)]
    assert attention.length_groups([5, 6], 0) == [range(0, 2)]  # a second call costs more than a little padding

    def cost(lengths, runs, prefix):
        return sum(call + len(r) * lengths[r[-1]] * (prefix + lengths[r[-1]]) for r in runs)
    rng = np.random.default_rng(0)
    for _ in range(30):
        lengths = sorted(rng.integers(1, 200, size=int(rng.integers(1, 8))).tolist())
        prefix = int(rng.integers(0, 40))
        runs = attention.length_groups(lengths, prefix)
        assert [i for r in runs for i in r] == list(range(len(lengths)))
        cheapest = min(cost(lengths, [range(a, b) for a, b in zip((0,) + cuts, cuts + (len(lengths),))], prefix)
                       for k in range(len(lengths)) for cuts in itertools.combinations(range(1, len(lengths)), k))
        assert cost(lengths, runs, prefix) == cheapest


def test_segments_scatter_rows_back_in_packed_order(monkeypatch):
    """Segments.build over rows in several groups: each group's padded positions gather the right packed tokens,
    and `inverse` puts every row's tokens back where the packed sequence had them."""
    monkeypatch.setattr(attention, "GROUP_CALL_SCORES", 30)  # scaled to these short rows
    prefix, lengths = 3, [2, 9, 3, 8]
    segments = attention.Segments.build(prefix, lengths)
    assert len(segments.groups) == 2  # (2, 3) and (8, 9)
    layout = torch.cat([torch.where(g.mask[:, 0, -1, prefix:], g.rows, -1).reshape(-1) for g in segments.groups])
    assert torch.equal(layout[segments.inverse], torch.arange(prefix, prefix + sum(lengths)))
    for g in segments.groups:
        assert g.mask.shape[-1] == prefix + g.rows.shape[1] and g.mask[..., :prefix].all()


def test_masked_attention_bf16_explicit_form_equals_sdpa():
    """The explicit bf16 form (grouped-query heads folded into one product) against fp32 sdpa with repeated keys:
    outputs and input gradients agree to bf16 precision; an all-visible mask would change the result."""
    torch.manual_seed(0)
    b, heads, kv_heads, t, s, d = 2, 6, 2, 7, 9, 16
    q, k, v = (torch.randn(b, h, n, d) for h, n in ((heads, t), (kv_heads, s), (kv_heads, s)))
    mask = torch.rand(b, 1, t, s) < 0.6
    mask[..., 0] = True  # every query sees at least one key

    def run(fn, dtype):
        qq, kk, vv = (x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v))
        out = fn(qq, kk, vv)
        out.float().pow(2).sum().backward()
        return [out.float()] + [x.grad.float() for x in (qq, kk, vv)]

    groups = heads // kv_heads
    reference = run(lambda qq, kk, vv: torch.nn.functional.scaled_dot_product_attention(
        qq, kk.repeat_interleave(groups, 1), vv.repeat_interleave(groups, 1), attn_mask=mask, scale=0.3), torch.float32)
    explicit = run(lambda qq, kk, vv: attention.masked_attention(qq, kk, vv, mask, 0.3, 0.0), torch.bfloat16)
    for got, want in zip(explicit, reference):
        assert torch.allclose(got, want, rtol=3e-2, atol=3e-2), (got - want).abs().max()
    unmasked = attention.masked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), torch.ones_like(mask), 0.3, 0.0)
    assert (unmasked.float() - reference[0]).abs().max() > 0.1


def test_gradient_checkpointing_gives_the_same_training(tiny_llama_dir):
    losses = []
    for ckpt in (False, True):
        cfg = make_config(tiny_llama_dir, adapter={"type": "lora", "dropout": 0.0},
                          trainer={"type": "finetune", "epochs": 2, "batch_size": 2, "learning_rate": 1e-2,
                                   "enable_gradient_checkpointing": ckpt})
        m = LlmModel(cfg)
        result = m.fit({"training": qa_frame(4)}, run_dir=None, resume=False, seed=0, log=lambda *_: None)
        assert causal_lm_is_checkpointing(m.model) == ckpt
        losses.append([s["loss"] for s in result.statistics["training"]])
    assert np.allclose(losses[0], losses[1], rtol=1e-5)


def causal_lm_is_checkpointing(model) -> bool:
    from cadenza.llm.loss import causal_lm_of

    return any(getattr(mod, "gradient_checkpointing", False) for mod in causal_lm_of(model).modules())


def test_sigterm_stops_llm_training_at_a_step_boundary_and_resumes_to_the_same_adapter(tiny_llama_dir, tmp_path,
                                                                                        cache_dir):
    """A real SIGTERM inside step 7 (in the second epoch of 5 steps): the step finishes, a checkpoint is saved, and
    the resumed run's adapter equals the uninterrupted run's, LoRA dropout included."""
    import signal

    from cadenza import Model
    from cadenza.train.interrupt import TrainingInterrupted

    df = qa_frame(24)
    cfg = {"model_type": "llm", "base_model": str(tiny_llama_dir),
           "input_features": [{"name": "question", "type": "text"}],
           "output_features": [{"name": "answer", "type": "text"}],
           "adapter": {"type": "lora", "dropout": 0.1},
           "trainer": {"type": "finetune", "epochs": 3, "batch_size": 4, "learning_rate": 0.01, "early_stop": -1},
           "generation": {"max_new_tokens": 6}}
    quiet = lambda *_: None  # noqa: E731
    full = Model(cfg, log=quiet)
    full_out = full.train(df, output_directory=tmp_path / "full")
    assert full.model._total_steps == full_out.statistics["steps"] == 15  # what AdaLoRA would be told: the loop's count

    with signal_in_step(7, signal.SIGTERM), pytest.raises(TrainingInterrupted) as stopped:
        Model(cfg, log=quiet).train(df, output_directory=tmp_path / "cut")
    run_dir = tmp_path / "cut" / "experiment_run"
    assert stopped.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())["state"]
    assert state["global_step"] == 7 and not (run_dir / "model").exists()

    resumed = Model(cfg, log=quiet)
    out = resumed.train(df, output_directory=tmp_path / "cut", resume=True)
    assert out.run_dir == run_dir and not (run_dir / "checkpoint").exists()
    losses = lambda o: [e["loss"] for e in o.statistics["training"]]  # noqa: E731
    assert losses(out) == pytest.approx(losses(full_out), rel=1e-5)
    prompts = ["what colour is the apple?", "what colour is the mango?"]
    assert resumed.generate(prompts) == full.generate(prompts)
    trained = {n: p for n, p in full.model.model.named_parameters() if p.requires_grad}
    for n, p in resumed.model.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, trained[n], rtol=1e-5, atol=1e-6)


def test_neftune_noise_only_while_training(tiny_llama_dir, rows_and_model, tmp_path, cache_dir):
    rows, _ = rows_and_model
    model = load_causal_lm(str(tiny_llama_dir), dtype=torch.float32).eval()
    batch = batching.make_batch(rows, list(range(len(rows))), packed=True)
    assert batch["longest_row"] == int(rows.lengths.max())
    plain, noisy = TargetLoss(model), TargetLoss(model, neftune_noise_alpha=5.0)
    with torch.no_grad():
        reference = plain.eval()(batch)
        assert torch.equal(noisy.eval()(batch), reference)  # evaluation and generation see no noise
        noisy.train()
        first, second = noisy(batch), noisy(batch)
        assert torch.equal(plain.train()(batch), reference)  # no dropout in the model: the noise is the change
    assert not torch.allclose(first, reference) and not torch.allclose(first, second)
    # through the config: the same seed trains another adapter with noise than without
    trained = []
    for alpha in (0.0, 5.0):
        m, *_ = train_small(tiny_llama_dir, tmp_path, epochs=2, adapter={"type": "lora", "dropout": 0.0},
                            model_parameters={"neftune_noise_alpha": alpha})
        trained.append({k: v.clone() for k, v in m.model.state_dict().items() if "lora_B" in k})
    assert any(not torch.allclose(trained[0][k], trained[1][k]) for k in trained[0])


def test_rope_scaling_is_merged_into_the_model_config(tiny_llama_dir, cache_dir):
    cfg = make_config(tiny_llama_dir, model_parameters={"rope_scaling": {"type": "linear", "factor": 2.0}})
    m = LlmModel(cfg)
    m._ensure_base(log=lambda *_: None)
    base = load_causal_lm(str(tiny_llama_dir), dtype=torch.float32).eval()
    rope = m.model.config.rope_parameters
    assert (rope["rope_type"], rope["factor"]) == ("linear", 2.0)
    assert rope["rope_theta"] == base.config.rope_parameters["rope_theta"]  # the model's own theta is kept
    ids = torch.arange(1, 40).view(1, -1)
    with torch.no_grad():
        assert not torch.allclose(m.model.eval()(ids).logits.float(), base(ids).logits)


def test_a_slow_first_peak_reading_is_not_the_mfu_printed(tiny_llama_dir, tmp_path, cache_dir,
                                                          slow_first_peak_reading):
    """An epoch that ran faster than the peak's first reading has the peak measured again: the MFU printed and
    stored is a share of the higher reading, not "MFU 124.8%" (as a slow moment of this VM once made it)."""
    from cadenza import Model

    lines = []
    cfg = {"model_type": "llm", "base_model": str(tiny_llama_dir),
           "input_features": [{"name": "question", "type": "text"}],
           "output_features": [{"name": "answer", "type": "text"}], "adapter": {"type": "lora"},
           "trainer": {"type": "finetune", "epochs": 2, "batch_size": 4}}
    out = Model(cfg, log=lines.append).train(qa_frame(8), output_directory=tmp_path)
    readings = slow_first_peak_reading
    assert len(readings) == 2 and readings[1] > 1e6  # measured again once; the real reading then stood
    assert out.statistics["throughput"]["peak_tflops"] == pytest.approx(readings[1] / 1e12)
    assert all(0 < epoch["mfu"] < 1 for epoch in out.statistics["training"])
    assert any(f"of {readings[1] / 1e12:.2f} TFLOPS" in line for line in lines if line.startswith("epoch 1:"))


def test_ludwig_llm_config_runs_unchanged(tiny_llama_dir, tmp_path, cache_dir):
    import yaml

    from cadenza import Model

    text = (Path(__file__).parent / "data" / "ludwig_llm_lora.yaml").read_text()
    raw = yaml.safe_load(text.replace("TINY_LLAMA", str(tiny_llama_dir)))  # the only change: a local model
    df = pd.DataFrame({"instruction": [f"name colour {i}" for i in range(40)],
                       "input": ["red green blue"[i % 9:] for i in range(40)],
                       "output": [["red", "green", "blue"][i % 3] for i in range(40)]})
    model = Model(raw, log=lambda *_: None)
    out = model.train(df, output_directory=tmp_path)
    # batch_size 1 x packing_max_sequences_per_pack 8 rows per micro-batch, 16 micro-batches per step
    assert out.statistics["steps"] == 3 * 1 and len(out.statistics["training"]) == 3
    assert model.model.model.base_model.model.config.rope_parameters["factor"] == 2.0
    predictions = model.predict(df.head(3))
    assert len(predictions) == 3 and predictions["output_predictions"].map(type).eq(str).all()
    assert (out.model_dir / "model_weights" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("adapter", [True, False])
def test_mfu_counts_the_lm_head_on_target_tokens_only(tiny_llama_dir, adapter):
    """MFU's FLOPs per target token: the transformer's weights on every computed token (shared prefixes once), the
    LM head's on target tokens only, the input embedding's (a lookup) never; 4 per weight with an adapter, 6 in
    full fine-tuning. The tiny Llama ties its head to its input embedding: one tensor, counted once."""
    from types import SimpleNamespace

    from cadenza.llm.train import SftRows

    tok = load_tokenizer(str(tiny_llama_dir))
    df = qa_frame(8)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in df.question]
    rows = tokenize_rows(tok, prompts, list(df.answer), max_len=None, add_special_tokens=False)
    model = load_causal_lm(str(tiny_llama_dir), dtype=torch.float32)
    config = load_config({"model_type": "llm", "base_model": str(tiny_llama_dir),
                          "input_features": [{"name": "question", "type": "text"}],
                          "output_features": [{"name": "answer", "type": "text"}],
                          **({"adapter": {"type": "lora"}} if adapter else {}), "trainer": {"batch_size": 4}})
    data = SftRows(SimpleNamespace(model=model, config=config), rows, None, seed=0)
    groups = data.groups(0, 4)
    per_target = data.flops_per_unit(groups, share=True)
    head = model.get_output_embeddings().weight
    assert head is model.get_input_embeddings().weight  # tied
    body = sum(p.numel() for p in model.parameters()) - head.numel()
    targets = data.target_tokens
    computed = sum(batching.computed_tokens(rows, g, packed=True, share_prefix=True) for g in groups)
    assert computed < sum(len(rows.ids[i]) for i in range(len(rows)))  # the shared prefix once a pack
    k = 4 if adapter else 6
    assert per_target * targets == pytest.approx(k * (body * computed + head.numel() * targets))
