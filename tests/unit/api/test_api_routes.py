"""The HTTP layer over an engine double: status codes, error bodies, shapes of responses and streams."""

from __future__ import annotations

import json

import pytest
from api_fakes import MODEL, BlockingFactory, FakeEngine, wait_ready

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}]}


def error_of(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def sse_payloads(resp) -> list:
    text = resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


def test_invalid_json_from_the_fastdeploy_page_is_a_400(client):
    raw = '{"messages": [{"role": "user", "content": "Hello!"}], "logprobs": true, "top_logprobs": 0,}'
    err = error_of(client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}), 400)
    assert "Invalid JSON" in err["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.1), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("max_tokens", 0), ("top_logprobs", 21),
     ("temperature", "hot"), ("presence_penalty", 3), ("min_p", 2), ("stop", 5), ("messages", "hi")],
)
def test_bad_values_name_the_field(client, field, value):
    err = error_of(client.post("/v1/chat/completions", json={**CHAT, field: value}), 400)
    assert err["param"] is not None and err["param"].startswith(field)
    assert err["type"] == "invalid_request_error"


def test_completions_logprobs_above_the_limit(client):
    err = error_of(client.post("/v1/completions", json={"prompt": "a", "logprobs": 21}), 400)
    assert err["param"] == "logprobs" and "20" in err["message"]


def test_unknown_model_is_404(client):
    err = error_of(client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"}), 404)
    assert err["code"] == "model_not_found" and "tiny" in err["message"]


def test_missing_model_means_the_served_one(client):
    resp = client.post("/v1/chat/completions", json={"messages": CHAT["messages"]})
    assert resp.status_code == 200 and resp.json()["model"] == MODEL


def test_unknown_fields_are_ignored(client):
    assert client.post("/v1/chat/completions", json={**CHAT, "no_such_field": 1}).status_code == 200


def test_suffix_and_images_are_refused_clearly(client):
    assert "suffix" in error_of(client.post("/v1/completions", json={"prompt": "a", "suffix": "b"}), 400)["message"]
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    message = error_of(client.post("/v1/chat/completions", json={"messages": msg}), 400)["message"]
    assert "text-only" in message and "image_url" in message  # refused before any fetch or decode
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    assert "input_audio" in error_of(client.post("/v1/chat/completions", json={"messages": audio}), 400)["message"]


def test_prompt_over_the_context_names_both_numbers(client):
    err = error_of(client.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 300}), 400)
    assert "256" in err["message"] and "300" in err["message"]


def test_engine_refusal_is_a_400_even_when_streaming(client):
    for stream in (False, True):
        err = error_of(client.post("/v1/completions", json={"prompt": "a", "guided_regex": "(", "stream": stream}), 400)
        assert "compile" in err["message"]


def test_logprobs_off_by_default(make_client):
    client, _ = make_client()
    err = error_of(client.post("/v1/chat/completions", json={**CHAT, "logprobs": True}), 400)
    assert "--enable-logprob" in err["message"] and err["code"] == "logprobs_disabled"


def test_tools_need_a_parser_unless_tool_choice_is_none(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    err = error_of(client.post("/v1/chat/completions", json={**CHAT, "tools": tools}), 400)
    assert "--tool-call-parser" in err["message"]
    assert client.post("/v1/chat/completions", json={**CHAT, "tools": tools, "tool_choice": "none"}).status_code == 200


def test_chat_response_shape_and_usage(client):
    body = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4, "return_token_ids": True}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert len(choice["message"]["completion_token_ids"]) == 4
    usage = body["usage"]
    assert usage["completion_tokens"] == 4
    assert usage["prompt_tokens"] == len(choice["message"]["prompt_token_ids"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4


def test_stream_matches_non_stream_and_ends_with_done(client):
    plain = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5}).json()
    resp = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}})
    chunks = sse_payloads(resp)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert all("usage" not in c for c in chunks[:-1])
    assert all(c["choices"][0]["arrival_time"] >= 0 for c in chunks if c["choices"])


def test_completions_batch_and_n_indexes(client):
    body = client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 3}).json()
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == 12


def test_best_of_returns_the_most_likely(client, make_client):
    body = client.post("/v1/completions", json={"prompt": "a", "best_of": 3, "max_tokens": 3}).json()
    # The double makes candidate 0 the most likely; candidates differ in their first token.
    alone = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 3}).json()
    assert len(body["choices"]) == 1 and body["choices"][0]["text"] == alone["choices"][0]["text"]


def test_best_of_with_stream_is_refused(client):
    error_of(client.post("/v1/completions", json={"prompt": "a", "best_of": 2, "stream": True}), 400)


def test_chat_logprobs_shape(client):
    body = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 2
        lps = [t["logprob"] for t in entry["top_logprobs"]]
        assert lps == sorted(lps, reverse=True)


def test_completion_echo_with_logprobs(client, tokenizer):
    body = client.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 2, "echo": True, "logprobs": 1}).json()
    choice = body["choices"][0]
    assert choice["text"].startswith("hello world")
    lp = choice["logprobs"]
    n_prompt = len(tokenizer.encode("hello world"))
    assert len(lp["tokens"]) == n_prompt + 2 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_completion_stream_echo_and_token_ids(client, tokenizer):
    resp = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3, "echo": True, "stream": True, "return_token_ids": True})
    chunks = sse_payloads(resp)
    assert chunks[0]["choices"][0]["text"].startswith("hello")
    assert chunks[0]["choices"][0]["prompt_token_ids"] == tokenizer.encode("hello")
    ids = [i for c in chunks for i in c["choices"][0]["completion_token_ids"]]
    assert len(ids) == 3


def test_health_is_503_while_loading_then_200(tokenizer):
    from bowline_runtime.api.app import build_app
    from bowline_runtime.config import EngineConfig
    from fastapi.testclient import TestClient

    factory = BlockingFactory(FakeEngine(tokenizer))
    with TestClient(build_app(EngineConfig(model="m"), engine_factory=factory)) as client:
        assert client.get("/health").status_code == 503
        err = error_of(client.post("/v1/completions", json={"prompt": "a"}), 503)
        assert "loading" in err["message"]
        factory.release.set()
        wait_ready(client)


def test_api_key(make_client):
    client, _ = make_client(api_key="s3cret")
    assert error_of(client.get("/v1/models"), 401)["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_models_tokenize_detokenize_version(client, tokenizer):
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == MODEL and card["max_model_len"] == 256 and card["owned_by"] and card["created"] > 0
    tok = client.post("/tokenize", json={"prompt": "hello world"}).json()
    assert tok["tokens"] == tokenizer.encode("hello world") and tok["count"] == len(tok["tokens"])
    assert client.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "hello world"
    chat = client.post("/tokenize", json={"messages": CHAT["messages"]}).json()
    assert tokenizer.decode(chat["tokens"]).startswith("<|im_start|>user\nHello!")
    assert client.get("/version").json()["version"]


def test_metrics_use_vllm_names(client):
    client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
    text = client.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:time_per_output_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert name in text, name
    assert 'vllm:generation_tokens_total{model_name="tiny"} 2.0' in text


def test_a_failed_load_is_reported_and_signalled():
    from bowline_runtime.api.app import build_app
    from bowline_runtime.config import EngineConfig
    from fastapi.testclient import TestClient

    failures = []

    def broken(_):
        raise OSError("no config.json in /models/x")

    with TestClient(build_app(EngineConfig(model="m"), engine_factory=broken, on_load_failure=failures.append)) as client:
        import time

        deadline = time.time() + 5
        while not failures and time.time() < deadline:
            time.sleep(0.01)
        assert failures and isinstance(failures[0], OSError)
        resp = client.get("/health")
        assert resp.status_code == 503 and "no config.json" in resp.json()["status"]
        assert "no config.json" in error_of(client.post("/v1/completions", json={"prompt": "a"}), 503)["message"]


class _CrashingEngine(FakeEngine):
    """Fails after the first snapshot, the way a dying engine loop does."""

    async def generate(self, prompt_token_ids, params, request_id=None, arrival_time=None):
        async for out in super().generate(prompt_token_ids, params, request_id, arrival_time):
            yield out
            raise type("EngineDeadError", (RuntimeError,), {})("step loop crashed")


def test_engine_failure_mid_stream_is_reported_in_band_then_done(make_client, tokenizer):
    client, _ = make_client(engine=_CrashingEngine(tokenizer))
    chunks = sse_payloads(client.post("/v1/completions", json={"prompt": "a", "max_tokens": 4, "stream": True}))
    assert chunks[-1]["error"]["type"] == "service_unavailable" and "Traceback" not in chunks[-1]["error"]["message"]
    error_of(client.post("/v1/completions", json={"prompt": "a", "max_tokens": 4}), 503)
