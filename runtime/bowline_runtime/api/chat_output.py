"""Engine text → chat message parts: content, reasoning_content and tool_calls.

This is the one place where generated text is interpreted for chat. Without parsers every token
is `content`. Tool-call parsing (`--tool-call-parser`, `tools`, `tool_choice`) and reasoning
parsing (`--reasoning-parser`) plug in here through `make_output_processor`: a processor sees
each choice's text as it grows (`delta`, told when it is the last one) and once finished (`final`), and may rename the finish
reason (`tool_calls`). The chat route never looks inside the text itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bowline_runtime.api.errors import bad_request
from bowline_runtime.api.protocol import ChatCompletionRequest, DeltaToolCall, ToolCall
from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class MessageParts:
    """A finished choice's message fields."""

    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(slots=True)
class DeltaParts:
    """What one streamed chunk adds; all None means nothing to send yet (a parser holding text back)."""

    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    def is_empty(self) -> bool:
        return self.content is None and self.reasoning_content is None and self.tool_calls is None


class ChatOutputProcessor:
    """The default: the text is the content. One instance per choice (parsers keep state)."""

    def __init__(self, request: ChatCompletionRequest, tokenizer: Any, config: EngineConfig) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.config = config

    def delta(self, previous_text: str, current_text: str, new_token_ids: list[int], finished: bool = False) -> DeltaParts:
        """The parts to stream for text that grew from `previous_text` to `current_text`.

        `finished` marks the choice's last delta: a processor that holds text back (a tag that may
        still be completing) must release it then, so the streamed parts join to `final()`'s.
        """
        added = current_text[len(previous_text) :]
        return DeltaParts(content=added) if added else DeltaParts()

    def final(self, text: str, token_ids: list[int]) -> MessageParts:
        return MessageParts(content=text)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """"abort" never reaches a client that is still listening; the rest pass through."""
        return engine_reason


# The format a forced tool call is written in when the server runs without --tool-call-parser.
DEFAULT_FORCED_TOOL_FORMAT = "hermes"


def _forces_tool_call(request: ChatCompletionRequest) -> bool:
    return bool(request.tools) and (request.tool_choice == "required" or not isinstance(request.tool_choice, (str, type(None))))


def with_tool_format(request: ChatCompletionRequest, config: EngineConfig) -> EngineConfig:
    """As vLLM does, tool_choice "required" or a named function needs no --tool-call-parser: the
    output is forced through structured outputs (a guided grammar), so its format is known in
    advance. Without a configured parser it is Hermes' `<tool_call>{json}</tool_call>`, which the
    Hermes parser then reads back into `tool_calls`."""
    if config.tool_call_parser or not _forces_tool_call(request):
        return config
    return dataclasses.replace(config, tool_call_parser=DEFAULT_FORCED_TOOL_FORMAT)


def check_tool_choice(request: ChatCompletionRequest, config: EngineConfig) -> None:
    """Tools go into the chat template either way; acting on tool calls needs a parser.

    As in vLLM: with `tools`, a tool_choice of "auto" (the default) needs `--tool-call-parser`;
    "required" and a named function are served through a guided grammar (see with_tool_format);
    "none" only shows the tools to the model.
    """
    config = with_tool_format(request, config)
    if not request.tools:
        if request.tool_choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return
    choice = request.tool_choice or "auto"
    if choice != "none" and not config.tool_call_parser:
        raise bad_request(
            f'tool_choice "{choice if isinstance(choice, str) else choice.function.name}" needs the server to run '
            'with --tool-call-parser (e.g. hermes); send tool_choice "none" to only show the tools to the model',
            "tool_choice",
        )
    if not isinstance(choice, str):
        names = {t.function.name for t in request.tools}
        if choice.function.name not in names:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice")


def prepare_params(
    request: ChatCompletionRequest, params: SamplingParams, prompt_ids: list[int], tokenizer: Any, config: EngineConfig
) -> SamplingParams:
    """The request's SamplingParams adjusted by the parsers (bowline_runtime.parsers): tool_choice
    required/named becomes a guided grammar, special tokens stay in the text for the parsers, the
    reasoning budget is fitted to the prompt. Without parsers, unchanged."""
    config = with_tool_format(request, config)
    check_tool_choice(request, config)
    if not (config.tool_call_parser or config.reasoning_parser):
        return params
    from bowline_runtime.api.parsed_output import prepare_chat_params  # subclasses this module's processor

    return prepare_chat_params(request, params, prompt_ids, tokenizer, config)


def make_output_processor(
    request: ChatCompletionRequest, tokenizer: Any, config: EngineConfig, prompt_ids: list[int] | None = None
) -> ChatOutputProcessor:
    """The processor for one choice of this request.

    Extension point for tool-call and reasoning parsers: return a subclass of
    ChatOutputProcessor chosen by `config.tool_call_parser` / `config.reasoning_parser`.
    `prompt_ids` lets a reasoning parser see whether the prompt opened a `<think>` block.
    """
    config = with_tool_format(request, config)
    check_tool_choice(request, config)
    if config.tool_call_parser or config.reasoning_parser:
        from bowline_runtime.api.parsed_output import make_chat_output_processor

        return make_chat_output_processor(request, tokenizer, config, prompt_ids)
    return ChatOutputProcessor(request, tokenizer, config)
