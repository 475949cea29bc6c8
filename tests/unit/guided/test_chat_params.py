"""prepare_chat_params: what tools, tool_choice and the prompt's reasoning state do to a request."""

from __future__ import annotations

import pytest
from bowline_runtime.api.protocol import ChatCompletionRequest
from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.sampling_params import GuidedDecodingParams, SamplingParams
from bowline_runtime.parsers.chat_output import UNBOUNDED_REASONING, prepare_chat_params, reasoning_state

TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}
CONFIG = EngineConfig(model="m", tool_call_parser="hermes", reasoning_parser="qwen3")


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_reasoning_state_reads_the_end_of_the_prompt(tokenizer):
    assert reasoning_state(ids(tokenizer, "<|im_start|>assistant\n<think>\n"), tokenizer) == "open"
    assert reasoning_state(ids(tokenizer, "<|im_start|>assistant\n<think>\n\n</think>\n\n"), tokenizer) == "closed"
    assert reasoning_state(ids(tokenizer, "<think>a</think>old answer<|im_end|>\n<|im_start|>assistant\n"), tokenizer) == "none"


@pytest.mark.parametrize(("choice", "forced"), [("required", True), ({"type": "function", "function": {"name": "add"}}, True), ("auto", False), ("none", False)])
def test_only_required_and_named_choices_force_a_grammar(tokenizer, choice, forced):
    params = prepare_chat_params(request(tools=[TOOL], tool_choice=choice), SamplingParams(), ids(tokenizer, "x"), tokenizer, CONFIG)
    assert (params.guided is not None) == forced
    assert params.skip_special_tokens is False  # the parsers must see <tool_call> and <think>


def test_forced_tool_call_refuses_a_second_constraint(tokenizer):
    with pytest.raises(ValueError, match="tool_choice"):
        prepare_chat_params(
            request(tools=[TOOL], tool_choice="required"),
            SamplingParams(guided=GuidedDecodingParams(regex="a")),
            ids(tokenizer, "x"),
            tokenizer,
            CONFIG,
        )


def test_budget_follows_the_prompt(tokenizer):
    closed = ids(tokenizer, "assistant\n<think>\n\n</think>\n\n")
    assert prepare_chat_params(request(), SamplingParams(reasoning_max_tokens=5), closed, tokenizer, CONFIG).reasoning_max_tokens is None
    opened = ids(tokenizer, "assistant\n<think>\n")
    guided = SamplingParams(guided=GuidedDecodingParams(regex="a"))
    assert prepare_chat_params(request(), guided, opened, tokenizer, CONFIG).reasoning_max_tokens == UNBOUNDED_REASONING
    assert prepare_chat_params(request(), SamplingParams(reasoning_max_tokens=5), opened, tokenizer, CONFIG).reasoning_max_tokens == 5
