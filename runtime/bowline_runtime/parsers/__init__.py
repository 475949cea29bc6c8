"""Output parsers chosen by name at server start: `--tool-call-parser` and `--reasoning-parser`.

Parsers turn generated text into their own dataclasses (ToolCall, ToolCallDelta, reasoning
pieces) and import nothing from the API layer; api/parsed_output.py turns those into the
protocol's message fields.
"""

from __future__ import annotations

from bowline_runtime.parsers.reasoning_parsers import ThinkReasoningParser, prompt_opens_reasoning
from bowline_runtime.parsers.tool_parsers import HermesToolParser, ToolCall, tool_call_grammar

# Qwen2.5/Qwen3 and Hermes models share one format; the aliases are the names vLLM users pass.
TOOL_PARSERS: dict[str, type[HermesToolParser]] = {"hermes": HermesToolParser, "qwen": HermesToolParser, "qwen3": HermesToolParser}
REASONING_PARSERS: dict[str, type[ThinkReasoningParser]] = {
    "think": ThinkReasoningParser,
    "qwen3": ThinkReasoningParser,
    "deepseek_r1": ThinkReasoningParser,
}


def get_tool_parser(name: str) -> type[HermesToolParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"--tool-call-parser: unknown parser {name!r}; choose one of {sorted(TOOL_PARSERS)}") from None


def get_reasoning_parser(name: str) -> type[ThinkReasoningParser]:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"--reasoning-parser: unknown parser {name!r}; choose one of {sorted(REASONING_PARSERS)}") from None


__all__ = [
    "REASONING_PARSERS",
    "TOOL_PARSERS",
    "HermesToolParser",
    "ThinkReasoningParser",
    "ToolCall",
    "get_reasoning_parser",
    "get_tool_parser",
    "prompt_opens_reasoning",
    "tool_call_grammar",
]

