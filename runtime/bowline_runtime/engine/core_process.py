"""The engine core's own process: load the model, schedule, run, sample, and send each step's outputs.

The API process starts this with multiprocessing's spawn context, so no torch or OpenMP state is
inherited and the OpenMP pool is sized here, for the cores this process may use, before torch loads.
Requests arrive on a PULL socket and outputs leave on a PUSH socket (ZeroMQ over ipc sockets in a
private temp dir); messages are pickled tuples (see `messages`). The loop polls its parent: when the
API process is gone (even after kill -9) the core exits instead of holding the cores as an orphan.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from typing import Any

from bowline_runtime.config import EngineConfig
from bowline_runtime.devices.host_memory import IdleRelease
from bowline_runtime.engine.step_watchdog import StepWatchdog

logger = logging.getLogger("bowline.engine")

# How long an idle core waits for a request before it looks at its parent again (ms).
IDLE_POLL_MS = 200
# Failed steps in a row after which the core gives up (as the in-process engine does).
MAX_CONSECUTIVE_STEP_FAILURES = 3
# Seconds the iteration-timeout exit waits for its farewell messages before it ends the process anyway.
GIVE_UP_EXIT_S = 5.0


def _place_threads() -> int:
    """Size torch's pool from the usable cores before torch loads; the API process keeps one thread.

    No OpenMP wait policy is set. Measured c=1 TPOT through HTTP (bench model, 128 tokens, median of
    8 requests, 2 shared AVX2 cores): default (spinning) 11.6-13.4 ms in three runs, OMP_WAIT_POLICY=
    PASSIVE 17.8 and 18.6 ms in two: sleeping barriers pay a wake-up in each of a step's many parallel
    regions, ~45 % on a quiet machine. Whether PASSIVE (or a small GOMP_SPINCOUNT) helps when another
    process is busy was not settled by these runs, so it is left to the operator's environment.
    """
    from bowline_runtime.devices.threads import usable_cores

    cores = usable_cores()
    os.environ.setdefault("OMP_NUM_THREADS", str(cores))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(cores)
    return cores


class EngineStepErrorLike(RuntimeError):
    """A failed step, reported to the requests in it as an internal error (not a client error)."""


def _error(request_id: str, exc: BaseException) -> tuple:
    """An error message that keeps the exception's class name, message and `param` for the API side."""
    client = isinstance(exc, ValueError)
    return ("error", request_id, type(exc).__module__, type(exc).__name__, str(exc), getattr(exc, "param", None), client)


def run_engine_core(config: EngineConfig, in_addr: str, out_addr: str, parent_pid: int) -> None:
    """The process entry point (spawned): serve until told to stop or until the parent is gone."""
    import zmq

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cores = _place_threads()
    ctx = zmq.Context(1)
    pull = ctx.socket(zmq.PULL)
    pull.connect(in_addr)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(out_addr)
    try:
        from bowline_runtime.engine.llm_engine import LLMEngine

        engine = LLMEngine(config)
        engine.tp.exit_on_failure = True  # a lost rank ends this process, which the server sees at once
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails its start
        push.send(pickle.dumps(("load_failed", type(exc).__name__, str(exc))))
        push.close()
        ctx.term()
        return
    logger.info("engine core pid %d with %d compute threads", os.getpid(), cores)
    push.send(pickle.dumps(("ready", {
        "max_model_len": engine.max_model_len,
        "vocab_size": engine.vocab_size,
        "device_type": engine.device.type,
        "device_name": getattr(engine.device, "name", engine.device.type),
        "dtype": engine.dtype,
        "eos_token_ids": set(engine.eos_token_ids),
        "image_token_id": engine.image_token_id,
        "stats": engine.stats(),
        "pid": os.getpid(),
    })))
    watchdog = None
    if config.engine_iteration_timeout_s is not None:
        watchdog = StepWatchdog(config.engine_iteration_timeout_s, lambda exc: _give_up(engine, out_addr, exc))
    try:
        _serve(engine, pull, push, parent_pid, watchdog)
    finally:
        engine.shutdown()
        push.close(linger=500)
        pull.close(linger=0)
        ctx.term()


def _lora_done(engine: Any, token: str) -> bytes:
    """The reply to a LoRA load/unload: the adapters served now, for the API side's /v1/models."""
    return pickle.dumps(("lora_done", token, engine.lora.modules()))


def _handle_lora(engine: Any, message: tuple, push: Any, unloading: dict[str, int]) -> None:
    """Load or unload an adapter between steps; an unload answers once its last request has ended."""
    _, token, op, name, path = message
    try:
        if engine.lora is None:
            from bowline_runtime.engine.errors import RequestRejected

            raise RequestRejected("LoRA is not enabled on this server (start it with --enable-lora)", "lora_name")
        if op == "load":
            from bowline_runtime.lora.modules import LoRAModule

            engine.lora.add(LoRAModule(name, path))
        else:
            lora_id = engine.lora.remove(name)
            if not engine.lora.is_gone(lora_id):
                unloading[token] = lora_id
                return
    except Exception as exc:  # refused: the caller hears why
        push.send(pickle.dumps(_error(token, exc)))
        return
    push.send(_lora_done(engine, token))


def _finish_unloads(engine: Any, push: Any, unloading: dict[str, int]) -> None:
    for token, lora_id in list(unloading.items()):
        if engine.lora.is_gone(lora_id):
            del unloading[token]
            push.send(_lora_done(engine, token))


def _handle(engine: Any, message: tuple, push: Any, unloading: dict[str, int] | None = None) -> bool:
    """Apply one request message; False when told to stop."""
    kind = message[0]
    if kind == "lora":
        _handle_lora(engine, message, push, {} if unloading is None else unloading)
        return True
    if kind == "add":
        _, request_id, prompt_token_ids, params, arrival, *rest = message
        try:
            prepared = engine.check_request(prompt_token_ids, params, rest[0] if rest else None)
            engine.add_request(request_id, prepared, arrival)
        except Exception as exc:  # refused: only that request hears of it
            push.send(pickle.dumps(_error(request_id, exc)))
    elif kind == "abort":
        engine.abort_request(message[1])
    elif kind == "stop":
        return False
    return True


def _give_up(engine: Any, out_addr: str, exc: BaseException) -> None:
    """The iteration timeout fired (watchdog thread, the step still running): tell each request in
    flight why, on a socket of this thread's own, then exit; the client sees the process die and
    marks the engine dead."""
    import zmq

    logger.error("%s; failing the requests in flight and exiting", exc)
    # The exit must not hang on the farewell: if a message cannot go out, the process still ends.
    backstop = threading.Timer(GIVE_UP_EXIT_S, os._exit, (1,))
    backstop.daemon = True
    backstop.start()
    ctx = zmq.Context(1)
    push = ctx.socket(zmq.PUSH)
    push.connect(out_addr)
    for _ in range(3):  # the engine thread may change the dict meanwhile
        try:
            request_ids = list(engine.requests)
            break
        except RuntimeError:
            request_ids = []
    for request_id in request_ids:
        push.send(pickle.dumps(_error(request_id, exc)))
    push.close(linger=2000)
    ctx.term()
    os._exit(1)


def _serve(engine: Any, pull: Any, push: Any, parent_pid: int, watchdog: StepWatchdog | None = None) -> None:
    failures = 0
    unloading: dict[str, int] = {}  # LoRA unloads waiting for their adapter's last request, by reply token
    idle = IdleRelease(engine.tp.release_idle_memory)
    while True:
        if os.getppid() != parent_pid:
            logger.warning("the API process is gone; the engine core exits")
            return
        timeout = 0 if engine.has_unfinished_requests() else IDLE_POLL_MS
        handled = False
        while pull.poll(timeout):
            if not _handle(engine, pickle.loads(pull.recv()), push, unloading):
                return
            timeout, handled = 0, True
        if unloading:  # an abort may have ended an unloading adapter's last request
            _finish_unloads(engine, push, unloading)
        busy = engine.has_unfinished_requests()
        idle.tick(busy)
        if not busy:
            if handled:  # an abort freed blocks with no step to carry the new gauges: send them alone
                push.send(pickle.dumps(("stats", engine.stats())))
            continue
        try:
            if watchdog is not None:
                watchdog.begin()
            outputs = engine.step()
        except Exception as exc:
            failures += 1
            if engine.tp.world_size > 1 or failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                raise
            logger.exception("engine step failed; failing the requests in flight")
            for request_id in list(engine.requests):
                engine.abort_request(request_id)
                push.send(pickle.dumps(_error(request_id, EngineStepErrorLike(f"generation failed: {exc!r}"))))
            continue
        finally:
            if watchdog is not None:
                watchdog.end()
        failures = 0
        if unloading:
            _finish_unloads(engine, push, unloading)
        # The gauges ride on every step's message, so /metrics reads a cached copy and never waits.
        push.send(pickle.dumps(("outputs", outputs, engine.stats(), time.time())))
