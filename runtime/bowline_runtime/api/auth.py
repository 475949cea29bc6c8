"""`--api-key`: every route except the probes needs `Authorization: Bearer KEY`.

A pure ASGI middleware (not BaseHTTPMiddleware) so streaming responses and disconnect detection
pass through untouched. /health, /metrics and /version stay open: kubelets and Prometheus
scrapers carry no key.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from bowline_runtime.api.errors import APIError

OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/ping"})


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        if not secrets.compare_digest(given, self._expected):
            error = APIError(
                "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                401,
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)
