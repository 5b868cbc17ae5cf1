"""The OpenAI request bodies this server accepts, validated strictly: unknown fields and wrong types are 400s
that name the field (a string is not silently read as a number). Fields of OpenAI's API that this server does
not implement (tools, logprobs, penalties, ...) are named as such rather than as unknown."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

NOT_IMPLEMENTED = {
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "logprobs", "top_logprobs",
    "logit_bias", "frequency_penalty", "presence_penalty", "response_format", "audio", "modalities", "prediction",
    "reasoning_effort", "service_tier", "store", "metadata", "web_search_options", "best_of", "echo", "suffix",
    "verbosity", "safety_identifier", "prompt_cache_key",
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str  # OpenAI's list of text parts is accepted and joined (see _joined_text_parts)
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _joined_text_parts(cls, content):
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, "
                                     f"not {kind!r}")
            return "".join(part["text"] for part in content)
        return content


class StreamOptions(Strict):
    include_usage: bool = False


class Decoding(Strict):
    """What chat and plain completions share. Omitted settings come from the model's `generation:` config."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0, description="not OpenAI's; vLLM's extension (0: no limit)")
    n: int = Field(1, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # OpenAI's end-user id: accepted, not used

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens


class ChatCompletionRequest(Decoding):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name for max_tokens

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(Decoding):
    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def _at_least_one(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("give a prompt, or a list of at least one")
        return prompt

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
