"""VLLM_ENGINE_ITERATION_TIMEOUT_S: a thread that notices a step running too long.

A step cannot be interrupted (it is inside torch or a device runtime), so the watchdog does what a
client needs: it calls `on_timeout` once, from its own thread, while the step is still running; the
engine then fails its requests with a message naming the setting and declares itself dead, so
/health turns 503 and Kubernetes restarts the pod. Used by the in-thread engine (async_engine.py)
and the engine-core process (core_process.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class EngineDeadError(RuntimeError):
    """The step loop crashed; every pending request fails with this."""


class EngineIterationTimeout(EngineDeadError):
    """A step ran longer than VLLM_ENGINE_ITERATION_TIMEOUT_S: its requests fail, the engine is unhealthy."""


def timeout_error(elapsed: float, timeout_s: float) -> EngineIterationTimeout:
    return EngineIterationTimeout(
        f"an engine step has run for {elapsed:.1f} s, over the iteration timeout of {timeout_s:g} s "
        "(VLLM_ENGINE_ITERATION_TIMEOUT_S); the engine is marked unhealthy"
    )


class StepWatchdog:
    """`begin()` / `end()` around each step; `on_timeout(error)` fires once if a step outlives the limit."""

    def __init__(self, timeout_s: float, on_timeout: Callable[[EngineIterationTimeout], None]) -> None:
        self.timeout_s = timeout_s
        self._on_timeout = on_timeout
        self._started: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bowline-step-watchdog", daemon=True)
        self._thread.start()

    def begin(self) -> None:
        self._started = time.monotonic()

    def end(self) -> None:
        self._started = None

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            started = self._started
            if started is None:
                continue
            elapsed = time.monotonic() - started
            if elapsed > self.timeout_s:
                self._on_timeout(timeout_error(elapsed, self.timeout_s))
                return
