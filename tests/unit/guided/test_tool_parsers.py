"""Hermes tool calls: parsed whole and streamed to the same result; forced calls always parse."""

from __future__ import annotations

import json

import jsonschema
import pytest
from bowline_runtime.engine.sampling_params import GuidedDecodingParams, SamplingParams
from bowline_runtime.guided import compile_constraint
from bowline_runtime.parsers import HermesToolParser, get_tool_parser, tool_call_grammar
from guided_cases import TOOLS
from guided_drive import drive, text_of

TWO_CALLS = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "when": {"day": 1}, "tags": ["a}"]}}'
    '\n</tool_call>\n<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>'
)

def stream(text: str, step: int) -> tuple[str, list[dict]]:
    """Feed `text` in `step`-character pieces; assemble content and calls as an OpenAI client does."""
    parser = HermesToolParser()
    deltas = [parser.feed(text[i : i + step]) for i in range(0, len(text), step)] + [parser.finish()]
    calls: dict[int, dict] = {}
    for delta in deltas:
        for piece in delta.tool_calls:
            call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = piece.id or call["id"]
            call["name"] = piece.name or call["name"]
            call["arguments"] += piece.arguments
    return "".join(d.content for d in deltas), [calls[i] for i in sorted(calls)]


def test_extracts_content_and_every_call_with_arguments_as_written():
    content, calls = HermesToolParser().extract(TWO_CALLS)
    assert content == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city": "Paris", "when": {"day": 1}, "tags": ["a}"]}'),
        ("noop", "{}"),
    ]
    assert calls[0].id != calls[1].id and calls[0].to_openai()["type"] == "function"


@pytest.mark.parametrize("step", [1, 2, 5, 16, 1000])
def test_streaming_assembles_to_the_non_streaming_result(step):
    content, calls = stream(TWO_CALLS, step)
    expected_content, expected = HermesToolParser().extract(TWO_CALLS)
    assert content.strip() == expected_content
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.name, c.arguments) for c in expected]
    assert all(c["id"].startswith("call_") for c in calls)


def test_text_without_a_valid_call_stays_content():
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert HermesToolParser().extract(broken) == (broken, [])
    assert HermesToolParser().extract("plain answer") == ("plain answer", [])
    assert stream("plain <answer>", 3) == ("plain <answer>", [])


def test_an_unclosed_but_complete_call_at_the_end_is_parsed():
    content, calls = HermesToolParser().extract('<tool_call>\n{"name": "f", "arguments": {"x": 1}}')
    assert content is None and [(c.name, c.arguments) for c in calls] == [("f", '{"x": 1}')]


def test_parser_registry_refuses_unknown_names():
    assert get_tool_parser("hermes") is HermesToolParser
    with pytest.raises(ValueError, match="--tool-call-parser: unknown parser 'nope'"):
        get_tool_parser("nope")


def _forced(tokenizer, grammar: str, seed: int) -> str:
    factory = compile_constraint(SamplingParams(guided=GuidedDecodingParams(grammar=grammar)), tokenizer, 2048)
    return text_of(tokenizer, drive(factory(), seed))


@pytest.mark.parametrize("seed", range(8))
def test_required_tool_choice_always_yields_valid_calls(tokenizer, seed):
    text = _forced(tokenizer, tool_call_grammar(TOOLS), seed)
    content, calls = HermesToolParser().extract(text)
    assert content is None and calls, text
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    assert [(c["name"], c["arguments"]) for c in stream(text, 3)[1]] == [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("seed", range(3))
def test_named_tool_choice_calls_that_function_once(tokenizer, seed):
    text = _forced(tokenizer, tool_call_grammar(TOOLS, only="add", parallel=False), seed)
    _, calls = HermesToolParser().extract(text)
    assert [c.name for c in calls] == ["add"]


def test_tool_choice_errors_name_the_problem():
    with pytest.raises(ValueError, match="tool_choice: names function 'nope'"):
        tool_call_grammar(TOOLS, only="nope")
    with pytest.raises(ValueError, match="at least one tool"):
        tool_call_grammar([])
    with pytest.raises(ValueError, match="every tool needs"):
        tool_call_grammar([{"type": "function", "function": {}}])
