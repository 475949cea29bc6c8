"""Server-Sent Events as OpenAI streams them: `data: {json}\\n\\n` per chunk, then `data: [DONE]\\n\\n`.

A plain StreamingResponse: under uvicorn it listens for `http.disconnect` while streaming and
cancels the body on disconnect. The cleanup below runs on every exit — finished, failed,
cancelled, or never started — and closes the engine work, which aborts it and frees its blocks.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from bowline_runtime.api.errors import to_api_error

logger = logging.getLogger("bowline.api")

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: str) -> str:
    return f"data: {payload}\n\n"


class SSEResponse(StreamingResponse):
    """Streams `events` (JSON strings) as SSE; runs `cleanup` however the response ends."""

    def __init__(self, events: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]]) -> None:
        self._events = events
        self._cleanup = cleanup
        super().__init__(self._body(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _body(self) -> AsyncIterator[str]:
        try:
            async for payload in self._events:
                yield sse_event(payload)
        except Exception as exc:  # noqa: BLE001 - headers are gone: report in-band, as vLLM does
            yield sse_event(to_api_error(exc).body().model_dump_json())
        yield DONE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()  # type: ignore[attr-defined]
            await self._cleanup()
