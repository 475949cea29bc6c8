"""Streamed chat deltas join to the non-streamed message, including text held back at the very end."""

from __future__ import annotations

import pytest
from bowline_runtime.api.parsed_output import ParsingChatOutputProcessor
from bowline_runtime.api.protocol import ChatCompletionRequest
from bowline_runtime.config import EngineConfig

TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}
CONFIG = EngineConfig(model="m", tool_call_parser="hermes", reasoning_parser="qwen3")
REQUEST = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=[TOOL])


def processor(starts_in_reasoning: bool) -> ParsingChatOutputProcessor:
    return ParsingChatOutputProcessor(REQUEST, None, CONFIG, starts_in_reasoning=starts_in_reasoning)


def stream(text: str, step: int, starts_in_reasoning: bool, empty_last: bool = False) -> tuple[dict, str | None]:
    """Feed `text` as the chat route does, `step` characters a time, the last delta marked finished
    (with `empty_last`, a final snapshot that adds no text, as at EOS); assemble as a client does."""
    proc = processor(starts_in_reasoning)
    cuts = list(range(step, len(text), step)) + [len(text)]
    if empty_last:
        cuts.append(len(text))
    deltas, prev = [], ""
    for n, cut in enumerate(cuts):
        deltas.append(proc.delta(prev, text[:cut], [], finished=n == len(cuts) - 1))
        prev = text[:cut]
    calls: dict[int, dict] = {}
    for d in deltas:
        for piece in d.tool_calls or []:
            call = calls.setdefault(piece.index, {"name": None, "arguments": ""})
            call["name"] = piece.function.name or call["name"]
            call["arguments"] += piece.function.arguments or ""
    message = {
        "content": "".join(d.content or "" for d in deltas) or None,
        "reasoning_content": "".join(d.reasoning_content or "" for d in deltas) or None,
        "tool_calls": [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)],
    }
    return message, proc.finish_reason("stop")


def whole(text: str, starts_in_reasoning: bool) -> tuple[dict, str | None]:
    proc = processor(starts_in_reasoning)
    parts = proc.final(text, [])
    message = {
        "content": parts.content,
        "reasoning_content": parts.reasoning_content,
        "tool_calls": [(c.function.name, c.function.arguments) for c in parts.tool_calls],
    }
    return message, proc.finish_reason("stop")


CASES = [
    # (starts in reasoning, output, what the client must end up with)
    (False, "<thi", {"content": "<thi", "reasoning_content": None, "tool_calls": []}),
    (False, "Use <tool_ca", {"content": "Use <tool_ca", "reasoning_content": None, "tool_calls": []}),
    (True, "still thinking </thi", {"content": None, "reasoning_content": "still thinking </thi", "tool_calls": []}),
    (True, "plan</think>\n\nok <", {"content": "ok <", "reasoning_content": "plan", "tool_calls": []}),
    (False, '<tool_call>\n{"name": "ad', {"content": '<tool_call>\n{"name": "ad', "reasoning_content": None, "tool_calls": []}),
    (
        True,
        'plan</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}',
        {"content": None, "reasoning_content": "plan", "tool_calls": [("add", '{"a": 1}')]},
    ),
    (
        False,
        '<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n',
        {"content": None, "reasoning_content": None, "tool_calls": [("add", "{}"), ("add", '{"a": 2}')]},
    ),
]


@pytest.mark.parametrize("empty_last", [False, True])
@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize(("opened", "text", "expected"), CASES)
def test_stream_releases_held_text_at_the_end_and_matches_final(opened, text, expected, step, empty_last):
    streamed, streamed_reason = stream(text, step, opened, empty_last)
    final, final_reason = whole(text, opened)
    assert final == expected
    assert streamed == expected
    assert streamed_reason == final_reason == ("tool_calls" if expected["tool_calls"] else "stop")


def test_unclosed_call_that_cannot_be_parsed_ends_as_content():
    text = 'Let me add. <tool_call>\n{"name": "add", "arguments": {"a": 1'
    assert whole(text, False)[0]["content"] == text
    for step in (1, 4, 1000):
        assert stream(text, step, False)[0]["content"] == text


def test_without_finished_the_partial_tag_is_still_held():
    proc = processor(False)
    assert proc.delta("", "Use <tool_ca", []).content == "Use "
    assert proc.delta("Use <tool_ca", "Use <tool_ca", [], finished=True).content == "<tool_ca"
