"""What `cadenza serve` lets a client do: every limit in one place, with the defaults the CLI shows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

API_KEY_ENV = "CADENZA_API_KEY"  # like vLLM's VLLM_API_KEY: a key that stays out of `ps` and shell history


@dataclass(frozen=True)
class ServeSettings:
    model_name: str                       # the name /v1/models lists and requests may give as `model`
    api_key: Optional[str] = None         # every route but `GET /` wants `Authorization: Bearer <key>`
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no cross-origin browser calls
    timeout_s: float = 30.0               # longest wait for a prediction or completion (between events when streamed)
    max_request_bytes: int = 1 << 20      # request bodies above this get 413
    max_tokens_limit: int = 1024          # the most tokens one completion may ask for
    max_batch_rows: int = 16              # rows (prompts x n) generated together in one forward pass
    batch_wait_ms: float = 10.0           # quiet time that ends a burst of requests the idle worker batches
    max_queue: int = 64                   # requests waiting for the model; more get 503
    max_stop: int = 4                     # stop strings per request (OpenAI's limit)

    @property
    def max_connections(self) -> int:
        """Open connections uvicorn accepts before answering 503: enough for a full queue plus a running batch."""
        return 4 * self.max_queue + self.max_batch_rows
