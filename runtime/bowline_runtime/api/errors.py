"""Every failure leaves the server as OpenAI's error body, `{"error": {message, type, param, code}}`.

Clients (the OpenAI SDK, LangChain, curl scripts) branch on the status code and print `message`,
so messages say what to change. A stack trace never reaches the client: unexpected exceptions are
logged here and answered with a generic 500.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bowline_runtime.api.protocol import ErrorInfo, ErrorResponse

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


def to_api_error(exc: BaseException) -> APIError:
    """What the client should see for an exception raised while serving (also used in-band in streams)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):  # the engine's and SamplingParams' refusals are written for users
        return APIError(str(exc), 400)
    if type(exc).__name__ == "EngineDeadError":
        return APIError("the engine has stopped; the server log has the details", 503)
    logger.error("unhandled error while serving", exc_info=exc)
    return APIError("internal server error; the server log has the details", 500)


async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = describe_validation_errors(exc.errors())
    return APIError(message, 400, param=param).response()


async def _on_value_error(_: Request, exc: ValueError) -> JSONResponse:
    return APIError(str(exc), 400).response()


async def _on_http_exception(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    return APIError(detail, exc.status_code, headers=getattr(exc, "headers", None)).response()


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return to_api_error(exc).response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(ValueError, _on_value_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_unexpected)
