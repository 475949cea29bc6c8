"""The FastAPI application: routes, error handlers, auth, and the engine's lifecycle.

The model loads in the background after the server starts listening, so /health can answer 503
("loading") at once and 200 when ready: Kubernetes readiness probes then work for models that
take minutes to load.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from bowline_runtime import __version__
from bowline_runtime.api import serving_basic, serving_chat, serving_completions, serving_generate
from bowline_runtime.api.auth import APIKeyMiddleware
from bowline_runtime.api.body_limit import BodyLimitMiddleware
from bowline_runtime.api.errors import CatchAllMiddleware, install_error_handlers
from bowline_runtime.api.generation import ClientDisconnected
from bowline_runtime.api.openapi import without_422
from bowline_runtime.api.state import ServerState
from bowline_runtime.config import EngineConfig

logger = logging.getLogger("bowline.api")

EngineFactory = Callable[[EngineConfig], Any]


# Run the engine core in its own process (engine/core_client.py); 0 keeps it in a thread of this one.
ENGINE_PROCESS_ENV = "BOWLINE_ENGINE_PROCESS"


def _default_engine_factory(config: EngineConfig) -> Any:
    if os.environ.get(ENGINE_PROCESS_ENV, "0").strip().lower() in {"1", "true", "yes", "on"}:
        from bowline_runtime.engine.core_client import EngineCoreClient

        return EngineCoreClient(config)
    from bowline_runtime.engine.async_engine import AsyncEngine

    return AsyncEngine(config)


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """Like asyncio.to_thread, but the thread never blocks interpreter exit (SIGTERM while loading)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def hand_over(callback: Callable[[], Any]) -> None:
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the server stopped while the model loaded: nobody is waiting any more
            logger.info("the model finished loading after the server had stopped; discarding it")

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            error = exc  # `exc` is unbound after the except block; the callback runs later
            hand_over(lambda: future.done() or future.set_exception(error))
        else:
            hand_over(lambda: future.done() or future.set_result(result))

    threading.Thread(target=run, name="bowline-model-load", daemon=True).start()
    return await future


def _describe(engine: Any, config: EngineConfig) -> str:
    """One start-up line: what was loaded, where, and how much KV cache was reserved."""
    inner = getattr(engine, "engine", None)
    found = next((d for d in (getattr(engine, "device", None), getattr(inner, "device", None)) if d is not None), None)
    device = (getattr(found, "name", None) or getattr(found, "type", None) or str(found)) if found is not None else config.device
    dtype = str(getattr(inner, "dtype", None) or config.dtype).removeprefix("torch.")
    stats = engine.stats()
    block_size = config.block_size
    return (
        f"loaded {config.model} as {config.model_name!r} on {device} (dtype {dtype}, "
        f"tensor-parallel {config.tensor_parallel_size}); max_model_len {engine.max_model_len}; KV cache "
        f"{stats.num_total_blocks} blocks x {block_size} tokens = {stats.num_total_blocks * block_size} tokens"
    )


async def _load_engine(state: ServerState, factory: EngineFactory, on_failure: Callable[[BaseException], None]) -> None:
    logger.info("loading model %s (the server answers /health with 503 until it is ready)", state.config.model)
    started = time.perf_counter()
    try:
        engine = await _in_daemon_thread(lambda: factory(state.config))
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001 - any load failure ends serving with a clear log
        state.load_error = exc
        logger.error("model failed to load: %s", exc, exc_info=exc)
        on_failure(exc)
        return
    state.attach(engine)
    logger.info(_describe(engine, state.config))
    logger.info("ready: http://%s:%d/v1 (model %r); loading took %.1f s (%s weights from %s)", state.config.host,
                state.config.port, state.model_name, time.perf_counter() - started, state.config.load_format,
                state.config.model)


def build_app(
    config: EngineConfig,
    engine_factory: EngineFactory | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The app for `config`. `engine_factory` builds the engine (blocking; run in a thread)."""
    state = ServerState(config)
    factory = engine_factory or _default_engine_factory

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        loader = asyncio.create_task(_load_engine(state, factory, on_load_failure or (lambda exc: None)))
        try:
            yield
        finally:
            state.draining = True
            if not loader.done():
                loader.cancel()
            if state.engine is not None:
                await state.engine.shutdown()

    app = FastAPI(
        title="Bowline runtime",
        version=__version__,
        description="OpenAI-compatible LLM serving (chat, completions, streaming).",
        lifespan=lifespan,
    )
    app.state.bowline = state
    without_422(app)
    install_error_handlers(app)

    async def _client_gone(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    app.add_exception_handler(ClientDisconnected, _client_gone)
    app.include_router(serving_basic.router)
    if config.api_server in ("openai", "both"):
        app.include_router(serving_chat.router)
        app.include_router(serving_completions.router)
    if config.api_server in ("vllm", "both"):
        app.include_router(serving_generate.router)
    if config.enable_lora and config.allow_runtime_lora_updating:
        from bowline_runtime.api import serving_lora

        app.include_router(serving_lora.router)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_body_bytes)
    app.add_middleware(CatchAllMiddleware)  # added last: outermost, so nothing escapes to uvicorn
    return app
