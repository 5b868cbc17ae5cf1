"""The FastAPI app of `cadenza serve`: a loaded `Model`, its routes, the worker that owns generation, the guards
and the error answers.

Every model type gets Ludwig's routes (`/`, `/predict`, `/batch_predict`) and `/metrics`; llm models also get
the OpenAI routes under /v1, whose requests are batched by one worker thread (cadenza.serve.batcher). The model
is used by two threads, the prediction thread and the generation worker, never at the same time (`model_lock`).

Middleware, outermost first: metrics (counts every answer), CORS (when origins are allowed), API key (when one
is set), body size limit."""

from __future__ import annotations

import copy
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from ..llm.generate import hf_generation_config
from ..llm.loss import causal_lm_of
from . import ludwig_routes, openai_routes
from .batcher import Batcher
from .decode import BatchGenerator
from .errors import HttpError, error_response
from .guards import ApiKeyMiddleware, BodyLimitMiddleware
from .metrics import Metrics, MetricsMiddleware
from .openai_schemas import NOT_IMPLEMENTED
from .predictor import Predictor
from .prompts import context_length
from .settings import ServeSettings

log = logging.getLogger("cadenza.serve")
MAX_REPORTED_PROBLEMS = 5


def build_app(model, settings: ServeSettings) -> FastAPI:
    """model: a loaded cadenza.api.Model."""
    model_lock = threading.Lock()
    predictor = Predictor(model, model_lock, timeout_s=settings.timeout_s, max_queue=settings.max_queue)
    batcher = None
    paths: set[str] = set()
    waiting = lambda: predictor.pending + (batcher.queued() if batcher else 0)  # noqa: E731
    metrics = Metrics(routes=lambda: paths, queue_length=waiting)

    @asynccontextmanager
    async def lifespan(_app):
        if batcher:
            batcher.start()
        yield
        if batcher:
            batcher.stop()
        predictor.close()

    # no /docs or /openapi.json: a server meant to be exposed shows no more than its routes answer
    app = FastAPI(title="Cadenza", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    routers = [ludwig_routes.router(model, predictor)]
    if model.config.model_type == "llm":
        batcher, completions = _generation(model.model, settings, model_lock, metrics)
        routers.append(openai_routes.router(model.model, completions, settings))
    else:
        _no_openai_routes(app, model.config.model_type)
    for router in routers:
        app.include_router(router)
        paths.update(route.path for route in router.routes)

    @app.get("/metrics")
    async def prometheus_metrics():
        return metrics.response()

    paths.add("/metrics")
    _error_answers(app)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _generation(llm, settings: ServeSettings, model_lock: threading.Lock, metrics: Metrics):
    """The batcher and the completions path of an llm. The generation worker and the event loop each get their own
    copy of the tokenizer: a fast tokenizer is not safe to use from two threads at once, and the prediction thread
    uses the model's own."""
    if llm.config.generation.num_beams > 1:
        log.warning("generation.num_beams %d: the server decodes greedily or by sampling, one beam per choice",
                    llm.config.generation.num_beams)
    config = hf_generation_config(llm.config.generation, llm.tokenizer,
                                  base=getattr(causal_lm_of(llm.model), "generation_config", None),
                                  do_sample=False, num_beams=1, num_return_sequences=1)
    generate = BatchGenerator(llm.model, copy.deepcopy(llm.tokenizer), config)

    def run_batch(jobs) -> None:
        metrics.batch_rows.observe(sum(job.rows for job in jobs))
        with model_lock:
            generate(jobs)

    batcher = Batcher(run_batch, max_rows=settings.max_batch_rows, wait_s=settings.batch_wait_ms / 1000,
                      max_queue=settings.max_queue)
    completions = openai_routes.Completions(llm, settings, batcher, metrics, copy.deepcopy(llm.tokenizer),
                                            context_length(causal_lm_of(llm.model)))
    return batcher, completions


def _no_openai_routes(app: FastAPI, model_type: str) -> None:
    @app.api_route("/v1/{rest:path}", methods=["GET", "POST"])
    async def not_for_this_model(rest: str):
        raise HttpError(404, f"/v1/{rest}: the OpenAI routes serve llm models; this is an {model_type} model "
                        "(use POST /predict or /batch_predict)")


def _error_answers(app: FastAPI) -> None:
    @app.exception_handler(HttpError)
    async def http_error(request: Request, e: HttpError):
        return error_response(request.url.path, e.status, e.message, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        problems = [_problem(error) for error in e.errors()]
        message = "; ".join(dict.fromkeys(problems[:MAX_REPORTED_PROBLEMS]))
        if len(problems) > MAX_REPORTED_PROBLEMS:
            message += f"; and {len(problems) - MAX_REPORTED_PROBLEMS} more"
        first = [str(x) for x in e.errors()[0]["loc"][1:]] if e.errors() else []
        return error_response(request.url.path, 400, message, param=".".join(first) or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, e: StarletteHTTPException):
        return error_response(request.url.path, e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):  # starlette re-raises it afterwards: uvicorn logs it
        return error_response(request.url.path, 500, f"internal error ({type(e).__name__}); the server log has "
                              "the details")


def _problem(error: dict) -> str:
    """One validation problem as a sentence naming the field (`messages.0.role`), from pydantic's error."""
    loc = [str(x) for x in error["loc"] if x != "body"]
    field = ".".join(loc)
    kind = error["type"]
    if kind == "json_invalid":
        return f"malformed JSON: {error.get('ctx', {}).get('error', error['msg'])}"
    if kind == "extra_forbidden":
        name = loc[-1] if loc else field
        if name in NOT_IMPLEMENTED:
            return f"'{name}' is not supported by this server"
        return f"unknown field '{field}'"
    if not loc:  # the body as a whole
        return "the body must be a JSON object (with Content-Type: application/json)" + (
            ", and it is empty" if kind == "missing" else "")
    if kind == "missing":
        return f"missing field '{field}'"
    return f"{field}: {error['msg']}"
