"""Prompts: the user's template (or a default one from `prompt.task`), few-shot context, and the chat template.

Placeholders: `{column}` for any input column, `{__task__}` (prompt.task), `{__sample__}` (the row's input columns
as JSON), `{__context__}` (retrieved training examples for few-shot). The config loader already rejected
placeholders naming no input and templates that mention the output column.
"""

from __future__ import annotations

import json
import string
from typing import Optional

from ..config.schema import CadenzaConfig

DEFAULT_TASK_TEMPLATE = "{__context__}Task: {__task__}\n\nInput: {__sample__}\n\nAnswer:"
CONTEXT_HEADER = "Examples:\n\n"


def placeholders(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


class PromptBuilder:
    """Renders one row's prompt text (chat-templated when that applies) and its target text."""

    def __init__(self, config: CadenzaConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.inputs = [f.column or f.name for f in config.input_features]
        out = config.output_features[0]
        self.output = out.column or out.name
        p = config.prompt
        self.template = p.template or (DEFAULT_TASK_TEMPLATE if p.task else None)
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if p.use_chat_template and not has_chat:
            raise ValueError("prompt.use_chat_template is true but the base model's tokenizer has no chat template")
        self.use_chat = has_chat if p.use_chat_template is None else p.use_chat_template
        self.wants_context = bool(self.template and "__context__" in placeholders(self.template))

    # ---------------------------------------------------------------------------------------------- text
    def user_text(self, row: dict, context: str = "") -> str:
        """The prompt before any chat template. `context` is the few-shot block ("" when there is none)."""
        if self.template is None:
            if len(self.inputs) == 1:
                body = _text(row.get(self.inputs[0]))
            else:
                body = "\n".join(f"{c}: {_text(row.get(c))}" for c in self.inputs)
            return (context + body) if context else body
        values = {c: _text(row.get(c)) for c in self.inputs}
        values["__task__"] = self.config.prompt.task or ""
        values["__sample__"] = json.dumps({c: row.get(c) for c in self.inputs}, ensure_ascii=False, default=str)
        values["__context__"] = context
        text = self.template.format_map(values)
        if context and not self.wants_context:
            text = context + text  # the template has no slot for examples: they go first
        return text

    def prompt(self, row: dict, context: str = "") -> str:
        """The full prompt the model continues (with the chat template's generation header when used)."""
        text = self.user_text(row, context)
        if not self.use_chat:
            return text
        messages = []
        if self.config.prompt.system_prompt:
            messages.append({"role": "system", "content": self.config.prompt.system_prompt})
        messages.append({"role": "user", "content": text})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def target(self, prompt: str, response) -> str:
        """The response text the model learns. A plain prompt ending in a non-space (e.g. "Answer:") gets a
        separating space, as a writer would put one; chat headers already end in a newline."""
        text = _text(response)
        if not self.use_chat and prompt and not prompt[-1].isspace() and text and not text[0].isspace():
            return " " + text
        return text

    def example(self, row: dict) -> str:
        """One few-shot example for `{__context__}`: the row's prompt body and its answer."""
        return f"{self.user_text(row)}{self.target(self.user_text(row), row.get(self.output))}\n\n"

    def context(self, rows: list[dict]) -> str:
        return (CONTEXT_HEADER + "".join(self.example(r) for r in rows)) if rows else ""

    @property
    def add_special_tokens(self) -> bool:
        """Chat templates write BOS and friends into the text themselves; plain prompts get the tokenizer's."""
        return not self.use_chat

    def metadata(self) -> dict:
        return {"template": self.template, "use_chat_template": self.use_chat, "inputs": self.inputs,
                "output": self.output, "system_prompt": self.config.prompt.system_prompt}


def _text(value) -> str:
    if value is None:
        return ""
    try:
        import pandas as pd

        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    return str(value)


def row_dicts(df) -> list[dict]:
    return df.to_dict("records")


def check_template(template: Optional[str], inputs: list[str]) -> None:
    """Render-time guard for templates that reach us without load_config (e.g. a hand-built config)."""
    if not template:
        return
    for ph in placeholders(template):
        if ph not in set(inputs) | {"__task__", "__sample__", "__context__"}:
            raise ValueError(f"prompt.template placeholder {{{ph}}} names no input feature; inputs are {inputs}")
