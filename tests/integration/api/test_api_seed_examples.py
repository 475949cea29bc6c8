"""The requests of the reference documents, sent as their curl lines send them.

Only `model` is adapted: the documents' servers were started with their own served names
(chinese-llama-alpaca-2, a model path); this one serves "tiny".
"""

from __future__ import annotations

import json

import pytest
from api_server import MODEL, error_of

FASTDEPLOY_CHAT = '{\n  "messages": [\n    {"role": "user", "content": "Hello!"}\n  ]\n}'
FASTDEPLOY_LOGPROBS_INVALID = '{\n  "messages": [\n    {"role": "user", "content": "Hello!"}\n  ],\n  "logprobs": true, "top_logprobs": 0,\n}'
FASTDEPLOY_COMPLETION = '{\n  "prompt": "以下是一篇关于深圳文心公园的500字游记和赏析:"\n}'
ALPACA_COMPLETION = {"model": "chinese-llama-alpaca-2", "prompt": "告诉我中国的首都在哪里"}
ALPACA_COMPLETION_PARAMS = {
    "model": "chinese-llama-alpaca-2", "prompt": "告诉我中国和美国分别各有哪些优点缺点",
    "max_tokens": 90, "temperature": 0.7, "num_beams": 4, "top_k": 40,
}
ALPACA_CHAT = {"model": "chinese-llama-alpaca-2", "messages": [{"role": "user", "content": "给我讲一些有关杭州的故事吧"}]}
ALPACA_CHAT_MULTI = {
    "model": "chinese-llama-alpaca-2",
    "messages": [
        {"role": "user", "content": "给我讲一些有关杭州的故事吧"},
        {"role": "assistant", "content": "好的,请问您对杭州有什么特别的偏好吗?"},
        {"role": "user", "content": "我比较喜欢和西湖,可以给我讲一下西湖吗"},
    ],
    "repetition_penalty": 1.0,
}
ASCEND_CHAT = {
    "model": "${model_path}", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100,
    "top_k": -1, "top_p": 1, "temperature": 0, "ignore_eos": False, "stream": False,
}
ASCEND_GUIDED = {
    "model": "${container_model_path}", "max_tokens": 200, "temperature": 0,
    "prompt": "Meet our valorous character, named Knight, who has reached the age of 32. Please provide details "
    "for this character, including their Name, Age, preferred Armor, Weapon, and Strength",
    "guided_json": json.dumps({
        "title": "Character", "type": "object",
        "properties": {
            "name": {"title": "Name", "maxLength": 10, "type": "string"},
            "age": {"title": "Age", "type": "integer"},
            "armor": {"$ref": "#/definitions/Armor"},
            "weapon": {"$ref": "#/definitions/Weapon"},
            "strength": {"title": "Strength", "type": "integer"},
        },
        "required": ["name", "age", "armor", "weapon", "strength"],
        "definitions": {
            "Armor": {"title": "Armor", "enum": ["leather", "chainmail", "plate"], "type": "string"},
            "Weapon": {"title": "Weapon", "enum": ["sword", "axe", "mace", "spear", "bow", "crossbow"], "type": "string"},
        },
    }),
}
README_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}


def served(body: dict) -> dict:
    return {**body, "model": MODEL} if "model" in body else body


def post_raw(http, path: str, raw: str):
    return http.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})


def test_fastdeploy_chat(http):
    body = post_raw(http, "/v1/chat/completions", FASTDEPLOY_CHAT).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] >= 1


def test_fastdeploy_logprobs_example_is_invalid_json_and_a_clear_400(http):
    err = error_of(post_raw(http, "/v1/chat/completions", FASTDEPLOY_LOGPROBS_INVALID), 400)
    assert "Invalid JSON" in err["message"] and "trailing comma" in err["message"]


def test_fastdeploy_logprobs_example_without_the_trailing_comma(http):
    fixed = FASTDEPLOY_LOGPROBS_INVALID.replace('"top_logprobs": 0,\n}', '"top_logprobs": 0, "max_tokens": 8\n}')
    body = post_raw(http, "/v1/chat/completions", fixed).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    assert all(entry["logprob"] <= 0 and entry["top_logprobs"] == [] for entry in content)


def test_fastdeploy_completion(http):
    body = post_raw(http, "/v1/completions", FASTDEPLOY_COMPLETION.replace("\n}", ', "max_tokens": 16\n}')).json()
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)


@pytest.mark.parametrize(
    "body",
    [ALPACA_COMPLETION, ALPACA_COMPLETION_PARAMS, ASCEND_GUIDED],
    ids=["alpaca-completion", "alpaca-num-beams", "ascend-guided-json"],
)
def test_completion_examples(http, body):
    body = served(body)
    body.setdefault("max_tokens", 16)
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] in {"stop", "length"}
    if "guided_json" in body and choice["finish_reason"] == "stop":
        character = json.loads(choice["text"])
        assert character["armor"] in {"leather", "chainmail", "plate"}


@pytest.mark.parametrize("body", [ALPACA_CHAT, ALPACA_CHAT_MULTI, ASCEND_CHAT, README_CHAT], ids=["alpaca", "alpaca-multi-turn", "ascend", "readme"])
def test_chat_examples(http, body):
    body = {"max_tokens": 16, **served(body)}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["role"] == "assistant"


def test_ascend_beam_search_example(http):
    """The Ascend document's /generate body, sent to /v1/completions."""
    body = {"prompt": "hello", "max_tokens": 20, "top_p": 1, "temperature": 0, "ignore_eos": False, "top_k": -1,
            "use_beam_search": True, "best_of": 2, "length_penalty": 2}
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    again = http.post("/v1/completions", json=body).json()
    assert resp.json()["choices"][0]["text"] == again["choices"][0]["text"]  # beam search is deterministic
