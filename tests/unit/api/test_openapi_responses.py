"""Issue 17, defect 7: the OpenAPI document lists the statuses the server really answers, each
error with OpenAI's error schema, and no 422 (which it never sends)."""

from __future__ import annotations

import pytest
from api_fakes import MODEL
from bowline_runtime.api.app import build_app
from bowline_runtime.config import EngineConfig
from fastapi.testclient import TestClient

ERROR_REF = "#/components/schemas/ErrorResponse"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}

# (method, path, body that is valid there): each route is driven into each status it can answer.
ROUTES = [
    ("post", "/v1/chat/completions", CHAT),
    ("post", "/v1/completions", COMPLETION),
    ("post", "/tokenize", {"model": MODEL, "prompt": "hi"}),
    ("post", "/detokenize", {"model": MODEL, "tokens": [1, 2]}),
    ("get", "/v1/models", None),
]


def documented(client: TestClient, method: str, path: str) -> dict:
    return client.app.openapi()["paths"][path][method]["responses"]


def call(client: TestClient, method: str, path: str, body: dict | None, **kw):
    return client.request(method.upper(), path, json=body, **kw) if body is not None else client.request(method.upper(), path, **kw)


def assert_documented(client: TestClient, method: str, path: str, resp) -> None:
    responses = documented(client, method, path)
    assert str(resp.status_code) in responses, (method, path, resp.status_code, sorted(responses))
    if resp.status_code >= 400 and path != "/health":
        schema = responses[str(resp.status_code)]["content"]["application/json"]["schema"]
        assert schema == {"$ref": ERROR_REF}
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_status_the_server_answers_is_documented(make_client, tokenizer, method, path, body):
    client, _ = make_client(api_key="k", max_request_body_bytes=2**16)
    auth = {"Authorization": "Bearer k"}
    seen = {}
    seen[200] = call(client, method, path, body, headers=auth)
    seen[401] = call(client, method, path, body)
    if body is not None:
        seen[400] = call(client, method, path, {**body, "model": 5}, headers=auth)
        seen[404] = call(client, method, path, {**body, "model": "gpt-4o"}, headers=auth)
        seen[413] = client.request(method.upper(), path, content=b"x" * (2**16 + 1), headers=auth)
    for status, resp in seen.items():
        assert resp.status_code == status, (path, status, resp.text)
        assert_documented(client, method, path, resp)


def test_503_while_loading_and_429_when_full_are_documented(tokenizer):
    never = TestClient(build_app(EngineConfig(model="/m", served_model_name=MODEL), engine_factory=lambda _: __import__("time").sleep(30)))
    with never:
        for method, path, body in ROUTES[:4]:
            resp = call(never, method, path, body)
            assert resp.status_code == 503
            assert_documented(never, method, path, resp)
        health = never.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        assert_documented(never, "get", "/health", health)
    for method, path, _ in ROUTES[:2]:  # 429 itself is driven in tests/integration (queue bound)
        assert documented(never, method, path)["429"]["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}


def test_health_documents_an_empty_200_and_no_route_documents_422(client):
    doc = client.get("/openapi.json").json()
    health = doc["paths"]["/health"]["get"]["responses"]
    assert "application/json" not in health["200"].get("content", {})
    assert client.get("/health").content == b""
    assert "503" in health and "draining" in health["503"]["description"]
    for methods in doc["paths"].values():
        for operation in methods.values():
            assert "422" not in operation["responses"]
