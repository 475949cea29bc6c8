"""The request lifecycle shared by chat and completions: admit, run, stream or answer, always clean up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from bowline_runtime.api.errors import APIError, to_api_error
from bowline_runtime.api.generation import ClientDisconnected, Generation, race_disconnect
from bowline_runtime.api.state import ServerState
from bowline_runtime.api.streaming import SSEResponse
from bowline_runtime.engine.outputs import RequestOutput
from bowline_runtime.engine.sampling_params import SamplingParams


class Call(Protocol):
    """A validated request of one route family, able to format its own stream and response."""

    id: str
    params: SamplingParams

    def events(self, gen: Generation, first: tuple[int, RequestOutput] | None) -> AsyncIterator[str]: ...

    def response(self, gen: Generation) -> BaseModel: ...


async def run_call(
    state: ServerState,
    raw_request: Request,
    call: Call,
    prompts: list[list[int]],
    *,
    stream: bool,
    stream_response: type[SSEResponse] = SSEResponse,
    images: list[Any] | None = None,
) -> Response:
    """Admit (429 when full), start the engine work and wait for its first output — engine refusals
    become 400s here, before any header is sent — then stream, or wait for the end.

    A client that disconnects at any point cancels the engine work (see race_disconnect and
    SSEResponse); the admission ticket is released on every path. `stream_response` frames the
    stream (SSE for the OpenAI routes, one JSON object per line for vLLM's /generate).
    """
    try:
        ticket = state.admission.enter()
    except Exception:
        state.metrics.reject("queue_full")
        raise
    gen = Generation(state.engine, prompts, call.params, call.id, state.metrics, images=images)

    async def cleanup() -> None:
        await gen.aclose()
        ticket.release()

    try:
        gen.start()
        first = await race_disconnect(raw_request, gen.next())
        if stream:
            return stream_response(call.events(gen, first), cleanup)
        await race_disconnect(raw_request, gen.run_to_end())
    except (APIError, ClientDisconnected, asyncio.CancelledError):
        await cleanup()
        raise
    except Exception as exc:  # engine refusals (RequestRejected: 400) and failures (500) become error bodies here
        await cleanup()
        raise to_api_error(exc, call.id) from None
    await cleanup()
    return Response(call.response(gen).model_dump_json(), media_type="application/json")
