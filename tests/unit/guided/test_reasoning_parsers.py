"""`<think>` splitting, whole and streamed, and where the reasoning section starts."""

from __future__ import annotations

import pytest
from bowline_runtime.parsers import ThinkReasoningParser, get_reasoning_parser, prompt_opens_reasoning


@pytest.mark.parametrize(
    ("opened_by_prompt", "text", "expected"),
    [
        (True, "step one\nstep two</think>\n\nThe answer.", ("step one\nstep two", "The answer.")),
        (False, "<think>hmm</think>\n\nYes.", ("hmm", "Yes.")),
        (False, "Just an answer.", (None, "Just an answer.")),
        (True, "cut off while thinking", ("cut off while thinking", None)),
        (False, "<think>\n</think>", ("\n", None)),
    ],
)
def test_split(opened_by_prompt, text, expected):
    assert ThinkReasoningParser(opened_by_prompt).split(text) == expected


@pytest.mark.parametrize("step", [1, 2, 3, 7])
@pytest.mark.parametrize(("opened_by_prompt", "text"), [(True, "a</think>\n\nb c"), (False, "<think>x</thi</think>\ny<th")])
def test_streaming_joins_to_the_split(opened_by_prompt, text, step):
    parser = ThinkReasoningParser(opened_by_prompt)
    deltas = [parser.feed(text[i : i + step]) for i in range(0, len(text), step)] + [parser.finish()]
    reasoning = "".join(d.reasoning for d in deltas) or None
    content = "".join(d.content for d in deltas) or None
    assert (reasoning, content) == ThinkReasoningParser(opened_by_prompt).split(text)


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")


def test_registry():
    assert get_reasoning_parser("qwen3") is ThinkReasoningParser
    with pytest.raises(ValueError, match="--reasoning-parser: unknown parser"):
        get_reasoning_parser("nope")
