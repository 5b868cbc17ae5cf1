"""OpenAI-compatible routes for llm models: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`.

A request becomes a GenerationJob (one prompt per choice) that the batcher runs together with the other requests
waiting; its text comes back as events, sent on as server-sent events when `stream` is true, or gathered into one
answer. Settings a request leaves out come from the model's `generation:` config (greedy by default), not from
OpenAI's defaults: a fine-tuned model answers the way `cadenza predict` does unless asked otherwise."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Optional

from fastapi import APIRouter
from starlette.responses import StreamingResponse

from .batcher import Batcher, QueueFull
from .errors import HttpError
from .job import Channel, Delta, Failed, Finished, GenerationJob, Sampling
from .metrics import Metrics
from .openai_schemas import ChatCompletionRequest, CompletionRequest, Decoding
from .prompts import chat_prompt_ids, check_fits, completion_prompt_ids
from .settings import ServeSettings

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sampling(request: Decoding, section, settings: ServeSettings) -> Sampling:
    """The request's decoding settings, bounded; what it omits comes from the config's `generation:` section."""
    max_tokens = request.requested_max_tokens()
    if max_tokens is None:
        max_tokens = min(section.max_new_tokens, settings.max_tokens_limit)
    elif max_tokens > settings.max_tokens_limit:
        raise HttpError(400, f"max_tokens {max_tokens} is above this server's limit of {settings.max_tokens_limit} "
                        "(--max_tokens_limit)", param="max_tokens")
    stop = request.stop_strings()
    if len(stop) > settings.max_stop:
        raise HttpError(400, f"stop: at most {settings.max_stop} strings, got {len(stop)}", param="stop")
    if request.temperature is not None:
        temperature = request.temperature
    else:
        temperature = (section.temperature if section.temperature is not None else 1.0) if section.do_sample else 0.0
    return Sampling(max_tokens=max_tokens, temperature=temperature,
                    top_p=request.top_p if request.top_p is not None else (section.top_p or 1.0),
                    top_k=request.top_k if request.top_k is not None else (section.top_k or 0),
                    stop=stop, seed=request.seed)


class Completions:
    """The request-to-answer path shared by chat and plain completions: checks, the job, its answer or stream."""

    def __init__(self, llm, settings: ServeSettings, batcher: Batcher, metrics: Metrics, tokenizer,
                 context: Optional[int]):
        self.llm, self.settings, self.batcher, self.metrics = llm, settings, batcher, metrics
        self.tokenizer, self.context = tokenizer, context

    def check_model(self, request: Decoding) -> None:
        if request.model is not None and request.model != self.settings.model_name:
            raise HttpError(404, f"model {request.model!r} is not served here; this server serves "
                            f"{self.settings.model_name!r} (GET /v1/models)", param="model")

    def submit(self, request: Decoding, prompts: list[list[int]], param: str) -> GenerationJob:
        """One job with n rows per prompt; choice i*n + j is prompt i's j-th completion."""
        if len(prompts) * request.n > self.settings.max_batch_rows:
            raise HttpError(400, f"{len(prompts)} prompt(s) x n={request.n} is more than the "
                            f"{self.settings.max_batch_rows} completions one request may ask for (--max_batch_size)",
                            param="n")
        decoding = sampling(request, self.llm.config.generation, self.settings)
        for ids in prompts:
            check_fits(ids, decoding.max_tokens, self.context, param)
        job = GenerationJob([ids for ids in prompts for _ in range(request.n)], decoding, Channel())
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise HttpError(503, f"server busy: {e}; retry later", headers={"Retry-After": "1"}) from None
        return job

    async def answer(self, job: GenerationJob, prompt_tokens: int) -> tuple[list[str], list[str], dict]:
        """(texts, finish reasons, usage) once every choice is complete, within the time limit."""
        texts, reasons, generated = [""] * job.rows, [""] * job.rows, 0
        deadline = time.monotonic() + self.settings.timeout_s
        left = job.rows
        try:
            while left:
                event = await job.channel.get(max(0.0, deadline - time.monotonic()))
                if isinstance(event, Delta):
                    texts[event.index] += event.text
                elif isinstance(event, Finished):
                    reasons[event.index], left = event.reason, left - 1
                    generated += event.completion_tokens
                elif isinstance(event, Failed):
                    raise HttpError(500, event.message)
        except asyncio.TimeoutError:
            raise HttpError(504, f"no complete answer within {self.settings.timeout_s:g} s (--prediction_timeout); "
                            "ask for fewer max_tokens or raise the limit") from None
        finally:
            job.cancel()  # a no-op when complete; otherwise the worker drops the rows at its next step
        return texts, reasons, self._usage(prompt_tokens, generated)

    async def stream(self, job: GenerationJob, prompt_tokens: int, chunks: "Chunks",
                     include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: each choice's opening chunk, its text as it comes and its end; then the usage
        chunk when asked for, and `data: [DONE]`."""
        generated, left = 0, job.rows
        try:
            for i in range(job.rows):
                opening = chunks.opening(i)
                if opening is not None:
                    yield _sse(opening)
            while left:
                event = await job.channel.get(self.settings.timeout_s)
                if isinstance(event, Delta):
                    yield _sse(chunks.piece(event.index, event.text, None))
                elif isinstance(event, Finished):
                    left, generated = left - 1, generated + event.completion_tokens
                    yield _sse(chunks.piece(event.index, "", event.reason))
                elif isinstance(event, Failed):
                    yield _sse({"error": {"message": event.message, "type": "server_error", "code": 500}})
                    return
            usage = self._usage(prompt_tokens, generated)  # (counted in /metrics whether or not it is sent)
            if include_usage:
                yield _sse(chunks.usage(usage))
            yield "data: [DONE]\n\n"
        except asyncio.TimeoutError:
            yield _sse({"error": {"message": f"no new text within {self.settings.timeout_s:g} s "
                                  "(--prediction_timeout)", "type": "timeout", "code": 504}})
        finally:  # also when the client disconnects: starlette cancels this generator
            job.cancel()

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generated_tokens.inc(completion_tokens)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Chunks:
    """The JSON objects of a chat completion stream (`chat.completion.chunk`)."""

    def __init__(self, head: dict):
        self.head = {**head, "object": "chat.completion.chunk"}

    def opening(self, i: int) -> Optional[dict]:
        return {**self.head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]}

    def piece(self, i: int, text: str, finish_reason: Optional[str]) -> dict:
        return {**self.head, "choices": [{"index": i, "delta": {"content": text} if text else {},
                                          "finish_reason": finish_reason}]}

    def usage(self, usage: dict) -> dict:
        return {**self.head, "choices": [], "usage": usage}


class CompletionChunks(Chunks):
    """The JSON objects of a plain completion stream (`text_completion`, no opening chunk)."""

    def __init__(self, head: dict):
        self.head = {**head, "object": "text_completion"}

    def opening(self, i: int) -> Optional[dict]:
        return None

    def piece(self, i: int, text: str, finish_reason: Optional[str]) -> dict:
        return {**self.head, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def _wants_usage(request: Decoding) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


def router(llm, completions: Completions, settings: ServeSettings) -> APIRouter:
    routes = APIRouter(prefix="/v1")
    started = int(time.time())
    name = settings.model_name

    @routes.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started,
                                            "owned_by": "cadenza"}]}

    @routes.post("/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        completions.check_model(request)
        if not llm.builder.use_chat:
            raise HttpError(400, "this model does not use a chat template (prompt.use_chat_template is false or its "
                            "tokenizer has none): use /v1/completions, or /predict with its input features",
                            param="messages")
        ids = chat_prompt_ids(completions.tokenizer, request.messages, llm.config.prompt.system_prompt)
        job = completions.submit(request, [ids], "messages")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if request.stream:
            return _event_stream(completions.stream(job, len(ids), Chunks(head), _wants_usage(request)))
        texts, reasons, usage = await completions.answer(job, len(ids))
        return {**head, "object": "chat.completion",
                "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                             "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))],
                "usage": usage}

    @routes.post("/completions")
    async def text_completions(request: CompletionRequest):
        completions.check_model(request)
        prompts = [completion_prompt_ids(completions.tokenizer, p) for p in request.prompts()]
        job = completions.submit(request, prompts, "prompt")
        prompt_tokens = sum(len(p) for p in prompts)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if request.stream:
            return _event_stream(completions.stream(job, prompt_tokens, CompletionChunks(head), _wants_usage(request)))
        texts, reasons, usage = await completions.answer(job, prompt_tokens)
        return {**head, "object": "text_completion",
                "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                            for i, (t, r) in enumerate(zip(texts, reasons))], "usage": usage}

    return routes
