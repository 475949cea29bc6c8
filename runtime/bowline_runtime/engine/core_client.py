"""The API process's face of an engine core running in its own process (vLLM v1's EngineCoreClient).

Why a process: in one process the event loop, the GIL and the engine's OpenMP threads share the
same cores, and through HTTP the c=1 TPOT was 22 % above the in-process decode step. Here the API
process keeps one torch thread and the tokenizer; the core (core_process.run_engine_core) owns the
model, the scheduler, the sampler and any tensor-parallel workers.

Measured c=1 TPOT through HTTP (bench model, 128 tokens, median of 8 requests, 2 shared AVX2
cores, runs interleaved): in a thread 12.1 and 11.1 ms, in its own process 13.4, 13.2 and 11.6 ms,
against an in-process decode step of 12.4 ms (bench/roofline.py) - within 1.1x either way on that
run, so the process is opt-in (BOWLINE_ENGINE_PROCESS=1) until a quiet machine settles it. Requests
without stop strings are decoded to text on the API side (api/detokenize.py), never in the core's step.

Same public face as AsyncEngine: generate / abort / stats / is_alive / has_unfinished_requests /
shutdown / tokenizer / max_model_len / vocab_size / device / dtype, so the routes do not change.
Rejections made in the core (prompt checks, a grammar that fails to compile) come back as the
first message of that request and are raised before generate's first yield, as the same class
when it is a client error (a ValueError, or RequestRejected with its `param`). A dead core (even
kill -9) is seen at once through the process sentinel: is_alive turns False and every pending
request fails with EngineDeadError.

Transport: pickle over pyzmq ipc sockets in a private temp dir. Encode + decode of one step's
message for one request (a 1-token output, 563 bytes), median of 5 x 20,000 on 2 shared cores:
pickle 31 us, msgspec msgpack 14 us including rebuilding the dataclasses; at 1,024 tokens 82 vs
63 us. Both are under 0.2 % of a 16.7 ms decode step, so pickle: SamplingParams (with its nested
guided-decoding params), the output dataclasses and the stats cross with no schema to keep in step.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.async_engine import EngineDeadError, EngineStepError, deliver_by_loop
from bowline_runtime.engine.multimodal import ImageInput, check_no_beam_images
from bowline_runtime.engine.outputs import EngineStats, RequestOutput, merge_delta
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.engine.step_watchdog import EngineIterationTimeout
from bowline_runtime.lora.modules import LoRAModule, parse_modules

logger = logging.getLogger("bowline.engine")

# How long start-up may take (model load) before the core is declared failed.
READY_TIMEOUT_S = 600.0


def rebuild_error(module: str, class_name: str, message: str, param: Any, client_error: bool) -> Exception:
    """The exception to raise on the API side for an error the core reported.

    A client error (a ValueError subclass, such as RequestRejected with its `param`) comes back as
    the same class from the same module, so the routes answer the same 400 as in process; anything
    else becomes an internal error (EngineStepError) carrying the core's message."""
    if client_error:
        cls: Any = ValueError
        if module.startswith("bowline_runtime.") or module == "builtins":
            try:
                found = getattr(importlib.import_module(module), class_name, None)
            except ImportError:
                found = None
            if isinstance(found, type) and issubclass(found, ValueError):
                cls = found
        try:
            error = cls(message, param=param) if param is not None else cls(message)
        except TypeError:
            error = cls(message)
        if param is not None and getattr(error, "param", None) is None:
            try:
                error.param = param
            except AttributeError:
                pass
        return error
    if class_name == "EngineIterationTimeout":
        return EngineIterationTimeout(message)
    if class_name == "EngineDeadError":
        return EngineDeadError(message)
    return EngineStepError(message)


class EngineCoreClient:
    """Starts the engine core process and talks to it; one reader thread routes its messages."""

    def __init__(self, config: EngineConfig) -> None:
        import torch
        import zmq

        from bowline_runtime.models import loader

        # The API process computes nothing heavy: one torch thread, no tokenizer pool against the core.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(1)
        self.config = config
        self.tokenizer = loader.load_tokenizer(config.tokenizer or config.model, config.trust_remote_code, config.tokenizer_mode)
        self._dir = tempfile.mkdtemp(prefix="bowline-core-")
        in_addr, out_addr = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._ctx = zmq.Context(1)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.bind(in_addr)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(out_addr)
        self._push_lock = threading.Lock()
        spawn = multiprocessing.get_context("spawn")
        from bowline_runtime.engine.core_process import run_engine_core

        self.process = spawn.Process(
            target=run_engine_core, args=(config, in_addr, out_addr, os.getpid()), name="bowline-engine-core",
            daemon=True,
        )
        self.process.start()
        info = self._wait_ready()
        self.max_model_len: int = info["max_model_len"]
        self.vocab_size: int = info["vocab_size"]
        self.device = SimpleNamespace(type=info["device_type"], name=info["device_name"])
        self.dtype = info["dtype"]
        self.eos_token_ids: set[int] = info["eos_token_ids"]
        self.image_token_id: int | None = info.get("image_token_id")  # None: a text-only model
        self._stats: EngineStats = info["stats"]
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._dead: BaseException | None = None
        self._lora_modules: list[LoRAModule] | None = None
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="bowline-core-reader", daemon=True)
        self._reader.start()
        self._watcher = threading.Thread(target=self._watch, name="bowline-core-watch", daemon=True)
        self._watcher.start()

    def _wait_ready(self) -> dict:
        import zmq

        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._pull.poll(200):
                message = pickle.loads(self._pull.recv())
                if message[0] == "ready":
                    return message[1]
                self._cleanup()
                raise RuntimeError(f"the engine core failed to start: {message[1]}: {message[2]}")
            if not self.process.is_alive():
                self._cleanup()
                raise RuntimeError(f"the engine core exited with code {self.process.exitcode} while loading")
        self.process.kill()
        self._cleanup()
        raise RuntimeError(f"the engine core did not start within {READY_TIMEOUT_S:.0f} s") from zmq.Again()

    # --- public API -------------------------------------------------------------------------------

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
        images: list[ImageInput] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the core's per-step deltas until the request finishes; errors raise before the first yield."""
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead!r}")
        request_id = request_id or uuid.uuid4().hex
        check_no_beam_images(params, images)
        if params.use_beam_search:
            from bowline_runtime.engine.beam_search import beam_search

            async for out in beam_search(self, prompt_token_ids, params, request_id, arrival_time or time.time()):
                yield out
            return
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, stream)
        self._send(("add", request_id, list(prompt_token_ids), params, arrival_time or time.time(), images))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True  # the core already forgot it
                    raise item
                # Drain what else is ready into one delta (merged, never skipped: each holds new tokens).
                while not item.finished and not stream.empty():
                    nxt = stream.get_nowait()
                    if isinstance(nxt, BaseException):
                        finished = True
                        raise nxt
                    item = merge_delta(item, nxt)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._dead is None:
                self._send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def lora_modules(self) -> list[LoRAModule]:
        """The adapters served: --lora-modules at start, then as each load or unload reply says."""
        if self._lora_modules is None:
            self._lora_modules = parse_modules(self.config.lora_modules) if self.config.enable_lora else []
        return self._lora_modules

    async def load_lora(self, name: str, path: str) -> None:
        await self._lora_call("load", name, path)

    async def unload_lora(self, name: str) -> None:
        await self._lora_call("unload", name, "")

    async def _lora_call(self, op: str, name: str, path: str) -> None:
        """The core applies it between steps and replies on the output socket, like a request's output."""
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead!r}")
        token = f"lora-{uuid.uuid4().hex}"
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[token] = (asyncio.get_running_loop(), stream)
        try:
            self._send(("lora", token, op, name, path))
            item = await stream.get()
        finally:
            self._streams.pop(token, None)
        if isinstance(item, BaseException):
            raise item

    def stats(self) -> EngineStats:
        """The gauges sent with the latest step: no round trip per scrape."""
        return self._stats

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self.process.is_alive()

    def has_unfinished_requests(self) -> bool:
        return bool(self._streams)

    async def shutdown(self) -> None:
        self._closing = True
        if self.process.is_alive():
            try:  # never blocks: a core that stopped reading (its socket gone, a hung exit) is killed below
                self._send(("stop",), block=False)
            except Exception:  # noqa: BLE001 - the socket may be gone; the kill below still stops it
                pass
            await asyncio.to_thread(self.process.join, 10)
        if self.process.is_alive():
            self.process.kill()
            await asyncio.to_thread(self.process.join, 5)
        self._cleanup()

    # --- the I/O edge -------------------------------------------------------------------------------

    def _send(self, message: tuple, block: bool = True) -> None:
        import zmq

        if self._closing and message[0] != "stop":
            return
        with self._push_lock:
            self._push.send(pickle.dumps(message), 0 if block else zmq.NOBLOCK)

    def _read(self) -> None:
        """Route each message from the core to its request's event loop, one wake-up per loop."""
        import zmq

        while True:
            try:
                raw = self._pull.recv()
            except zmq.ZMQError:  # the context is terminating (shutdown): release the socket
                self._pull.close(linger=0)
                return
            message = pickle.loads(raw)
            kind = message[0]
            if kind == "outputs":
                _, outputs, stats, _sent = message
                self._stats = stats
                self._deliver([(out.request_id, out) for out in outputs])
            elif kind == "stats":
                self._stats = message[1]
            elif kind == "lora_done":
                _, token, modules = message
                self._lora_modules = modules
                self._deliver([(token, modules)])
            elif kind == "error":
                _, request_id, module, class_name, text, param, client = message
                self._deliver([(request_id, rebuild_error(module, class_name, text, param, client))])

    def _watch(self) -> None:
        """Wait on the process sentinel: a core that dies fails every pending request at once."""
        from multiprocessing.connection import wait

        wait([self.process.sentinel])
        if self._closing:
            return
        self._dead = RuntimeError(f"the engine core process exited with code {self.process.exitcode}")
        logger.error("%s; failing %d pending requests", self._dead, len(self._streams))
        self._deliver([(rid, EngineDeadError(f"engine stopped: {self._dead}")) for rid in list(self._streams)])

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        deliver_by_loop(self._streams, items)

    def _cleanup(self) -> None:
        """Close the sockets; with the reader running, term() wakes it and it closes its own socket."""
        self._push.close(linger=0)
        if getattr(self, "_reader", None) is None:
            self._pull.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

