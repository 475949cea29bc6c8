"""Guided decoding and forced tool calls through the real server, with the official openai client.

The tiny model has random weights: whatever it prefers, the grammar must make the output valid.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest
from guided_cases import SCHEMA, TOOLS

MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]


PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


async def _chat(client: openai.AsyncOpenAI, **kwargs):
    return await client.chat.completions.create(model="tiny", messages=MESSAGES, **kwargs)


def test_guided_json_validates_for_20_seeds_at_temperature_1(server):
    async def run():
        client = server.async_client()
        return await asyncio.gather(
            *[_chat(client, temperature=1.0, seed=seed, max_tokens=400, extra_body={"guided_json": SCHEMA}) for seed in range(20)]
        )

    for response in asyncio.run(run()):
        choice = response.choices[0]
        assert choice.finish_reason == "stop" and response.usage.completion_tokens < 400
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert "\n" not in choice.message.content  # compact by default


def test_every_spelling_of_a_json_schema_is_honoured(server):
    client = server.client()
    spellings = [
        {"extra_body": {"guided_json": json.dumps(SCHEMA)}},
        {"extra_body": {"structured_outputs": {"json": SCHEMA}}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}},
    ]
    for kwargs in spellings:
        response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=400, seed=3, **kwargs)
        jsonschema.validate(json.loads(response.choices[0].message.content), SCHEMA)
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, response_format={"type": "json_object"})
    assert response.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("seed", range(4))
def test_regex_choice_and_grammar_outputs_match(server, seed):
    client = server.client()

    def content(**extra):
        response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=100, seed=seed, extra_body=extra)
        assert response.choices[0].finish_reason == "stop"
        return response.choices[0].message.content

    assert re.fullmatch(r"[a-z]{2,6}-[0-9]{1,3}", content(guided_regex=r"[a-z]{2,6}-[0-9]{1,3}"))
    assert content(guided_choice=["red", "green", "blue sky"]) in {"red", "green", "blue sky"}
    assert content(structured_outputs={"choice": ["up", "down"]}) in {"up", "down"}
    gbnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", content(guided_grammar=gbnf))


def test_guided_and_free_requests_share_the_batch(server):
    async def run():
        client = server.async_client()
        guided = [_chat(client, seed=s, max_tokens=400, extra_body={"guided_json": SCHEMA}) for s in range(4)]
        free = [_chat(client, seed=s, max_tokens=40, extra_body={"ignore_eos": True}) for s in range(4)]
        return await asyncio.gather(*guided, *free)

    results = asyncio.run(run())
    for response in results[:4]:
        jsonschema.validate(json.loads(response.choices[0].message.content), SCHEMA)
    for response in results[4:]:
        assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 40
    # A free request must not have been constrained by its guided neighbours.
    assert any(not r.choices[0].message.content.lstrip().startswith("{") for r in results[4:])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"guided_json": {"type": "strin"}}, "guided_json"),
        ({"guided_regex": "a(b"}, "unclosed group"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_grammar": "start: nowhere"}, "guided_grammar"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "at most one"),
        ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_problem(server, extra, message):
    with pytest.raises(openai.BadRequestError, match=message):
        server.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, extra_body=extra)


@pytest.mark.parametrize("seed", range(6))
def test_required_tool_choice_yields_a_valid_call_streamed_the_same(server, seed):
    client = server.client()
    kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", seed=seed, max_tokens=400)
    response = client.chat.completions.create(**kwargs)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])

    streamed: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for piece in c.delta.tool_calls or []:
                call = streamed.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = piece.id or call["id"]
                call["name"] += (piece.function.name or "") if piece.function else ""
                call["arguments"] += (piece.function.arguments or "") if piece.function else ""
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]
    assert all(c["id"] for c in streamed.values())


def test_named_tool_choice_calls_that_function(server):
    response = server.client().chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=400, seed=1,
        tool_choice={"type": "function", "function": {"name": "add"}},
    )
    calls = response.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["add"]
    jsonschema.validate(json.loads(calls[0].function.arguments), PARAMS["add"])


def _assemble(stream) -> tuple[str | None, list[tuple[str, str]], str | None]:
    content, calls, finish = "", {}, None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            content += c.delta.content or ""
            for piece in c.delta.tool_calls or []:
                call = calls.setdefault(piece.index, ["", ""])
                call[0] += piece.function.name or ""
                call[1] += piece.function.arguments or ""
    return content or None, [tuple(calls[i]) for i in sorted(calls)], finish


@pytest.mark.parametrize(
    ("extra", "content", "calls"),
    [
        # The output ends with what may be the start of `<tool_call>`: held back, then flushed.
        ({"guided_regex": r"Use <tool_ca"}, "Use <tool_ca", []),
        # A call cut off before its JSON is complete is text, streamed or not.
        ({"guided_grammar": '%llguidance {}\nstart: <tool_call> "\\n{\\"name\\": \\"ad"'}, '<tool_call>\n{"name": "ad', []),
        # A call cut before `</tool_call>` whose JSON is complete is a call.
        (
            {"guided_grammar": '%llguidance {}\nstart: <tool_call> "\\n{\\"name\\": \\"add\\", \\"arguments\\": {\\"a\\": 1}}"'},
            None,
            [("add", '{"a": 1}')],
        ),
    ],
)
def test_stream_ending_inside_a_tag_delivers_the_same_message(server, extra, content, calls):
    client = server.client()
    kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=40, seed=0, extra_body=extra)
    whole = client.chat.completions.create(**kwargs).choices[0]
    whole_calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert (whole.message.content, whole_calls) == (content, calls)
    assert _assemble(client.chat.completions.create(stream=True, **kwargs)) == (content, calls, whole.finish_reason)
