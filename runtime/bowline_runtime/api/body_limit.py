"""`--max-request-body-bytes`: refuse oversized bodies with 413 before reading them.

A declared Content-Length over the limit is answered at once, without reading a byte of the
body; a chunked body is counted as it arrives and refused as soon as it passes the limit. Either
way one huge request cannot hold the event loop (parsing, tokenising) for seconds.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bowline_runtime.api.errors import APIError


def _message(limit: int) -> str:
    return (
        f"the request body is larger than this server accepts ({limit} bytes); send a shorter prompt, "
        "or start the server with a higher --max-request-body-bytes"
    )


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` when a chunked body passes the limit.

    An HTTPException because FastAPI re-raises those from body parsing (anything else it turns
    into a 400), and the app's HTTPException handler then writes the OpenAI error body.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, _message(limit))


def too_large(limit: int) -> APIError:
    return APIError(_message(limit), 413, code="request_too_large")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await too_large(self.max_bytes).response()(scope, receive, send)
                return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await too_large(self.max_bytes).response()(scope, receive, send)
