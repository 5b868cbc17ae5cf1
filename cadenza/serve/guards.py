"""What keeps a server that others can reach safe: the API key, the request size limit, and a warning when it
listens on every interface without a key. Both guards are plain ASGI middleware, so they answer before any route
(or FastAPI's parsing) sees the request."""

from __future__ import annotations

import secrets
from typing import Optional

from .errors import error_response

HEALTH_PATH = "/"
ALL_INTERFACES = {"0.0.0.0", "::", ""}


def exposure_warning(host: str, api_key: Optional[str]) -> Optional[str]:
    if host in ALL_INTERFACES and not api_key:
        return (f"warning: listening on all interfaces ({host or '*'}) without an API key: anyone who can reach this "
                "machine can use the model. Set --api_key (or CADENZA_API_KEY), or listen on -H 127.0.0.1")
    return None


class ApiKeyMiddleware:
    """Every route but the health check wants `Authorization: Bearer <key>` (compared in constant time).
    CORS preflights (OPTIONS) carry no credentials by design; the CORS middleware outside this one answers them."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["path"] == HEALTH_PATH and scope["method"] in ("GET", "HEAD")):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not secrets.compare_digest(given, self.expected):
            what = "wrong API key" if given else "missing API key"
            response = error_response(scope["path"], 401, f"{what}: send the header 'Authorization: Bearer <key>'",
                                      headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Request bodies above `limit` bytes get 413. The body is read here (at most limit + 1 bytes are held), so a
    client that sends no Content-Length, or a false one, is stopped as well."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left; let the app see that
                chunks.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._too_large(scope, receive, send)
            chunks.append(message)
            if not message.get("more_body", False):
                break

        async def replay():
            return chunks.pop(0) if chunks else await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error_response(scope["path"], 413, f"request body larger than {self.limit} bytes "
                                  "(--max_request_bytes)")
        return await response(scope, receive, send)
