"""A server with a tight queue, an API key and logprobs off: 401, 429, the logprob flag, and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from api_server import MODEL, ServerProcess, error_of

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def strict_server(tiny_model_dir, tmp_path_factory):
    server = ServerProcess(
        tiny_model_dir, "--max-num-seqs", "1", "--max-queue-len", "1", "--api-key", KEY,
        log_dir=tmp_path_factory.mktemp("strict-logs"),
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_startup_log_says_what_was_loaded(strict_server):
    log = strict_server.log()
    assert "KV cache" in log and "blocks" in log and "tokens" in log
    assert f"http://127.0.0.1:{strict_server.port}/v1" in log


def test_api_key_guards_v1_but_not_probes(strict_server):
    url = strict_server.url
    err = error_of(httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 1}), 401)
    assert err["code"] == "invalid_api_key"
    error_of(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    assert httpx.get(url + "/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200


def test_openai_sdk_with_api_key(strict_server):
    import openai

    client = openai.OpenAI(base_url=strict_server.url + "/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model=MODEL, prompt="a", max_tokens=2).choices[0].text is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=strict_server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_logprobs_need_enable_logprob(strict_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    err = error_of(httpx.post(strict_server.url + "/v1/chat/completions", json=body, headers=AUTH), 400)
    assert "--enable-logprob" in err["message"]


def test_over_the_queue_bound_is_429_with_retry_after(strict_server):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 400, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(base_url=strict_server.url, headers=AUTH, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(5)))

    responses = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and 429 in codes, codes
    for resp in responses:
        if resp.status_code == 429:
            assert int(resp.headers["Retry-After"]) >= 1
            assert error_of(resp, 429)["code"] == "queue_full"
    assert httpx.post(strict_server.url + "/v1/completions", json={**body, "max_tokens": 2}, headers=AUTH).status_code == 200


def test_sigterm_finishes_in_flight_streams_then_exits_zero(strict_server):
    """Runs last in this module: it stops the server."""
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 300, "ignore_eos": True, "stream": True}
    events: list[str] = []
    first = threading.Event()

    def consume():
        with httpx.stream("POST", strict_server.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as resp:
            for line in resp.iter_lines():
                if line:
                    events.append(line)
                    first.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert first.wait(30)
    strict_server.proc.send_signal(15)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):
        httpx.post(strict_server.url + "/v1/completions", json={**body, "stream": False}, headers=AUTH, timeout=5)
    reader.join(60)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert strict_server.proc.wait(30) == 0
