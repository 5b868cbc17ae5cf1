"""The one exception a route raises to answer with an error, and how errors look on the wire.

/v1 routes answer OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, which the `openai` client
turns into its exception classes; Ludwig's routes answer Ludwig's `{"error": message}`."""

from __future__ import annotations

from typing import Optional

from starlette.responses import JSONResponse

OPENAI_PREFIX = "/v1"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 503: "server_busy",
               504: "timeout"}


class HttpError(Exception):
    """An answer with this status and message; `param` names the request field at fault (OpenAI's `param`)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_response(path: str, status: int, message: str, param: Optional[str] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
    if path.startswith(OPENAI_PREFIX):
        body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                          "code": status}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)
