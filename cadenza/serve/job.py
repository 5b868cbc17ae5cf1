"""A generation request as the worker thread sees it, and the events that carry its text back to the request.

The route (on the event loop) creates a `GenerationJob` with a `Channel`; the worker thread (cadenza.serve.batcher)
runs it inside a batch and calls `job.deliver(event)` as text appears; the route reads the events from the channel,
streamed or collected."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass(frozen=True)
class Sampling:
    """How one request's rows are decoded. temperature 0 is greedy decoding (top_p and top_k then do nothing)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None


@dataclass(frozen=True)
class Delta:
    """New text of choice `index`."""

    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    """Choice `index` is complete: reason "stop" (end of sequence or a stop string) or "length" (max_tokens)."""

    index: int
    reason: str
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The batch this job was in failed; no more events follow."""

    message: str


Event = Union[Delta, Finished, Failed]


class Channel:
    """Events from the worker thread to one request's coroutine, through that coroutine's event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is stopping and nobody is waiting any more
            pass

    async def get(self, timeout_s: float) -> Event:
        """The next event; asyncio.TimeoutError when none comes within timeout_s."""
        return await asyncio.wait_for(self._queue.get(), timeout_s)


@dataclass
class GenerationJob:
    """One request: a prompt (token ids) per choice, its decoding settings and where its events go."""

    prompts: list[list[int]]
    sampling: Sampling
    channel: Channel
    cancelled: bool = field(default=False)  # set by the request (client gone, timeout); the worker drops its rows

    @property
    def rows(self) -> int:
        return len(self.prompts)

    def deliver(self, event: Event) -> None:
        if not self.cancelled:
            self.channel.put(event)

    def cancel(self) -> None:
        self.cancelled = True
