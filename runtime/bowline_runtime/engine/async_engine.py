"""The asyncio face of the engine: requests enter at any time and stream their outputs back.

The step loop runs in its own thread: torch releases the GIL inside its kernels, so the HTTP server's
event loop keeps accepting, tokenising and streaming while a forward pass runs. Requests cross into
the loop through a thread-safe queue; outputs come back through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from bowline_runtime.config import EngineConfig
from bowline_runtime.devices.host_memory import IdleRelease
from bowline_runtime.engine.errors import RequestRejected
from bowline_runtime.engine.multimodal import ImageInput, check_no_beam_images
from bowline_runtime.engine.outputs import EngineStats, RequestOutput, merge_delta
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.engine.step_watchdog import EngineDeadError, EngineIterationTimeout, StepWatchdog
from bowline_runtime.lora.manager import LoRAManager
from bowline_runtime.lora.modules import LoRAModule

__all__ = ["AsyncEngine", "EngineDeadError", "EngineIterationTimeout", "EngineStepError", "deliver_by_loop"]

T = TypeVar("T")

logger = logging.getLogger("bowline.engine")


class EngineStepError(RuntimeError):
    """One step failed; the requests in it fail with this, and the engine carries on."""


# Failed steps in a row after which the engine is declared dead (a fault that repeats is not transient).
MAX_CONSECUTIVE_STEP_FAILURES = 3


class AsyncEngine:
    """Owns an LLMEngine and drives it from a background thread."""

    def __init__(self, config: EngineConfig) -> None:
        from bowline_runtime.engine.llm_engine import LLMEngine

        self.config = config
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = self.engine.vocab_size
        self.device = self.engine.device
        self.dtype = self.engine.dtype
        self.eos_token_ids = self.engine.eos_token_ids
        self.image_token_id = self.engine.image_token_id  # None: a text-only model
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._watchdog: StepWatchdog | None = None
        if config.engine_iteration_timeout_s is not None:
            self._watchdog = StepWatchdog(config.engine_iteration_timeout_s, self._step_timed_out)
        self._thread = threading.Thread(target=self._run, name="bowline-engine", daemon=True)
        self._thread.start()

    # --- public API -------------------------------------------------------------------------------

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
        images: list[ImageInput] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield each step's delta (see engine.outputs) until the request finishes.

        Raises ValueError before the first yield when the request cannot be served (prompt over
        max_model_len, ...). Closing or cancelling the iterator aborts the request and frees its blocks.
        `images`: the prompt's images (engine.multimodal), for a vision-language model.
        """
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead!r}")
        request_id = request_id or uuid.uuid4().hex
        check_no_beam_images(params, images)
        prepared = self.engine.check_request(prompt_token_ids, params, images)
        if params.use_beam_search:
            async for out in self._beam_search(prompt_token_ids, params, request_id, arrival_time):
                yield out
            return
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, stream)
        self._send("add", (request_id, prepared, arrival_time or time.time()))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                # Drain what else is ready into one delta: a slow consumer gets fewer, larger ones.
                while not item.finished and not stream.empty():
                    nxt = stream.get_nowait()
                    if isinstance(nxt, BaseException):
                        raise nxt
                    item = merge_delta(item, nxt)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    async def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    # --- LoRA adapters (lora.manager), changed between steps in the engine thread --------------------

    def lora_modules(self) -> list[LoRAModule]:
        lora = self.engine.lora
        return lora.modules() if lora is not None else []

    async def load_lora(self, name: str, path: str) -> None:
        lora = self._lora()
        await self._in_engine_thread(lambda: lora.add(LoRAModule(name, path)))

    async def unload_lora(self, name: str) -> None:
        lora = self._lora()
        lora_id = await self._in_engine_thread(lambda: lora.remove(name))
        while not lora.is_gone(lora_id):  # its requests finish first; the engine drops it after the last
            await asyncio.sleep(0.02)

    def _lora(self) -> LoRAManager:
        if self.engine.lora is None:
            raise RequestRejected("LoRA is not enabled on this server (start it with --enable-lora)", "lora_name")
        return self.engine.lora

    async def _in_engine_thread(self, fn: Callable[[], T]) -> T:
        """Run fn between two steps in the engine thread (adapters change on every rank in step order)."""
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead!r}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._send("call", (fn, future))
        return await asyncio.wrap_future(future)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def is_alive(self) -> bool:
        # A rank of a multi-process group can die while this thread idles: the group is then dead too.
        return self._dead is None and self._thread.is_alive() and getattr(getattr(self.engine, "tp", None), "failure", None) is None

    def has_unfinished_requests(self) -> bool:
        return bool(self._streams) or self.engine.has_unfinished_requests()

    async def shutdown(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
        self._stop.set()
        self._wakeup.set()
        await asyncio.to_thread(self._thread.join, 10)
        self.engine.shutdown()

    # --- beam search ------------------------------------------------------------------------------

    async def _beam_search(self, prompt_token_ids, params, request_id, arrival_time):
        from bowline_runtime.engine.beam_search import beam_search

        async for out in beam_search(self, prompt_token_ids, params, request_id, arrival_time or time.time()):
            yield out

    # --- the engine thread ------------------------------------------------------------------------

    def _send(self, kind: str, payload: Any) -> None:
        self._inbox.put((kind, payload))
        self._wakeup.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request_id, prepared, arrival = payload
                try:
                    self.engine.add_request(request_id, prepared, arrival)
                except Exception as exc:  # refused after all: report to that request only
                    self._deliver(request_id, exc)
            elif kind == "abort":
                self.engine.abort_request(payload)
            elif kind == "call":
                fn, future = payload
                try:
                    future.set_result(fn())
                except Exception as exc:  # handed to the caller (a refused adapter is a client error)
                    future.set_exception(exc)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_many([(request_id, item)])

    def _deliver_many(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        deliver_by_loop(self._streams, items)

    def _fail_in_flight(self, exc: Exception) -> None:
        """A step raised: fail (and free) the requests it was serving, keep serving new ones."""
        logger.exception("engine step failed; failing the %d requests in flight", len(self.engine.requests))
        failed = list(self.engine.requests)
        for request_id in failed:
            self.engine.abort_request(request_id)
        self._deliver_many([(rid, EngineStepError(f"generation failed: {exc!r}")) for rid in failed])

    def _run(self) -> None:
        failures = 0
        idle = IdleRelease(self.engine.tp.release_idle_memory)
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                busy = self.engine.has_unfinished_requests()
                idle.tick(busy)
                if not busy:
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
                try:
                    if self._watchdog is not None:
                        self._watchdog.begin()
                    outputs = self.engine.step()
                except Exception as exc:
                    failures += 1
                    # With several ranks a failed step may leave them out of step: only a restart is safe.
                    if self.engine.tp.world_size > 1 or failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                        raise
                    self._fail_in_flight(exc)
                    continue
                finally:
                    if self._watchdog is not None:
                        self._watchdog.end()
                if self._dead is not None:  # the watchdog gave up on this step while it ran
                    return
                failures = 0
                # Straight on to the next step while the event loop streams these: since a decode step
                # is one C call (kernels.decode_layers) it barely needs the GIL, and waiting for the loop
                # first measured slower at c=1, 8 and 16 (docs/benchmarks.md, change 29).
                self._deliver_many([(o.request_id, o) for o in outputs])
        except BaseException as exc:  # noqa: BLE001 - anything here kills serving; tell every waiter
            logger.exception("engine step loop crashed")
            self._dead = exc
            self._deliver_many([(rid, EngineDeadError(f"engine stopped: {exc!r}")) for rid in list(self._streams)])

    def _step_timed_out(self, exc: EngineIterationTimeout) -> None:
        """From the watchdog's thread while the step still runs: fail every waiter, report dead."""
        logger.error("%s; failing the %d requests in flight", exc, len(self._streams))
        self._dead = exc
        self._deliver_many([(rid, exc) for rid in list(self._streams)])


def deliver_by_loop(
    streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]],
    items: list[tuple[str, RequestOutput | BaseException]],
) -> None:
    """Hand a step's outputs to their requests' queues with one wake-up per event loop, not one per
    request: each wake-up is a syscall and a GIL hand-over that the next forward pass waits behind.
    Called from a thread that is not the loops' own (the engine thread, or the core client's reader)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput | BaseException]]] = {}
    for request_id, item in items:
        target = streams.get(request_id)
        if target is not None:
            by_loop.setdefault(target[0], []).append((target[1], item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # that loop is closed
            pass


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput | BaseException]]) -> None:
    for stream, item in batch:
        stream.put_nowait(item)
