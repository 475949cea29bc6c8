"""The engine core in its own process (BOWLINE_ENGINE_PROCESS=1): a child of the server that dies
with it, whose death the server survives and reports, and whose answers match the in-thread engine."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from api_server import MODEL, ServerProcess


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _engine_core_pid(server: ServerProcess) -> int:
    """The spawned child that loaded the model (the log names it); not multiprocessing's tracker."""
    for line in server.log().splitlines():
        if "engine core pid" in line:
            pid = int(line.split("engine core pid")[1].split()[0])
            assert pid in _children(server.proc.pid)
            return pid
    raise AssertionError("the server log names no engine core process:\n" + server.log()[-3000:])


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def core_server(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BOWLINE_ENGINE_PROCESS", "1")
    server = ServerProcess(tiny_model_dir, log_dir=tmp_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_engine_runs_in_a_child_process_and_answers(core_server):
    core = _engine_core_pid(core_server)
    assert core != core_server.proc.pid
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    whole = httpx.post(core_server.url + "/v1/completions", json=body, timeout=60).json()
    assert whole["usage"]["completion_tokens"] == 12
    streamed = []
    with httpx.stream("POST", core_server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                streamed.extend(c["text"] for c in json.loads(line[6:])["choices"])
    assert "".join(streamed) == whole["choices"][0]["text"]


def test_engine_side_rejection_is_the_same_400(core_server):
    # The grammar compiles in the engine (LLMEngine.check_request), so in the core process.
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "guided_regex": "(unclosed"}
    resp = httpx.post(core_server.url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and "Traceback" not in error["message"]
    assert httpx.get(core_server.url + "/health", timeout=5).status_code == 200


def test_killing_the_engine_fails_requests_and_health_but_not_the_server(core_server):
    core = _engine_core_pid(core_server)
    outcome: dict[str, object] = {}
    streaming = threading.Event()

    def stream_long() -> None:
        # As long as the model allows (2,048 positions): the kill must land while tokens still flow,
        # and a fast CPU writes 1,500 tiny-model tokens in about a second.
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        lines: list[str] = []
        outcome["lines"] = lines
        try:
            with httpx.stream("POST", core_server.url + "/v1/completions", json=body, timeout=30) as resp:
                for line in resp.iter_lines():
                    lines.append(line)
                    if line.startswith("data: {"):
                        streaming.set()
        except httpx.HTTPError as exc:
            outcome["error"] = exc
        finally:
            streaming.set()

    thread = threading.Thread(target=stream_long)
    thread.start()
    assert streaming.wait(30), "the stream never started"
    os.kill(core, signal.SIGKILL)
    thread.join(20)
    assert not thread.is_alive(), "the in-flight stream hung after the engine died"
    lines = outcome["lines"]
    assert isinstance(lines, list) and any(line.startswith("data: {") for line in lines)
    assert "error" in outcome or not any('"finish_reason":"length"' in line for line in lines)
    assert any("error" in line for line in lines) or "error" in outcome
    assert httpx.get(core_server.url + "/health", timeout=5).status_code == 503
    resp = httpx.post(core_server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=10)
    assert resp.status_code == 503
    assert core_server.proc.poll() is None


def test_stopping_the_server_stops_the_engine(core_server):
    core = _engine_core_pid(core_server)
    assert core_server.stop() == 0
    assert _wait_gone(core, 10)


def test_a_killed_server_leaves_no_engine_behind(core_server):
    core = _engine_core_pid(core_server)
    core_server.proc.kill()
    core_server.proc.wait()
    assert _wait_gone(core, 10), "the engine core outlived its killed API process"
