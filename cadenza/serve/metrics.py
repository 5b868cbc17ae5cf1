"""`GET /metrics` in Prometheus' text format: requests by route and status, latency, tokens, queue and batch sizes.

Each app has its own registry (not prometheus_client's global one), so two servers in one process (tests) do not
share counts. Routes are labelled by their path when the app has that route and "other" otherwise, so random paths
cannot grow the number of series without bound."""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.responses import Response

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self, routes: Callable[[], set[str]], queue_length: Callable[[], float]):
        self.registry = CollectorRegistry(auto_describe=True)
        self._routes = routes
        self.requests = Counter("cadenza_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("cadenza_request_duration_seconds", "Time from request to the end of the answer "
                                 "(of the whole stream, when streamed)", ["route"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.prompt_tokens = Counter("cadenza_prompt_tokens", "Prompt tokens of completed generation requests",
                                     registry=self.registry)
        self.generated_tokens = Counter("cadenza_generated_tokens", "Tokens generated (all choices)",
                                        registry=self.registry)
        self.batch_rows = Histogram("cadenza_batch_rows", "Rows (prompts x n) generated together in one batch",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        queue = Gauge("cadenza_queue_length", "Requests waiting for the model", registry=self.registry)
        queue.set_function(queue_length)

    def route_label(self, path: str) -> str:
        return path if path in self._routes() else "other"

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts every answer (401s and 413s of the outer guards included: it wraps them) and times it."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500  # a crash before any answer counts as the 500 uvicorn sends

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = self.metrics.route_label(scope["path"])
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
