"""One HTTP request's engine work: one engine request per prompt, merged into one stream, metered,
and always closed — so a client that goes away aborts its sequences and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request

from bowline_runtime.api.detokenize import DeltaDetokenizer, decoded_by_server, engine_params
from bowline_runtime.api.metrics import RequestMetrics, ServerMetrics
from bowline_runtime.engine.outputs import CompletionOutput, OutputAccumulator, RequestOutput
from bowline_runtime.engine.sampling_params import SamplingParams

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    # After the body has been read, the next ASGI message is http.disconnect (or nothing, until the
    # response is sent), so this only returns when the client has gone.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it if the client disconnects first (then raise ClientDisconnected).

    Cancelling the engine iteration aborts the request in the engine; without this, a client that
    gives up on a non-streaming request would keep its sequences (and KV blocks) busy to the end.
    """
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def select_best(outputs: list[CompletionOutput], params: SamplingParams) -> list[CompletionOutput]:
    """The n returned choices: with best_of > n, the n most likely candidates, re-indexed 0..n-1.

    Beam search's outputs come best first from the engine (its ranking includes the length penalty).
    """
    if len(outputs) <= params.n:
        return outputs
    if params.use_beam_search:
        chosen = outputs[: params.n]
    else:
        chosen = sorted(outputs, key=lambda o: o.cumulative_logprob, reverse=True)[: params.n]
    for i, out in enumerate(chosen):
        out.index = i
    return chosen


class Generation:
    """Drives `engine.generate` for each prompt and yields (prompt index, snapshot) as they come.

    The engine sends per-step deltas, queued as they come; `next()` appends each into its prompt's
    OutputAccumulator (amortised O(1) per token) and hands out that prompt's cumulative snapshot,
    updated in place, whose `new_*` fields are exactly the delta just taken. Accumulating on the
    consumer's side keeps one chunk per engine message however far the consumer lags, and nothing
    is lost. Usage counts, metrics and the non-streaming answers read the cumulative lists; streams
    slice them from their own counters, O(new tokens) per chunk. `aclose()` cancels every engine
    iteration still running, which aborts those requests in the engine.

    One prompt (nearly every request) needs no merging: its engine iterator is read directly by
    whoever calls `next()`, without a pump task and a second queue in between. That is one task
    switch and two queue operations less per token, on the event loop that serves every stream.
    """

    def __init__(
        self,
        engine: Any,
        prompts: list[list[int]],
        params: SamplingParams,
        request_id: str,
        metrics: ServerMetrics,
        arrival_time: float | None = None,
        images: list[Any] | None = None,
    ) -> None:
        self.engine = engine
        self.prompts = prompts
        self.images = images  # engine.multimodal.ImageInput per image of a (single) chat prompt
        self.params = params
        self.request_id = request_id
        self.arrival_time = arrival_time or time.time()
        self.latest: list[RequestOutput | None] = [None] * len(prompts)
        self._meters: list[RequestMetrics] = [metrics.request(self.arrival_time, len(p)) for p in prompts]
        self._accumulators = [OutputAccumulator() for _ in prompts]
        # Requests without stop strings are decoded here, not in the engine's step (api/detokenize.py).
        self._engine_params = engine_params(params)
        self._decoders = (
            [DeltaDetokenizer(engine.tokenizer, params, engine.eos_token_ids) for _ in prompts]
            if decoded_by_server(params) else None
        )
        self._queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._direct: Any = None  # the single prompt's engine iterator, read by next() itself
        self._remaining = len(prompts)
        self._closed = False

    def _engine_request_id(self, i: int) -> str:
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{i}"

    def _engine_stream(self, i: int) -> Any:
        extra = {"images": self.images} if self.images else {}  # text requests call generate as before
        return self.engine.generate(
            self.prompts[i], self._engine_params, request_id=self._engine_request_id(i), arrival_time=self.arrival_time,
            **extra,
        )

    def _observe(self, i: int, delta: RequestOutput) -> None:
        """Meter a delta as it arrives from the engine (first-token time), read yet or not."""
        self._meters[i].observe_tokens(sum(len(o.new_token_ids) for o in delta.outputs))

    async def _pump(self, i: int) -> None:
        try:
            async for delta in self._engine_stream(i):
                self._observe(i, delta)
                self._queue.put_nowait((i, delta))
            self._queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who turns it into an error body
            self._queue.put_nowait(exc)

    def start(self) -> None:
        if len(self.prompts) == 1:
            self._direct = self._engine_stream(0)
            return
        self._tasks = [asyncio.create_task(self._pump(i), name=f"gen-{self.request_id}-{i}") for i in range(len(self.prompts))]

    async def next(self) -> tuple[int, RequestOutput] | None:
        """The next snapshot from any prompt, or None when all have finished. Engine errors re-raise here."""
        if self._direct is not None:
            if not self._remaining:
                return None
            try:
                delta = await anext(self._direct)
            except StopAsyncIteration:
                self._remaining = 0
                return None
            self._observe(0, delta)
            return self._take(0, delta)
        while self._remaining:
            item = await self._queue.get()
            if item is None:
                self._remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            return self._take(*item)
        return None

    def _take(self, i: int, delta: RequestOutput) -> tuple[int, RequestOutput]:
        if self._decoders is not None:
            self._decoders[i].fill(delta)
        snapshot = self._accumulators[i].add(delta)
        self.latest[i] = snapshot
        return i, snapshot

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while (item := await self.next()) is not None:
            yield item

    async def starting_with(self, first: tuple[int, RequestOutput] | None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """`first` (already taken, e.g. to turn an early failure into an HTTP status), then the rest.

        Each snapshot is handed on as soon as it arrives: a stream writes a chunk before it waits
        for the next one, so every token is on the wire in the step that made it.
        """
        item = first
        while item is not None:
            yield item
            item = await self.next()

    async def run_to_end(self) -> list[RequestOutput]:
        """Consume everything; the final snapshot of each prompt."""
        while await self.next() is not None:
            pass
        return [out for out in self.latest if out is not None]

    async def aclose(self) -> None:
        """Abort whatever is still running and record each prompt's metrics once."""
        if self._closed:
            return
        self._closed = True
        if self._direct is not None:
            with contextlib.suppress(Exception):
                await self._direct.aclose()  # a suspended engine iterator aborts its request as it closes
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        while not self._queue.empty():  # deltas nobody read: still generated, so still metered
            item = self._queue.get_nowait()
            if isinstance(item, tuple):
                self._take(*item)
        for meter, out in zip(self._meters, self.latest, strict=True):
            if out is None:
                meter.finish(0, ["abort"])
                continue
            outputs = out.outputs
            meter.finish(
                sum(len(o.token_ids) for o in outputs),
                [o.finish_reason if out.finished else "abort" for o in outputs],
            )
