"""The server with two tensor-parallel ranks: serves, and stops cleanly when its whole process group is signalled."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp2_server_answers_and_exits_zero_on_sigterm_to_its_process_group(tiny_model_dir, tmp_path):
    port = _free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bowline_runtime", "serve", "--model", str(tiny_model_dir), "--served-model-name", "tiny",
         "--port", str(port), "--device", "cpu", "--tensor-parallel-size", "2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        reply = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 6,
                                                           "temperature": 0, "ignore_eos": True}, timeout=30)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 6
        os.killpg(proc.pid, signal.SIGTERM)  # as a terminal's Ctrl-C or some init systems do
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    output = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in output, output[-2000:]
