"""Chat glue for the parsers: request-side preparation and the output processor the API uses.

`prepare_chat_params` runs once per chat request after its SamplingParams are built: it turns
`tool_choice: required` / a named function into a guided grammar, keeps special tokens in the text
when a parser needs to see `<tool_call>` or `<think>`, and fits the reasoning budget to the prompt.
`make_chat_output_processor` gives each choice a processor that splits reasoning from content and
content from tool calls, whole or streamed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bowline_runtime.api.chat_output import ChatOutputProcessor, DeltaParts, MessageParts
from bowline_runtime.api.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.errors import RequestRejected
from bowline_runtime.engine.sampling_params import GuidedDecodingParams, SamplingParams
from bowline_runtime.guided.backend import special_tokens
from bowline_runtime.parsers import get_reasoning_parser, get_tool_parser
from bowline_runtime.parsers.reasoning_parsers import THINK_END, THINK_START
from bowline_runtime.parsers.tool_parsers import ToolCallDelta, tool_call_grammar

# A budget so large it never forces `</think>`: it only marks where the grammar starts.
UNBOUNDED_REASONING = 1 << 30
_PROMPT_TAIL_TOKENS = 64


def reasoning_state(prompt_ids: list[int], tokenizer: Any) -> str:
    """How the prompt leaves reasoning: "open" (the template opened `<think>` for the model),
    "closed" (it pre-filled an empty block, as `enable_thinking: false` does) or "none"."""
    tail = tokenizer.decode(prompt_ids[-_PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
    start, end = tail.rfind(THINK_START), tail.rfind(THINK_END)
    if start >= 0 and start > end:
        return "open"
    if end >= 0 and not tail[end + len(THINK_END) :].strip():
        return "closed"
    return "none"


def _uses_tool_parser(request: Any, config: EngineConfig) -> bool:
    return bool(config.tool_call_parser and request.tools and request.tool_choice != "none")


def prepare_chat_params(
    request: Any, params: SamplingParams, prompt_ids: list[int], tokenizer: Any, config: EngineConfig
) -> SamplingParams:
    """The request's SamplingParams adjusted for tools and reasoning. Raises ValueError (a 400)."""
    changes: dict[str, Any] = {}
    if _uses_tool_parser(request, config) or config.reasoning_parser:
        changes["skip_special_tokens"] = False  # the parsers must see <tool_call> and <think>
    guided = params.guided
    choice = request.tool_choice
    if request.tools and (choice == "required" or not isinstance(choice, (str, type(None)))):
        if guided is not None:
            raise RequestRejected(
                "tool_choice: `required` or a named function already constrains the output; "
                "it cannot be combined with guided_*, structured_outputs or response_format"
            )
        only = None if choice == "required" else choice.function.name
        grammar = tool_call_grammar(
            [t.model_dump(exclude_none=True) for t in request.tools],
            only=only,
            parallel=only is None and request.parallel_tool_calls is not False,
            any_whitespace=config.guided_decoding_any_whitespace,
            special_tokens=special_tokens(tokenizer),
        )
        guided = changes["guided"] = GuidedDecodingParams(grammar=grammar)
    state = reasoning_state(prompt_ids, tokenizer)
    if state == "closed" and params.reasoning_max_tokens is not None:
        changes["reasoning_max_tokens"] = None  # no reasoning section to bound
    elif state == "open" and guided is not None and params.reasoning_max_tokens is None:
        changes["reasoning_max_tokens"] = UNBOUNDED_REASONING  # the grammar starts after </think>
    return dataclasses.replace(params, **changes) if changes else params


def _delta_tool_call(piece: ToolCallDelta) -> DeltaToolCall:
    function = DeltaFunctionCall(name=piece.name, arguments=piece.arguments if piece.arguments or piece.name is None else None)
    return DeltaToolCall(index=piece.index, id=piece.id, type="function" if piece.id else None, function=function)


class ParsingChatOutputProcessor(ChatOutputProcessor):
    """Reasoning first (`<think>...</think>` → reasoning_content), then tool calls in the rest."""

    def __init__(self, request: Any, tokenizer: Any, config: EngineConfig, starts_in_reasoning: bool) -> None:
        super().__init__(request, tokenizer, config)
        self._reasoning_cls = get_reasoning_parser(config.reasoning_parser) if config.reasoning_parser else None
        self._tool_cls = get_tool_parser(config.tool_call_parser) if _uses_tool_parser(request, config) else None
        self._starts_in_reasoning = starts_in_reasoning
        self._stream_reasoning = self._reasoning_cls(starts_in_reasoning) if self._reasoning_cls else None
        self._stream_tools = self._tool_cls() if self._tool_cls else None
        self._called = False

    def delta(self, previous_text: str, current_text: str, new_token_ids: list[int], finished: bool = False) -> DeltaParts:
        added = current_text[len(previous_text) :]
        if not added and not finished:
            return DeltaParts()
        reasoning, content = "", added
        if self._stream_reasoning is not None:
            piece = self._stream_reasoning.feed(added)
            reasoning, content = piece.reasoning, piece.content
            if finished:  # a held-back `</thi` or `<thi` is text after all
                tail = self._stream_reasoning.finish()
                reasoning, content = reasoning + tail.reasoning, content + tail.content
        calls = None
        if self._stream_tools is not None:
            piece = self._stream_tools.feed(content)
            content, pieces = piece.content, piece.tool_calls
            if finished:  # an unclosed call is parsed if complete, else released as content
                tail = self._stream_tools.finish()
                content, pieces = content + tail.content, pieces + tail.tool_calls
            if pieces:
                calls = [_delta_tool_call(p) for p in pieces]
                self._called = True
        return DeltaParts(content=content or None, reasoning_content=reasoning or None, tool_calls=calls)

    def final(self, text: str, token_ids: list[int]) -> MessageParts:
        reasoning, content = None, text
        if self._reasoning_cls is not None:
            reasoning, content = self._reasoning_cls(self._starts_in_reasoning).split(text)
        calls: list[ToolCall] = []
        if self._tool_cls is not None and content:
            content, parsed = self._tool_cls().extract(content)
            calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parsed]
            self._called = self._called or bool(calls)
        return MessageParts(content=content, reasoning_content=reasoning, tool_calls=calls)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return "tool_calls" if self._called and engine_reason == "stop" else engine_reason


def make_chat_output_processor(
    request: Any, tokenizer: Any, config: EngineConfig, prompt_ids: list[int] | None = None
) -> ChatOutputProcessor:
    """The processor for one choice; `prompt_ids` tells whether the output starts inside `<think>`."""
    opens = prompt_ids is not None and reasoning_state(prompt_ids, tokenizer) == "open"
    return ParsingChatOutputProcessor(request, tokenizer, config, starts_in_reasoning=opens)
