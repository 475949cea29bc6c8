"""prepare_chat_params: what tools, tool_choice and the prompt's reasoning state do to a request."""

from __future__ import annotations

import pytest
from bowline_runtime.api.parsed_output import UNBOUNDED_REASONING, prepare_chat_params, reasoning_state
from bowline_runtime.api.protocol import ChatCompletionRequest
from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.sampling_params import GuidedDecodingParams, SamplingParams

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


NO_PARSER = EngineConfig(model="m")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_choice_needs_no_parser_and_reads_back_as_tool_calls(tokenizer, choice):
    """Issue 17, defect 9: as in vLLM, required/named are served through a guided grammar in the
    default Hermes format when the server runs without --tool-call-parser."""
    from bowline_runtime.api.chat_output import make_output_processor, prepare_params

    req = request(tools=[TOOL], tool_choice=choice)
    params = prepare_params(req, SamplingParams(), ids(tokenizer, "x"), tokenizer, NO_PARSER)
    assert params.guided is not None and "<tool_call>" in params.guided.grammar
    proc = make_output_processor(req, tokenizer, NO_PARSER)
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    parts = proc.final(text, ids(tokenizer, text))
    assert [(c.function.name, c.function.arguments) for c in parts.tool_calls] == [("add", '{"a": 1}')]
    assert proc.finish_reason("stop") == "tool_calls"


def test_auto_tool_choice_still_needs_a_parser(tokenizer):
    from bowline_runtime.api.chat_output import prepare_params
    from bowline_runtime.api.errors import APIError

    with pytest.raises(APIError, match="--tool-call-parser"):
        prepare_params(request(tools=[TOOL], tool_choice="auto"), SamplingParams(), ids(tokenizer, "x"), tokenizer, NO_PARSER)
