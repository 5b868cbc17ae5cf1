"""The `cadenza serve` command: Ludwig's flags (-m, -p, -H, -ao, -t) plus the limits that make a server safe to
expose. Only argparse is imported at module level, so `cadenza --help` does not load the web stack."""

from __future__ import annotations

import argparse
import os

from .settings import API_KEY_ENV, ServeSettings

DEFAULTS = ServeSettings(model_name="")


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


POSITIVE_INT, POSITIVE_FLOAT = _positive(int), _positive(float)


def register_cli(subparsers) -> argparse.ArgumentParser:
    d = DEFAULTS
    p = subparsers.add_parser(
        "serve", help="serve a trained model over HTTP (Ludwig's REST routes; OpenAI-compatible ones for llm)",
        description="Serve a trained model: GET / (health), POST /predict, POST /batch_predict, GET /metrics; for "
                    "llm models also the OpenAI-compatible GET /v1/models, POST /v1/chat/completions and "
                    "POST /v1/completions, with concurrent requests batched together. See docs/serve.md.")
    p.add_argument("-m", "--model_path", required=True, help="run folder or its model/ folder")
    p.add_argument("-p", "--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("-H", "--host", default="0.0.0.0",
                   help="interface to listen on (default: 0.0.0.0, every interface; 127.0.0.1: this machine only)")
    p.add_argument("-ao", "--allowed_origins", nargs="*", default=[],
                   help="origins allowed to make cross-origin (browser) requests; '*' allows any")
    p.add_argument("-t", "--prediction_timeout", type=POSITIVE_FLOAT, default=d.timeout_s,
                   help=f"seconds a request may wait for its prediction or completion, answering 504 after; for a "
                        f"streamed completion, the longest wait between two pieces of text (default: {d.timeout_s:g})")
    p.add_argument("--api_key", default=None,
                   help=f"require 'Authorization: Bearer <key>' on every route but GET / (default: ${API_KEY_ENV})")
    p.add_argument("--served_model_name", default=None,
                   help="the model name /v1/models lists and requests give as `model` (default: --model_path)")
    p.add_argument("--max_batch_size", type=POSITIVE_INT, default=d.max_batch_rows,
                   help=f"most completions generated together in one batch (default: {d.max_batch_rows})")
    p.add_argument("--batch_wait_ms", type=float, default=d.batch_wait_ms,
                   help=f"an idle server batches a burst of requests once this many milliseconds pass without a "
                        f"new one, at most 10 times this after the first (default: {d.batch_wait_ms:g})")
    p.add_argument("--max_queue", type=POSITIVE_INT, default=d.max_queue,
                   help=f"requests that may wait for the model; more get 503 (default: {d.max_queue})")
    p.add_argument("--max_tokens_limit", type=POSITIVE_INT, default=d.max_tokens_limit,
                   help=f"the largest max_tokens a request may ask for (default: {d.max_tokens_limit})")
    p.add_argument("--max_request_bytes", type=POSITIVE_INT, default=d.max_request_bytes,
                   help=f"largest request body; larger ones get 413 (default: {d.max_request_bytes})")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p


def settings_from(args: argparse.Namespace) -> ServeSettings:
    return ServeSettings(model_name=args.served_model_name or args.model_path,
                         api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                         allowed_origins=tuple(args.allowed_origins or ()), timeout_s=args.prediction_timeout,
                         max_request_bytes=args.max_request_bytes, max_tokens_limit=args.max_tokens_limit,
                         max_batch_rows=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                         max_queue=args.max_queue)


def cmd_serve(args: argparse.Namespace) -> None:
    from .server import serve

    serve(args.model_path, settings_from(args), host=args.host, port=args.port, log_level=args.log_level)
