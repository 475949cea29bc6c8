"""Output parsers chosen by name at server start: `--tool-call-parser` and `--reasoning-parser`."""

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
    "make_chat_output_processor",
    "prepare_chat_params",
    "get_tool_parser",
    "prompt_opens_reasoning",
    "tool_call_grammar",
]


def make_chat_output_processor(request, tokenizer, config, prompt_ids=None):
    """See parsers.chat_output (imported lazily: it needs the API layer, the parsers do not)."""
    from bowline_runtime.parsers.chat_output import make_chat_output_processor as make

    return make(request, tokenizer, config, prompt_ids)


def prepare_chat_params(request, params, prompt_ids, tokenizer, config):
    """See parsers.chat_output.prepare_chat_params."""
    from bowline_runtime.parsers.chat_output import prepare_chat_params as prepare

    return prepare(request, params, prompt_ids, tokenizer, config)
