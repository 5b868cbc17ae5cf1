"""Multi-turn chat data (cadenza/llm/chat.py): parsing, row-named errors, assistant-turn masks on real chat templates,
the loss on exactly those tokens, and a chat config that trains, evaluates and predicts.

Chat templates: SmolLM2's own ChatML (the packaged tokenizer), and two other families' templates copied verbatim
from their public tokenizer_config.json files: Meta-Llama-3-8B-Instruct's and gemma-7b-it's (the same texts ship
in trl as chat_templates/llama3.jinja and gemma.jinja). They are put on SmolLM2's tokenizer with their special
tokens added, which is all a template needs: the masks depend on the rendered text and the token offsets.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cadenza.config.load import load_config
from cadenza.data.read import read_dataset
from cadenza.errors import ConfigError, DataError
from cadenza.llm import LlmModel, batching, chat
from cadenza.llm.load import load_causal_lm, load_tokenizer
from cadenza.llm.loss import TargetLoss

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

# a reply that repeats the user's words, a reply with outer spaces, a reply with a newline inside
TURNS = [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "hello"},
         {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": " It is 4. "},
         {"role": "user", "content": "List two colours."}, {"role": "assistant", "content": "red\nblue"}]


@pytest.fixture(scope="module")
def smollm2_tok(llama_tokenizer_dir):
    return load_tokenizer(str(llama_tokenizer_dir))


def _family(tokenizer_dir, template, bos, specials):
    tok = load_tokenizer(str(tokenizer_dir))
    tok.add_special_tokens({"bos_token": bos, "additional_special_tokens": specials})
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def llama3_tok(llama_tokenizer_dir):
    return _family(llama_tokenizer_dir, LLAMA3_TEMPLATE, "<|begin_of_text|>",
                   ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])


@pytest.fixture(scope="module")
def gemma_tok(llama_tokenizer_dir):
    return _family(llama_tokenizer_dir, GEMMA_TEMPLATE, "<bos>", ["<start_of_turn>", "<end_of_turn>"])


def labelled_runs(tok, ids, mask) -> list[str]:
    """The labelled tokens decoded, one string per contiguous run."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


@pytest.mark.parametrize("family, end, trims, system", [
    ("smollm2", "<|im_end|>", False, True), ("llama3", "<|eot_id|>", True, True),
    ("gemma", "<end_of_turn>", True, False)])
def test_labels_are_exactly_the_assistant_turns(request, family, end, trims, system):
    """Each labelled run decodes to one assistant text plus the template's end-of-turn token: nothing of the
    system or user turns or the headers, and the reply "hello" is found in the reply, not in "Say hello"."""
    tok = request.getfixturevalue(f"{family}_tok")
    messages = ([{"role": "system", "content": "Be brief."}] if system else []) + TURNS
    ids, mask = chat.tokenize_conversation(tok, messages)
    text = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids) == text  # the tokens are the rendered conversation
    expected = [(m["content"].strip() if trims else m["content"]) + end for m in TURNS if m["role"] == "assistant"]
    assert labelled_runs(tok, ids, mask) == expected
    assert chat.end_of_turn_ids(tok) == [tok.convert_tokens_to_ids(end)]


def test_spans_follow_the_turn_order_when_a_template_moves_the_system_turn():
    """Mistral-style templates put the system text into the last user turn: it is not searched, so it cannot
    pull the search past earlier turns; a reply that repeats the user's word is found in the reply."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}]
    text = "<s>[INST] Say hello [/INST]hello</s>[INST] Be brief.\n\nWhat is 2+2? [/INST]4</s>"
    spans = chat.content_spans(text, messages)
    assert [text[a:b] for a, b in spans if a >= 0] == ["Say hello", "hello", "What is 2+2?", "4"]
    assert spans[2][0] == text.index("[/INST]hello") + len("[/INST]")
    with pytest.raises(chat.ConversationError, match="turn 4: the chat template does not write the assistant text"):
        chat.content_spans(text.replace("]4<", "]5<"), messages)


def test_template_refusal_names_the_row(gemma_tok, tiny_llama_dir):
    data = chat.ChatData(chat_config(tiny_llama_dir))
    records = data.training_records(pd.DataFrame({"messages": [TURNS, [{"role": "system", "content": "x"}] + TURNS]},
                                                 index=[10, 11]), "training", print)
    with pytest.raises(DataError, match=r"row 11: the chat template refuses it: System role not supported"):
        data.tokenize(gemma_tok, records, with_targets=True, max_len=None)


# --------------------------------------------------------------------------------------------- parsing
def test_sharegpt_and_json_text_become_the_same_messages():
    openai = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}]
    sharegpt = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"}]
    assert chat.parse_conversation(sharegpt) == openai
    assert chat.parse_conversation(json.dumps(sharegpt)) == openai  # a CSV cell
    assert chat.parse_conversation({"conversations": sharegpt}) == openai
    parts = [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}]
    assert chat.parse_conversation(parts) == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_files_read_natively(tmp_path, tiny_llama_dir, suffix):
    """JSONL and Parquet hold lists of turns (Parquet as numpy arrays of structs, with None for the keys a turn
    lacks when OpenAI and ShareGPT turns are mixed); CSV holds their JSON text."""
    conversations = [TURNS[:2], [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]]
    df = pd.DataFrame({"messages": conversations})
    path = tmp_path / f"chats{suffix}"
    if suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        df.to_parquet(path)
    else:
        df.assign(messages=[json.dumps(c) for c in conversations]).to_csv(path, index=False)
    records = chat.ChatData(chat_config(tiny_llama_dir)).training_records(read_dataset(path), "training", print)
    assert [r["messages"] for r in records] == [TURNS[:2], [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello"}]]


@pytest.mark.parametrize("cell, problem", [
    ("not json", "row 7: not a usable conversation: the text is not JSON"),
    ("{}", "row 7: .*expected a list of turns"),
    (None, "row 7: .*expected a list of turns, got an empty cell"),
    ([], "row 7: .*the conversation has no turns"),
    ([{"role": "user", "content": "hi"}, "hello"], r"row 7: .*turn 1 is a str \('hello'\)"),
    ([{"role": "bot", "content": "hi"}], "row 7: .*turn 0 has role 'bot'; roles are system, user, assistant"),
    ([{"from": "robot", "value": "hi"}], "row 7: .*turn 0 has from 'robot'"),
    ([{"speaker": "user", "text": "hi"}], r"row 7: .*turn 0 has keys \['speaker', 'text'\]"),
    ([{"role": "user", "content": 3}], "row 7: .*turn 0 has no text in 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}], "row 7: .*empty assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
     "row 7: .*system turn may only come first"),
])
def test_invalid_rows_are_named(tiny_llama_dir, cell, problem):
    df = pd.DataFrame({"messages": [TURNS, cell]}, index=[6, 7])
    with pytest.raises(DataError, match=f"training: column 'messages', {problem}"):
        chat.ChatData(chat_config(tiny_llama_dir)).training_records(df, "training", print)


def test_conversations_without_an_assistant_turn_are_dropped_and_counted(tiny_llama_dir):
    df = pd.DataFrame({"messages": [TURNS, TURNS[:1], [{"role": "system", "content": "s"}] + TURNS[:1]]})
    logged = []
    kept = chat.ChatData(chat_config(tiny_llama_dir)).training_records(df, "training", logged.append)
    assert len(kept) == 1
    assert logged == ["warning: training: dropped 2 of 3 conversations with no assistant turn in column 'messages'"]
    with pytest.raises(DataError, match="no conversation in column 'messages' has an assistant turn"):
        chat.ChatData(chat_config(tiny_llama_dir)).training_records(df.iloc[1:], "training", print)


def test_prediction_continues_after_the_last_user_turn(tiny_llama_dir):
    assert chat.prompt_and_reference(TURNS) == (TURNS[:-1], "red\nblue")
    assert chat.prompt_and_reference(TURNS[:-1]) == (TURNS[:-1], None)
    df = pd.DataFrame({"messages": [TURNS, TURNS[:2] + TURNS[1:2]]}, index=["a", "b"])
    with pytest.raises(DataError, match="row b: .*needs a conversation that ends with a user turn"):
        chat.ChatData(chat_config(tiny_llama_dir)).records(df)


def test_config_problems_are_reported(tiny_llama_dir):
    with pytest.raises(ConfigError) as e:
        LlmModel(chat_config(tiny_llama_dir, prompt={"template": "{messages}", "use_chat_template": False},
                             output_features=[{"name": "reply", "type": "category"}]))
    text = str(e.value)
    for key in ("prompt.template", "prompt.use_chat_template", "output_features[0].type"):
        assert key in text


# ------------------------------------------------------------------------------------ loss and training
def chat_config(base, **extra):
    cfg = {"model_type": "llm", "base_model": str(base),
           "input_features": [{"name": "messages", "type": "text", "preprocessing": {"format": "messages"}}],
           "output_features": [{"name": "reply", "type": "text"}], "generation": {"max_new_tokens": 6}}
    cfg.update(extra)
    return load_config(cfg)


def conversations(n):
    fruit = ["apple", "banana", "cherry", "grape", "lemon"]
    return [[{"role": "user", "content": f"Name a fruit like {fruit[i % 5]}."},
             {"role": "assistant", "content": fruit[(i + 1) % 5]},
             {"role": "user", "content": "And its colour?"},
             {"role": "assistant", "content": ["red", "yellow", "green"][i % 3] + " mostly"}][: 2 + 2 * (i % 2)]
            for i in range(n)]


@pytest.mark.parametrize("packed, share_prefix", [(True, False), (True, True), (False, False)])
def test_loss_covers_exactly_the_masked_tokens(tiny_llama_dir, smollm2_tok, packed, share_prefix):
    """Packed, shared-prefix and padded batches of chat rows give the loss transformers computes with labels
    -100 everywhere but the assistant tokens (summed over those tokens)."""
    model = load_causal_lm(str(tiny_llama_dir), dtype=torch.float32).eval()
    data = chat.ChatData(chat_config(tiny_llama_dir))
    records = data.training_records(pd.DataFrame({"messages": conversations(4)}), "training", print)
    rows = data.tokenize(smollm2_tok, records, with_targets=True, max_len=None)
    batch = batching.make_batch(rows, list(range(len(rows))), packed=packed, pad_id=smollm2_tok.pad_token_id,
                                share_prefix=share_prefix)
    if share_prefix:
        assert batch["computed_tokens"] < batch["num_tokens"]  # the system prompt is shared
    with torch.no_grad():
        ours = TargetLoss(model)(batch)
        reference = 0.0
        for ids, mask in zip(rows.ids, rows.masks):
            labels = torch.where(torch.from_numpy(mask), torch.from_numpy(ids), -100).view(1, -1)
            out = model(input_ids=torch.from_numpy(ids).view(1, -1), labels=labels)
            reference += out.loss * int(mask[1:].sum())
    assert batch["target_ids"].numel() == int(rows.target_tokens().sum()) == sum(int(m[1:].sum()) for m in rows.masks)
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-4)


def test_truncation_keeps_the_beginning_and_drops_rows_without_targets(tiny_llama_dir, smollm2_tok):
    data = chat.ChatData(chat_config(tiny_llama_dir))
    long_first = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]
    records = data.training_records(pd.DataFrame({"messages": [TURNS, long_first]}), "training", print)
    full = data.tokenize(smollm2_tok, records[:1], with_targets=True, max_len=None)
    rows = data.tokenize(smollm2_tok, records, with_targets=True, max_len=60)
    assert len(rows) == 1 and rows.truncated == 2  # the long row lost all its targets and is left out
    assert rows.ids[0].tolist() == full.ids[0][:60].tolist()
    assert rows.masks[0].tolist() == full.masks[0][:60].tolist()


def test_chat_config_trains_evaluates_and_predicts(tiny_llama_dir, cache_dir, tmp_path):
    df = pd.DataFrame({"messages": [json.dumps(c) for c in conversations(10)] + ["[]"]})  # as read from a CSV
    cfg = chat_config(tiny_llama_dir, adapter={"type": "lora", "r": 4},
                      trainer={"type": "finetune", "epochs": 2, "batch_size": 4, "learning_rate": 0.01})
    model = LlmModel(cfg)
    with pytest.raises(DataError, match="training: column 'messages', row 10: .*no turns"):
        model.fit({"training": df}, run_dir=None, resume=False, seed=1, log=print)
    logged = []
    model.fit({"training": df.iloc[:10], "validation": df.iloc[:2]}, run_dir=None, resume=False, seed=1,
              log=logged.append)
    assert any("training on 10 rows" in line for line in logged)
    rows = model._train_rows
    tok = model.tokenizer
    assert labelled_runs(tok, rows.ids[1], rows.masks[1]) == ["cherry<|im_end|>", "yellow mostly<|im_end|>"]

    ask = pd.DataFrame({"messages": [conversations(2)[1][:3], conversations(2)[1]]})
    predictions = model.predict(ask)
    assert list(predictions.columns) == ["reply_predictions"] and len(predictions) == 2
    # a final assistant turn is the reference, so both rows ask the same thing
    assert predictions["reply_predictions"][0] == predictions["reply_predictions"][1]
    model.save(tmp_path / "model")
    loaded = LlmModel.load(tmp_path / "model", cfg)
    assert loaded.predict(ask).equals(predictions)
    metrics, _ = model.evaluate(ask)  # the loss on both rows' assistant turns; the texts against row 2's last reply
    assert np.isfinite(metrics["reply"]["loss"]) and set(metrics["reply"]) >= {"exact_match", "rouge_l"}


# ---------------------------------------------------------------------------------------- preference data in chat form
@pytest.mark.parametrize("family, end", [("smollm2", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_preference_completions_are_the_assistant_turn(request, tiny_llama_dir, family, end):
    """A conversation ending with a user turn is the prompt; a completion, as text or as one assistant turn (TRL's
    conversational format), is the assistant's answer: its tokens + the end-of-turn token are the target, the
    rendered conversation with the assistant header is the prompt."""
    tok = request.getfixturevalue(f"{family}_tok")
    data = chat.ChatData(chat_config(tiny_llama_dir, trainer={"type": "dpo"}))
    prompt = TURNS[:3]  # user, assistant, user: earlier assistant turns are prompt, not target
    records = [{"messages": prompt, "reply": "It is 4.", "rejected": [{"role": "assistant", "content": "five"}],
                chat.ROW: 0}]
    for column, text in (("reply", "It is 4."), ("rejected", "five")):
        rows = data.completion_rows(tok, records, column, None)
        ids, n = rows.ids[0], int(rows.prompt_lens[0])
        assert tok.decode(ids[n:]) == text + end
        assert tok.decode(ids[:n]) == chat.render(tok, prompt, generation_prompt=True)
    # (the prompt tokenized alone may merge differently at its end: this count is only for the long-prompt warning)
    assert abs(data.prompt_lengths(tok, records)[0] - n) <= 1
    # too long: the prompt keeps its end and the completion at least half the budget
    cut = data.completion_rows(tok, records, "reply", 12)
    assert cut.truncated == 1 and len(cut.ids[0]) == 12 and tok.decode(cut.ids[0][int(cut.prompt_lens[0]):]) == \
        "It is 4." + end


def test_preference_prompts_and_completions_with_errors_name_the_row(tiny_llama_dir, smollm2_tok):
    data = chat.ChatData(chat_config(tiny_llama_dir, trainer={"type": "dpo"}))
    df = pd.DataFrame({"messages": [json.dumps(TURNS[:1]), json.dumps(TURNS[:2])], "reply": ["a", "b"],
                       "rejected": ["c", json.dumps(TURNS[:2])]})
    with pytest.raises(DataError, match="row 1: a preference prompt must end with a user turn"):
        data.prompt_records(df, "training")
    records = data.prompt_records(df.iloc[[0, 0]].reset_index(drop=True).assign(rejected=["c", json.dumps(TURNS[:2])]),
                                  "training")
    with pytest.raises(DataError, match=r"column 'rejected', row 1: .*one assistant turn"):
        data.completion_rows(smollm2_tok, records, "rejected", None)
