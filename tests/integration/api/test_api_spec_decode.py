"""The real server with n-gram speculation, through the official openai client: the same greedy text as
the plain server, stop strings and max_tokens hold when streaming, and /metrics counts the drafts."""

from __future__ import annotations

import httpx
import pytest
from api_server import MODEL, ServerProcess, metric

PROMPT = "one two three four five one two three four five one two three"


@pytest.fixture(scope="module")
def spec_server(tiny_model_dir, tmp_path_factory):
    server = ServerProcess(tiny_model_dir, "--speculative-config",
                           '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}',
                           log_dir=tmp_path_factory.mktemp("logs"))
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0


def test_ngram_server_matches_the_plain_server_and_counts_its_drafts(spec_server, openai_client):
    import openai

    spec = openai.OpenAI(base_url=spec_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    plain = openai_client.completions.create(**kw).choices[0].text
    assert spec.completions.create(**kw).choices[0].text == plain

    stop = plain[6:9]
    chunks = spec.completions.create(**{**kw, "stop": [stop]}, stream=True)
    streamed = [c.choices[0] for c in chunks if c.choices]
    text = "".join(c.text for c in streamed)
    assert text == plain[: plain.index(stop)] and streamed[-1].finish_reason == "stop"
    short = spec.completions.create(**{**kw, "max_tokens": 5})
    assert short.usage.completion_tokens == 5 and short.choices[0].finish_reason == "length"

    metrics = httpx.get(spec_server.url + "/metrics", timeout=10).text
    drafts = metric(metrics, "vllm:spec_decode_num_drafts_total")
    drafted = metric(metrics, "vllm:spec_decode_num_draft_tokens_total")
    accepted = metric(metrics, "vllm:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and 0 < accepted <= drafted <= 3 * drafts
    assert 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="0"}' in metrics
