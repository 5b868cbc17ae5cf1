"""Multi-turn chat data: a column of conversations, rendered with the model's chat template, the loss on every
assistant turn and nowhere else.

A config declares it on its one text input: `preprocessing: {format: messages}`. Each cell is a conversation:
OpenAI-style `[{role, content}, ...]` (roles system / user / assistant; a system turn only first) or ShareGPT
`[{from, value}, ...]` (human / gpt / system), as a list (JSONL, Parquet, a DataFrame) or as its JSON text (CSV).

What is trained, per conversation (see `label_mask`): the tokens of each assistant turn's text, found by their
character offsets in the rendered conversation, and after each of them the tokens up to and including the first
special token the template writes (its end-of-turn marker: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`), so the
model learns to end its turn. Headers, system and user turns are context only. Offsets, not generation markers in
the template, decide, so any chat template works.

Prediction continues a conversation: the prompt is the conversation up to its last user turn plus the
template's assistant header; a final assistant turn after it is the reference that `evaluate` compares with.
"""

from __future__ import annotations

import json
from typing import Callable, Optional

import numpy as np
import pandas as pd

from jinja2.exceptions import TemplateError

from ..errors import ConfigError, DataError
from .tokenize import TokenizedRows, truncate

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TURN_SHAPES = "a turn is {role, content} (OpenAI) or {from, value} (ShareGPT)"
ROW = "__row__"  # a record's row label in the data set, for errors found after parsing


class ConversationError(ValueError):
    """What is wrong with one conversation; the caller names the row."""


# ------------------------------------------------------------------------------------------------- config
def chat_column(config) -> Optional[str]:
    """The column of conversations when the config declares chat data, else None."""
    for f in config.input_features:
        if getattr(getattr(f, "preprocessing", None), "format", "text") == "messages":
            return f.column or f.name
    return None


def config_problems(config) -> list[tuple[str, str]]:
    """Settings that make no sense with a conversation column (it is the whole prompt, and its assistant turns
    are the targets)."""
    problems = []
    if len(config.input_features) != 1:
        problems.append(("input_features", "a conversation column (preprocessing.format: messages) is the whole "
                         "prompt: it must be the only input feature"))
    if config.output_features and config.output_features[0].type != "text":
        problems.append(("output_features[0].type", "chat data (preprocessing.format: messages) needs a text "
                         "output: it names the prediction column; the targets are the conversations' assistant turns"))
    p = config.prompt
    for key in ("template", "task"):
        if getattr(p, key):
            problems.append((f"prompt.{key}", "not used with chat data: each conversation is rendered by the "
                             "model's chat template; remove it"))
    if p.retrieval.type:
        problems.append(("prompt.retrieval", "few-shot retrieval is not supported with chat data"))
    if p.use_chat_template is False:
        problems.append(("prompt.use_chat_template", "chat data is rendered with the chat template; remove "
                         "use_chat_template: false"))
    return problems


def check_config(config) -> None:
    problems = config_problems(config)
    if problems:
        raise ConfigError(problems)


# ------------------------------------------------------------------------------------------------ parsing
def parse_conversation(value) -> list[dict]:
    """A cell as a list of {role, content} turns; raises ConversationError saying what is wrong."""
    turns = _as_list(value)
    if not turns:
        raise ConversationError("the conversation has no turns")
    messages = [_turn(t, k) for k, t in enumerate(turns)]
    for k, m in enumerate(messages[1:], start=1):
        if m["role"] == "system":
            raise ConversationError(f"turn {k} is a system turn; a system turn may only come first")
    return messages


def _as_list(value) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConversationError(f"the text is not JSON ({e.msg} at character {e.pos}); a CSV cell holds the "
                                    "conversation as a JSON list of turns") from None
    if isinstance(value, np.ndarray):  # Parquet lists arrive as numpy object arrays
        value = list(value)
    if isinstance(value, dict) and isinstance(value.get("messages", value.get("conversations")), (list, np.ndarray)):
        return _as_list(value.get("messages", value.get("conversations")))
    if not isinstance(value, (list, tuple)):
        raise ConversationError(f"expected a list of turns, got {_describe(value)}")
    return list(value)


def _turn(turn, k: int) -> dict:
    if not isinstance(turn, dict):
        raise ConversationError(f"turn {k} is {_describe(turn)}; {TURN_SHAPES}")
    # Parquet fills the keys a struct lacks with None: a ShareGPT turn may carry role=None
    if turn.get("role") is not None or turn.get("content") is not None:
        role, content, keys = turn.get("role"), turn.get("content"), ("role", "content")
        if role not in ROLES:
            raise ConversationError(f"turn {k} has role {role!r}; roles are {', '.join(ROLES)}")
    elif turn.get("from") is not None or turn.get("value") is not None:
        role, content, keys = SHAREGPT_ROLES.get(turn.get("from")), turn.get("value"), ("from", "value")
        if role is None:
            raise ConversationError(f"turn {k} has from {turn.get('from')!r}; ShareGPT speakers are "
                                    f"{', '.join(SHAREGPT_ROLES)}")
    else:
        raise ConversationError(f"turn {k} has keys {sorted(turn)}; {TURN_SHAPES}")
    content = _content_text(content)
    if content is None:
        raise ConversationError(f"turn {k} has no text in {keys[1]!r}")
    if role == "assistant" and not content.strip():
        raise ConversationError(f"turn {k} is an empty assistant turn: there is nothing to learn from it")
    return {"role": role, "content": content}


def _content_text(content) -> Optional[str]:
    """A string, or OpenAI content parts of type text (joined, as the API reads them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple, np.ndarray)) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def _describe(value) -> str:
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return "an empty cell"
    return f"a {type(value).__name__} ({str(value)[:40]!r})"


def has_assistant_turn(messages: list[dict]) -> bool:
    return any(m["role"] == "assistant" for m in messages)


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], Optional[str]]:
    """What prediction continues, and the answer it is compared with: a final assistant turn is cut off and
    becomes the reference; what remains must end with a user turn."""
    reference = None
    if messages[-1]["role"] == "assistant":
        messages, reference = messages[:-1], messages[-1]["content"]
    if not messages or messages[-1]["role"] != "user":
        raise ConversationError("prediction needs a conversation that ends with a user turn (or with a user turn "
                                "and then the assistant's answer, which is then the reference)")
    return messages, reference


def completion_text(value) -> str:
    """A preference completion (chosen or rejected): a text, or the assistant's answer as one turn, alone or in a
    list (TRL's conversational format: `[{"role": "assistant", "content": ...}]`)."""
    if isinstance(value, str) and not value.lstrip().startswith(("[", "{")):
        return value
    turns = _as_list(value) if not isinstance(value, dict) else [value]
    messages = [_turn(t, k) for k, t in enumerate(turns)]
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ConversationError(f"a completion is a text or one assistant turn; got {len(messages)} turns with "
                                f"roles {[m['role'] for m in messages]}")
    return messages[0]["content"]


# ---------------------------------------------------------------------------------------------- rendering
def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError([("input_features[0].preprocessing.format", "chat data (format: messages) is rendered "
                            "with the base model's chat template, and its tokenizer has none; use an instruct/chat "
                            "model, or put a chat_template into its tokenizer_config.json")])


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def content_spans(text: str, messages: list[dict], header_ends: Optional[dict[int, int]] = None
                  ) -> list[tuple[int, int]]:
    """Character spans of the user and assistant turns' texts in the rendered conversation, searched in order, so
    a reply that repeats the user's words is found in the reply. `header_ends[k]`, where known, is where assistant
    turn k's header ends (its text cannot start before). A template may trim a turn (Llama 3, Gemma): then the
    trimmed text is found. System turns are not searched (templates move them: into the first or the last user
    turn, after a date line), nor is a user turn the template rewrites ((-1, -1) for both); an assistant turn that
    cannot be found raises."""
    spans, cursor = [], 0
    for k, m in enumerate(messages):
        if m["role"] == "system":
            spans.append((-1, -1))
            continue
        if m["role"] == "assistant":
            cursor = max(cursor, (header_ends or {}).get(k, 0))
        start, found = -1, m["content"]
        for candidate in (m["content"], m["content"].strip()):
            start = text.find(candidate, cursor) if candidate else -1
            if start >= 0:
                found = candidate
                break
        if start < 0:
            if m["role"] == "assistant":
                raise ConversationError(f"turn {k}: the chat template does not write the assistant text as given, "
                                        "so its tokens cannot be found")
            spans.append((-1, -1))
            continue
        spans.append((start, start + len(found)))
        cursor = start + len(found)
    return spans


def header_ends(tokenizer, messages: list[dict], text: str) -> dict[int, int]:
    """For each assistant turn k, the length of the conversation before it rendered with the assistant header,
    when that is how the whole conversation begins (true of most templates, not of all: then it is left out)."""
    ends = {}
    for k, m in enumerate(messages):
        if m["role"] == "assistant" and k:
            prefix = render(tokenizer, messages[:k], generation_prompt=True)
            if text.startswith(prefix):
                ends[k] = len(prefix)
    return ends


def special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False))
    return ids


def label_mask(ids: list[int], offsets: list[tuple[int, int]], text_len: int, messages: list[dict],
               spans: list[tuple[int, int]], specials: set[int]) -> np.ndarray:
    """True for the tokens the model learns: those overlapping an assistant turn's text, then every token after it
    up to and including the first special token before the next turn's text (the end-of-turn marker)."""
    mask = np.zeros(len(ids), dtype=bool)
    starts = np.array([a for a, _ in offsets])
    ends = np.array([b for _, b in offsets])
    for k, (m, (a, b)) in enumerate(zip(messages, spans)):
        if m["role"] != "assistant":
            continue
        mask |= (starts < b) & (ends > a)
        limit = next((s for s, _ in spans[k + 1:] if s >= 0), text_len)
        for t in np.flatnonzero((starts >= b) & (starts < limit)):
            mask[t] = True
            if ids[t] in specials:
                break
        else:  # no end-of-turn marker: the turn's closing tokens were text; nothing teaches the model to stop
            mask[(starts >= b) & (starts < limit)] = False
    return mask


def tokenize_conversation(tokenizer, messages: list[dict], specials: Optional[set[int]] = None
                          ) -> tuple[list[int], np.ndarray]:
    """Token ids of the rendered conversation and its target mask. The template writes BOS and friends itself."""
    text = render(tokenizer, messages)
    spans = content_spans(text, messages, header_ends(tokenizer, messages, text))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    specials = special_ids(tokenizer) if specials is None else specials
    return enc["input_ids"], label_mask(enc["input_ids"], enc["offset_mapping"], len(text), messages, spans, specials)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token(s) the template closes an assistant turn with, from a probe conversation: generation
    stops there even when the tokenizer's EOS is another token."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    ids, mask = tokenize_conversation(tokenizer, messages)
    specials = special_ids(tokenizer)
    return sorted({i for i, m in zip(ids, mask) if m and i in specials})


# ------------------------------------------------------------------------------------------- the data set
class ChatData:
    """The conversation column of one config: parsing with row-named errors, tokenization with target masks,
    prompts for prediction."""

    def __init__(self, config):
        self.column = chat_column(config)
        self.system_prompt = config.prompt.system_prompt

    def _parse(self, df: pd.DataFrame, where: str, for_prediction: bool = False) -> list[dict]:
        """{column: conversation, ROW: row label} per row; the first invalid row raises, named."""
        if self.column not in df.columns:
            raise DataError(f"{where}: missing column {self.column!r} (asked for by input_features, format: "
                            f"messages); the data has columns {list(df.columns)}")
        out = []
        for label, value in zip(df.index, df[self.column]):
            try:
                messages = self._with_system(parse_conversation(value))
                if for_prediction:
                    prompt_and_reference(messages)
            except ConversationError as e:
                raise DataError(f"{where}: column {self.column!r}, row {label}: not a usable conversation: {e}") \
                    from None
            out.append({self.column: messages, ROW: label})
        return out

    def _with_system(self, messages: list[dict]) -> list[dict]:
        """prompt.system_prompt goes first in conversations that bring no system turn of their own."""
        if self.system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def records(self, df: pd.DataFrame, where: str = "llm data") -> list[dict]:
        """Every row, each a conversation that prediction can continue; any other row is an error (prediction
        answers every row)."""
        return self._parse(df, where, for_prediction=True)

    def training_records(self, df: pd.DataFrame, where: str, log: Callable[[str], None]) -> list[dict]:
        """The conversations to learn from: those without an assistant turn teach nothing and are dropped."""
        conversations = self._parse(df, where)
        kept = [r for r in conversations if has_assistant_turn(r[self.column])]
        if len(kept) < len(conversations):
            log(f"warning: {where}: dropped {len(conversations) - len(kept)} of {len(conversations)} conversations "
                f"with no assistant turn in column {self.column!r}")
        if not kept and where == "training":
            raise DataError(f"{where}: no conversation in column {self.column!r} has an assistant turn; there is "
                            "nothing to learn")
        return kept

    def reference(self, record: dict) -> Optional[str]:
        try:
            return prompt_and_reference(record[self.column])[1]
        except ConversationError:
            return None

    def tokenize(self, tokenizer, records: list[dict], with_targets: bool, max_len: Optional[int]) -> TokenizedRows:
        require_chat_template(tokenizer)
        if with_targets:
            return self._training_rows(tokenizer, records, max_len)
        return self._prompt_rows(tokenizer, records, max_len)

    def _training_rows(self, tokenizer, records: list[dict], max_len: Optional[int]) -> TokenizedRows:
        """Whole conversations with their masks. Too long: the beginning is kept (later turns go); a row whose
        targets were all cut off is left out (and counted among the truncated rows)."""
        specials = special_ids(tokenizer)
        ids, masks, truncated = [], [], 0
        for record in records:
            try:
                row, mask = tokenize_conversation(tokenizer, record[self.column], specials)
            except (ConversationError, TemplateError) as e:
                raise self._row_error(record, e) from None
            if max_len and len(row) > max_len:
                row, mask, truncated = row[:max_len], mask[:max_len], truncated + 1
                if not mask[1:].any():
                    continue
            ids.append(np.asarray(row, dtype=np.int64))
            masks.append(mask)
        first = [int(np.argmax(m)) if m.any() else len(m) for m in masks]
        return TokenizedRows(ids, np.asarray(first, dtype=np.int64), truncated, masks=masks)

    def _prompt_rows(self, tokenizer, records: list[dict], max_len: Optional[int]) -> TokenizedRows:
        """Each conversation up to its last user turn plus the assistant header; too long: the end is kept."""
        ids, truncated = [], 0
        for record in records:
            try:
                messages, _ = prompt_and_reference(record[self.column])
                text = render(tokenizer, messages, generation_prompt=True)
            except (ConversationError, TemplateError) as e:
                raise self._row_error(record, e) from None
            row = tokenizer(text, add_special_tokens=False)["input_ids"]
            if max_len and len(row) > max_len:
                row, truncated = row[len(row) - max_len:], truncated + 1
            ids.append(np.asarray(row, dtype=np.int64))
        return TokenizedRows(ids, np.asarray([len(r) for r in ids], dtype=np.int64), truncated)

    # preference data (trainer.type dpo / orpo / kto): the conversation is the prompt, the completions are its answer
    def prompt_records(self, df: pd.DataFrame, where: str) -> list[dict]:
        """Each row's cells, its conversation parsed: the prompt, which must end with a user turn."""
        out = []
        for record, parsed in zip(df.to_dict("records"), self._parse(df, where)):
            if parsed[self.column][-1]["role"] != "user":
                raise DataError(f"{where}: column {self.column!r}, row {parsed[ROW]}: a preference prompt must end "
                                "with a user turn; the chosen and rejected completions are the assistant's answer")
            out.append({**record, **parsed})
        return out

    def completion_rows(self, tokenizer, records: list[dict], column: str, max_len: Optional[int]) -> TokenizedRows:
        """Each prompt conversation with the row's completion in `column` as the assistant's turn, rendered with
        the chat template. The target is the completion's tokens and the template's end-of-turn token (found by
        offsets, as in chat fine-tuning); everything before it is the prompt. Too long: the prompt keeps its end
        and the completion at least half the budget, as single-turn rows."""
        require_chat_template(tokenizer)
        specials = special_ids(tokenizer)
        ids, plens, truncated = [], [], 0
        for record in records:
            try:
                answer = {"role": "assistant", "content": completion_text(record.get(column))}
                row, mask = tokenize_conversation(tokenizer, record[self.column] + [answer], specials)
            except (ConversationError, TemplateError) as e:
                raise DataError(f"column {column!r}, row {record.get(ROW, '?')}: not a usable completion: {e}") \
                    from None
            end = len(mask) - int(np.argmax(mask[::-1]))  # one past the completion's last target token
            before = np.flatnonzero(~mask[:end])
            start = int(before[-1]) + 1 if len(before) else 0  # the completion's first token (earlier turns: prompt)
            prompt, target, cut = truncate(list(row[:start]), list(row[start:end]), max_len)
            truncated += cut
            ids.append(np.asarray(prompt + target, dtype=np.int64))
            plens.append(len(prompt))
        return TokenizedRows(ids, np.asarray(plens, dtype=np.int64), truncated)

    def prompt_lengths(self, tokenizer, records: list[dict]) -> list[int]:
        """Tokens of each prompt conversation with the assistant header (to count prompts over the limit)."""
        return [len(tokenizer(render(tokenizer, r[self.column], generation_prompt=True),
                              add_special_tokens=False)["input_ids"]) for r in records]

    def _row_error(self, record: dict, error: Exception) -> DataError:
        what = "the chat template refuses it" if isinstance(error, TemplateError) else "not a usable conversation"
        return DataError(f"column {self.column!r}, row {record.get(ROW, '?')}: {what}: {error}")

    def stop_at_end_of_turn(self, generation_config, tokenizer) -> None:
        """Add the template's end-of-turn token to the generation's stop tokens."""
        eos = generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        for i in end_of_turn_ids(tokenizer):
            if i not in eos:
                eos.append(i)
        generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
