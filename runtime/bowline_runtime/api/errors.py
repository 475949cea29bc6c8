"""Every failure leaves the server as OpenAI's error body, `{"error": {message, type, param, code}}`.

Clients (the OpenAI SDK, LangChain, curl scripts) branch on the status code and print `message`,
so messages say what to change. Client mistakes are RequestRejected (or pydantic validation
errors) and become 400; every other exception is logged with a request id and answered with a
500 that names that id. A stack trace never reaches the client.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bowline_runtime.api.protocol import ErrorInfo, ErrorResponse
from bowline_runtime.engine.errors import RequestRejected

logger = logging.getLogger("bowline.api")

# OpenAI's `type` strings by status code.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status_code, "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status_code, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, 400, param=param)


def _param(loc: Sequence[Any]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # Union branches add the branch's type name to the location ("list[int]"); drop them.
    parts = [p for p in parts if not p.startswith(("list[", "str", "int", "dict[", "function-after"))]
    return ".".join(parts) or None


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """Turn pydantic/FastAPI validation errors into one readable message and the first bad field."""
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "malformed JSON")
            position = err.get("loc", ("body", None))[-1]
            where = f" at character {position}" if isinstance(position, int) else ""
            return f"Invalid JSON in the request body: {detail}{where}. Check for trailing commas and quotes.", None
    messages: list[str] = []
    first_param: str | None = None
    for err in errors:
        param = _param(err.get("loc", ()))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "missing" and param is None:
            msg = "the request body is required: send a JSON object with Content-Type: application/json"
        elif err.get("type") == "model_attributes_type" and param is None:
            msg = "the request body must be a JSON object (send Content-Type: application/json)"
        line = f"{param}: {msg}" if param else msg
        if line not in messages:
            messages.append(line)
        first_param = first_param or param
    text = "; ".join(messages[:3]) + (f" (and {len(messages) - 3} more)" if len(messages) > 3 else "")
    return text or "invalid request", first_param


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def internal_error(exc: BaseException, request_id: str | None = None) -> APIError:
    """A 500 whose body names the request id that the log line carries, so an operator can find it."""
    request_id = request_id or new_request_id()
    logger.error("internal error while serving request %s", request_id, exc_info=exc)
    return APIError(
        f"internal server error (request id {request_id}); the server log has the details",
        500,
        code="internal_error",
        headers={"X-Request-Id": request_id},
    )


def to_api_error(exc: BaseException, request_id: str | None = None) -> APIError:
    """What the client should see for an exception raised while serving (also used in-band in streams).

    Only RequestRejected (a client mistake, named so by whoever raised it) is a 400; any other
    exception, ValueError included, is a bug or an outage and must not look like the client's fault.
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestRejected):
        return APIError(exc.message, getattr(exc, "status_code", 400), param=exc.param)
    if type(exc).__name__ == "EngineIterationTimeout":  # VLLM_ENGINE_ITERATION_TIMEOUT_S: say so
        return APIError(str(exc), 503, code="engine_iteration_timeout")
    if type(exc).__name__ == "EngineDeadError":
        return APIError("the engine has stopped; the server log has the details", 503)
    return internal_error(exc, request_id)


# Starlette types every handler as (Request, Exception); each narrows to the class it is registered for.
async def _on_api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = describe_validation_errors(exc.errors())
    return APIError(message, 400, param=param).response()


async def _on_rejected(_: Request, exc: Exception) -> JSONResponse:
    return to_api_error(exc).response()


async def _on_http_exception(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    return APIError(detail, exc.status_code, headers=getattr(exc, "headers", None)).response()


class CatchAllMiddleware:
    """The outermost layer: an exception no handler took becomes a 500 body here.

    Why not `add_exception_handler(Exception, ...)`: Starlette runs that handler in its
    ServerErrorMiddleware and then re-raises, so uvicorn logs "Exception in ASGI application"
    and closes the socket — a keep-alive client's next request on it then fails with ECONNRESET.
    Swallowing the exception here, after answering, keeps the connection usable.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the last place an error can still get a body
            request_id = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1") or None
            error = to_api_error(exc, request_id)
            if started:  # headers are out: nothing can be said; end the body so the socket survives
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await error.response()(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(RequestRejected, _on_rejected)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
