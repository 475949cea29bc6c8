"""Reasoning through the real server: a template that opens `<think>` gives reasoning_content."""

from __future__ import annotations

import json

import jsonschema

MESSAGES = [{"role": "user", "content": "Think, then answer."}]
THINK_END_ID = 4  # "</think>" in the tiny tokenizer (tools/tiny_model.SPECIAL_TOKENS)


def reasoning_of(message) -> str | None:
    """The openai SDK keeps non-OpenAI fields in model_extra; the server omits it when None."""
    return (message.model_extra or {}).get("reasoning_content")


def test_reasoning_budget_ends_the_reasoning_and_splits_the_output(thinking_server):
    response = thinking_server.client().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=24, seed=0,
        extra_body={"reasoning_max_tokens": 8, "ignore_eos": True, "return_token_ids": True},
    )
    message = response.choices[0].message
    ids = message.model_extra["completion_token_ids"]
    assert ids.index(THINK_END_ID) == 8
    assert reasoning_of(message) and message.content
    assert "<think>" not in message.content and "</think>" not in message.content + reasoning_of(message)


def test_streaming_splits_the_same_way(thinking_server):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=24, seed=5, extra_body={"reasoning_max_tokens": 6, "ignore_eos": True})
    client = thinking_server.client()
    whole = client.chat.completions.create(**kwargs).choices[0].message
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            content += c.delta.content or ""
    assert (reasoning, content) == (reasoning_of(whole), whole.content)


def test_enable_thinking_false_reaches_the_template(thinking_server):
    response = thinking_server.client().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=16, seed=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}, "reasoning_max_tokens": 2, "ignore_eos": True, "return_token_ids": True},
    )
    message = response.choices[0].message
    assert reasoning_of(message) is None and message.content
    assert THINK_END_ID not in message.model_extra["completion_token_ids"]  # no budget without a reasoning section


def test_guided_json_starts_after_the_reasoning(thinking_server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2]}}, "required": ["ok", "n"]}
    response = thinking_server.client().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=100, seed=2, extra_body={"guided_json": schema, "reasoning_max_tokens": 10},
    )
    message = response.choices[0].message
    assert reasoning_of(message)
    jsonschema.validate(json.loads(message.content), schema)
