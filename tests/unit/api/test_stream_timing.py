"""A stream puts each token on the wire as soon as the engine makes it, over real HTTP (uvicorn).

The engine double makes its first token, then holds every later one until the test has seen the
first chunk arrive (or a few seconds pass). A server that waited for the next snapshot before
writing the current one would only deliver the first token after the gate opened.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from api_fakes import MODEL, FakeEngine
from bowline_runtime.api.app import build_app
from bowline_runtime.config import EngineConfig

HOLD_S = 3.0


class GatedEngine(FakeEngine):
    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self.gate = threading.Event()
        self.gave_up_waiting = False  # the hold ran out: nobody opened the gate in time

    async def generate(self, *args, **kwargs):
        first = True
        async for out in super().generate(*args, **kwargs):
            if not first:
                deadline = time.monotonic() + HOLD_S
                while not self.gate.is_set():
                    if time.monotonic() > deadline:
                        self.gave_up_waiting = True
                        break
                    await asyncio.sleep(0.01)
            first = False
            yield out


@pytest.fixture
def gated_server(tokenizer):
    engine = GatedEngine(tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(EngineConfig(model="/models/tiny", served_model_name=MODEL), engine_factory=lambda _: engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    yield base, engine
    server.should_exit = True
    thread.join(10)


def _token_text(chunk: dict) -> str:
    if not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "a"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ],
)
def test_first_token_is_sent_before_the_next_one_is_made(gated_server, path, body):
    base, engine = gated_server
    request = {"model": MODEL, **body, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", base + path, json=request, timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: {") and _token_text(json.loads(line[6:])):
                break
        engine.gate.set()
        rest = [line for line in lines if line.startswith("data:")]
    assert not engine.gave_up_waiting, "the first token reached the client only after the engine made the next one"
    assert rest[-1] == "data: [DONE]"
    assert sum(bool(_token_text(json.loads(line[6:]))) for line in rest[:-1]) == 2  # the other two tokens follow
