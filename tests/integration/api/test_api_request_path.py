"""Issue 17 against the real server and engine: forced tool calls without a parser, refused
schemas, and no 5xx for ids no tokenizer can decode."""

from __future__ import annotations

import json

from api_server import MODEL, error_of

TOOL = {
    "type": "function",
    "function": {
        "name": "pick",
        "parameters": {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}}, "required": ["colour"]},
    },
}
MESSAGES = [{"role": "user", "content": "Pick a colour."}]


def test_required_tool_choice_is_served_without_a_parser(openai_client):
    """Defect 9: the server runs without --tool-call-parser; the call is forced by a grammar."""
    reply = openai_client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=[TOOL],
        tool_choice="required",
        parallel_tool_calls=False,  # one call, then the grammar ends the output
        max_tokens=64,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "pick" and json.loads(call.function.arguments)["colour"] in ("red", "blue")


def test_named_tool_choice_is_served_without_a_parser(openai_client):
    named = {"type": "function", "function": {"name": "pick"}}
    reply = openai_client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[TOOL], tool_choice=named, max_tokens=64)
    assert reply.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["pick"]


def test_a_self_referencing_guided_json_is_400(http):
    """Defect 6: it answered 200 with empty (non-JSON) content."""
    schema = {"$ref": "#/definitions/a", "definitions": {"a": {"$ref": "#/definitions/a"}}}
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "guided_json": schema}
    err = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert err["param"] == "guided_json"


def test_token_ids_beyond_32_bits_are_400_on_every_route(http):
    """Defect 1 on the real engine: decode() of such ids raised OverflowError (a 500)."""
    for body in ({"prompt": [-5]}, {"prompt": [[1, 2], [4294967296]]}, {"prompt_token_ids": [2**70]}):
        err = error_of(http.post("/v1/completions", json={"model": MODEL, "max_tokens": 2, "echo": True, **body}), 400)
        assert "vocabulary" in err["message"]
    error_of(http.post("/v1/chat/completions", json={"model": MODEL, "messages": [2**70], "max_tokens": 2}), 400)
    error_of(http.post("/detokenize", json={"model": MODEL, "tokens": [2**70]}), 400)
