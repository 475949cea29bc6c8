"""Bad input against the real server: 4xx with OpenAI's error body, never a 500 or a stack trace."""

from __future__ import annotations

import openai
import pytest
from api_server import MODEL, error_of

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    ("path", "patch", "param"),
    [
        ("/v1/chat/completions", {"temperature": -1}, "temperature"),
        ("/v1/chat/completions", {"top_p": 0}, "top_p"),
        ("/v1/chat/completions", {"top_p": 1.01}, "top_p"),
        ("/v1/chat/completions", {"n": 0}, "n"),
        ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"temperature": "warm"}, "temperature"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": [1, "mixed"]}, "prompt"),
        ("/v1/completions", {"suffix": "fim"}, "suffix"),
        ("/v1/completions", {"use_beam_search": True, "best_of": 2, "temperature": 0.8}, "temperature"),
    ],
)
def test_bad_requests(http, path, patch, param):
    body = {**CHAT, **patch}
    if path == "/v1/completions":
        body.pop("messages", None)
        body.setdefault("prompt", "hi")
    err = error_of(http.post(path, json=body), 400)
    assert err["param"] is not None and err["param"].startswith(param), err


def test_unknown_model_is_404_through_the_sdk(openai_client):
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.chat.completions.create(model="gpt-4o", messages=CHAT["messages"])
    assert info.value.body["code"] == "model_not_found"


def test_prompt_over_max_model_len(http, api_server):
    max_len = http.get("/v1/models").json()["data"][0]["max_model_len"]
    long_prompt = list(range(10, 10 + max_len))
    err = error_of(http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1}), 400)
    assert str(max_len) in err["message"] and str(len(long_prompt)) in err["message"]
    err = error_of(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": max_len}), 400)
    assert str(max_len) in err["message"] and "max_tokens" in err["message"]


def test_out_of_vocabulary_token_ids(http):
    err = error_of(http.post("/v1/completions", json={"prompt": [1, 10**9]}), 400)
    assert "vocabulary" in err["message"]


def test_body_that_is_not_an_object(http):
    error_of(http.post("/v1/chat/completions", content=b"[1, 2]", headers={"Content-Type": "application/json"}), 400)
    error_of(http.post("/v1/chat/completions", content=b""), 400)


def test_unknown_route_and_method(http):
    error_of(http.get("/v1/nothing-here"), 404)
    error_of(http.get("/v1/chat/completions"), 405)


def test_models_endpoint(openai_client):
    models = openai_client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by and models[0].created > 0 and models[0].model_extra["max_model_len"] > 0
