"""What the OpenAPI document says each route answers: the real statuses, with the error schema.

FastAPI documents 200 and 422 by default; this server never answers 422 (validation errors are
OpenAI-style 400s) and does answer 400/401/404/413/429/503. Clients generated from the document
(and fuzzers such as schemathesis) need the truth, so each route lists its statuses here, and
`without_422` removes FastAPI's default from the generated document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from bowline_runtime.api.protocol import ErrorResponse

_WHY = {
    400: "invalid JSON, a wrong type or an out-of-range value (`param` names the field), a prompt over the context",
    401: "`--api-key` is set and the `Authorization: Bearer` header is missing or wrong",
    404: "the `model` is not the one this server serves",
    413: "the body is larger than `--max-request-body-bytes`",
    429: "more requests in flight than `--max-num-seqs` + `--max-queue-len`; retry after `Retry-After`",
    500: "a server bug; the message names the request id the server log carries",
    503: "the model is loading, failed to load, the server is shutting down, or the engine stopped",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these statuses, each with OpenAI's error body."""
    return {status: {"model": ErrorResponse, "description": _WHY[status]} for status in statuses}


GENERATION = errors(400, 401, 404, 413, 429, 500, 503)  # chat and completions
TOKENIZER = errors(400, 401, 404, 413, 500, 503)  # /tokenize, /detokenize
LISTING = errors(401, 500)  # /v1/models

HEALTH: dict[int | str, dict[str, Any]] = {
    200: {"description": "ready: requests will be served (empty body)", "content": {"text/plain": {"schema": {"type": "string", "maxLength": 0}}}},
    503: {
        "description": "not ready: loading, load failed, shutting down (draining) or engine stopped",
        "content": {
            "application/json": {
                "schema": {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
            }
        },
    },
}


def stream_or_json(model: type) -> dict[int | str, dict[str, Any]]:
    """The 200 of a route that answers JSON, or Server-Sent Events when `stream` is true."""
    return {
        200: {
            "description": "the answer as JSON, or with `stream: true` as Server-Sent Events (`data: {...}` chunks, then `data: [DONE]`)",
            "model": model,
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    }


def without_422(app: FastAPI) -> None:
    """Generate the document once, minus FastAPI's never-sent 422 and its validation schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for methods in schema.get("paths", {}).values():
                for operation in methods.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
