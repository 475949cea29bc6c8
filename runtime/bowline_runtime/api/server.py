"""`bowline-runtime serve`: run the app under uvicorn with Kubernetes-friendly shutdown.

SIGTERM (a rolling update, a scale-down) stops accepting connections, marks the server not
ready, lets in-flight requests finish for up to `--shutdown-grace-period` seconds, shuts the
engine down and exits 0. A model that fails to load exits 1, so the pod restarts visibly.
"""

from __future__ import annotations

import logging
import os

import uvicorn

from bowline_runtime.api.app import build_app
from bowline_runtime.api.state import ServerState
from bowline_runtime.config import EngineConfig

logger = logging.getLogger("bowline.api")


class _Server(uvicorn.Server):
    """uvicorn's server, plus: flip readiness off the moment a stop signal arrives."""

    state: ServerState | None = None

    def handle_exit(self, sig: int, frame) -> None:  # type: ignore[override]
        if self.state is not None and not self.state.draining:
            self.state.draining = True
            logger.info("stop signal received: finishing in-flight requests (up to %ss)", self.config.timeout_graceful_shutdown)
        super().handle_exit(sig, frame)
        # uvicorn re-raises a captured signal once it has stopped, so the process would die "by
        # SIGTERM" (exit -15) after a clean drain; Kubernetes and supervisors expect 0 for that.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def run_server(config: EngineConfig) -> int:
    """Serve until stopped. Returns the process exit code."""
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    from bowline_runtime.launch_notes import log_launch_notes

    log_launch_notes(config, os.environ)
    exit_code = 0
    server: _Server | None = None

    def on_load_failure(_: BaseException) -> None:
        nonlocal exit_code
        exit_code = 1
        if server is not None:
            server.should_exit = True

    try:
        app = build_app(config, on_load_failure=on_load_failure)
    except ValueError as exc:  # e.g. an unreadable --chat-template
        logger.error("cannot start: %s", exc)
        return 2
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level.lower(),
        timeout_graceful_shutdown=int(config.shutdown_grace_period),
        lifespan="on",
    )
    server = _Server(uv_config)
    server.state = app.state.bowline
    server.run()
    if not server.started:
        return exit_code or 1
    return exit_code
