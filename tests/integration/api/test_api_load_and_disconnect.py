"""Many concurrent streams through the server, and clients that leave early."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from api_server import MODEL, metric

PROMPTS = ["hello world", "the model serves", "kubernetes operator", "one two three", "json schema object"]


def kv_idle(http: httpx.Client, timeout: float = 15.0) -> float:
    """Wait until no request is running and the KV cache is empty; return the final usage."""
    deadline = time.time() + timeout
    usage = -1.0
    while time.time() < deadline:
        text = http.get("/metrics").text
        usage = metric(text, "vllm:kv_cache_usage_perc")
        if usage == 0 and metric(text, "vllm:num_requests_running") == 0 and metric(text, "vllm:num_requests_waiting") == 0:
            return usage
        time.sleep(0.1)
    return usage


def test_fifty_concurrent_streams_complete_correctly(openai_client, base_url, http):
    expected = {
        p: openai_client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
        for p in PROMPTS
    }

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str, str | None, int]:
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        text, finish, usage = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return prompt, text, finish, usage

    async def main():
        async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, PROMPTS[i % len(PROMPTS)]) for i in range(50)))

    results = asyncio.run(main())
    assert len(results) == 50
    for prompt, text, finish, usage in results:
        assert text == expected[prompt] and finish == "length" and usage == 16
    assert kv_idle(http) == 0


def test_stream_disconnect_frees_kv_blocks(api_server, http):
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=api_server.url, timeout=30) as client, client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(3):
            next(lines)
        text = http.get("/metrics").text
        assert metric(text, "vllm:num_requests_running") == 1 and metric(text, "vllm:kv_cache_usage_perc") > 0
    # Leaving the with-block closes the connection mid-stream.
    assert kv_idle(http) == 0


def test_non_streaming_disconnect_frees_kv_blocks(api_server, http):
    # 2,000 tokens take over a second even on a fast CPU; the client gives up after 0.3 s.
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(api_server.url + "/v1/completions", json=body, timeout=0.3)
    assert kv_idle(http) == 0
    success = http.get("/metrics").text
    assert 'finished_reason="abort"' in success
