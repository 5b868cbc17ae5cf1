"""Prompt token ids for the OpenAI routes, made the way the model saw its training prompts.

Chat completions: the model's chat template over the request's messages, with the configured
`prompt.system_prompt` first when the request brings no system message, then the assistant header; no further
special tokens (the template writes them), as `LlmModel.generate` does. Completions: the prompt text is continued
as given (no template), with the tokenizer's own special tokens (e.g. a BOS)."""

from __future__ import annotations

from typing import Optional

from .errors import HttpError
from .openai_schemas import ChatMessage

SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer name for the system role


def chat_prompt_ids(tokenizer, messages: list[ChatMessage], system_prompt: Optional[str]) -> list[int]:
    turns = [{"role": "system" if m.role in SYSTEM_ROLES else m.role, "content": m.content} for m in messages]
    if system_prompt and not any(t["role"] == "system" for t in turns):
        turns.insert(0, {"role": "system", "content": system_prompt})
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template itself refuses the conversation (e.g. roles that must alternate)
        raise HttpError(400, f"the model's chat template rejects these messages: {e}", param="messages") from None
    return _non_empty(tokenizer(text, add_special_tokens=False)["input_ids"], "messages")


def completion_prompt_ids(tokenizer, prompt: str) -> list[int]:
    return _non_empty(tokenizer(prompt, add_special_tokens=True)["input_ids"], "prompt")


def _non_empty(ids: list[int], param: str) -> list[int]:
    if not ids:
        raise HttpError(400, f"{param}: the prompt is empty (no tokens to continue)", param=param)
    return ids


def context_length(model) -> Optional[int]:
    """The longest sequence the model's positions cover, when its config says."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def check_fits(prompt_ids: list[int], max_tokens: int, limit: Optional[int], param: str) -> None:
    if limit is not None and len(prompt_ids) + max_tokens > limit:
        raise HttpError(400, f"{param}: {len(prompt_ids)} prompt tokens + max_tokens {max_tokens} exceed the model's "
                        f"context of {limit} tokens; shorten the prompt or lower max_tokens", param=param)
