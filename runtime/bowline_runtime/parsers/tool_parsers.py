"""Tool calls in generated text → OpenAI `tool_calls`, whole or streamed; and the grammar that
makes `tool_choice: required` / a named function always produce a parsable call.

Format (Hermes, Qwen2.5/Qwen3): `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`,
possibly several, possibly after some text. Arguments are returned as the exact JSON text the model
wrote, so streamed argument pieces always join to the non-streaming string.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from bowline_runtime.engine.errors import RequestRejected
from bowline_runtime.parsers.reasoning_parsers import _held_prefix


def make_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = field(default_factory=make_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(slots=True)
class ToolCallDelta:
    """One piece of `delta.tool_calls`: the first piece of a call carries id, type and name."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        function: dict[str, Any] = {}
        if self.name is not None:
            function["name"] = self.name
        if self.arguments or self.name is None:
            function["arguments"] = self.arguments
        out["function"] = function
        return out


@dataclass(slots=True)
class ToolDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def split_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of one call body, or None when it is not a valid call."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, dict):
        return None
    head = _CALL_HEAD.match(body)
    if head is not None:
        raw = body[head.end():].rstrip()
        if raw.endswith("}"):
            raw = raw[:-1].rstrip()
            try:
                if json.loads(raw) == args:
                    return obj["name"], raw
            except json.JSONDecodeError:
                pass
    return obj["name"], json.dumps(args, ensure_ascii=False)


class HermesToolParser:
    """Parser for `<tool_call>{json}</tool_call>`. One instance per output (it keeps stream state)."""

    start = "<tool_call>"
    end = "</tool_call>"

    def __init__(self) -> None:
        self._buffer = ""
        self._in_call = False
        self._calls: list[ToolCall] = []
        self._streamed_args = ""  # arguments text already sent for the open call
        self._name_sent = False
        self._pending_id = ""

    # --- whole text ---------------------------------------------------------------------------------

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls). Text that holds no valid call comes back unchanged as content."""
        delta = self.feed(text)
        tail = self.finish()
        content = delta.content + tail.content
        if not self._calls:
            return (text or None), []
        return (content.strip() or None), list(self._calls)

    @property
    def calls(self) -> list[ToolCall]:
        return list(self._calls)

    # --- streaming ----------------------------------------------------------------------------------

    def feed(self, text: str) -> ToolDelta:
        self._buffer += text
        out = ToolDelta()
        while True:
            if not self._in_call:
                idx = self._buffer.find(self.start)
                if idx < 0:
                    hold = _held_prefix(self._buffer, self.start)
                    out.content += self._buffer[: len(self._buffer) - hold]
                    self._buffer = self._buffer[len(self._buffer) - hold:]
                    break
                out.content += self._buffer[:idx]
                self._buffer = self._buffer[idx + len(self.start):]
                self._in_call = True
                self._streamed_args, self._name_sent = "", False
                continue
            idx = self._buffer.find(self.end)
            if idx < 0:
                self._stream_partial(self._buffer, out)
                break
            self._close_call(self._buffer[:idx], out)
            self._buffer = self._buffer[idx + len(self.end):]
        if (self._calls or self._in_call) and not out.content.strip():
            out.content = ""  # newlines between and around calls are layout, not content
        return out

    def finish(self) -> ToolDelta:
        """End of output: what was held back. An unclosed call is closed if its body is complete
        JSON; otherwise its text is content, as `extract` reports an output without calls."""
        out = ToolDelta()
        if self._in_call:
            self._close_call(self._buffer, out, unclosed=True)
        else:
            out.content = self._buffer
        self._buffer = ""
        return out

    def _index(self) -> int:
        return len(self._calls)

    def _stream_partial(self, body: str, out: ToolDelta) -> None:
        head = _CALL_HEAD.match(body)
        if head is None:
            return
        if not self._name_sent:
            name = json.loads('"' + head.group(1) + '"')
            self._pending_id = make_call_id()
            out.tool_calls.append(ToolCallDelta(self._index(), id=self._pending_id, name=name))
            self._name_sent = True
        raw = body[head.end():]
        # Hold back from the last "}" on: it may be the call object's own closing brace.
        cut = raw.rfind("}")
        safe = (raw if cut < 0 else raw[:cut]).rstrip()
        if len(safe) > len(self._streamed_args) and safe.startswith(self._streamed_args):
            out.tool_calls.append(ToolCallDelta(self._index(), arguments=safe[len(self._streamed_args):]))
            self._streamed_args = safe

    def _close_call(self, body: str, out: ToolDelta, unclosed: bool = False) -> None:
        self._in_call = False
        parsed = split_call(body)
        if parsed is None:
            if unclosed or not self._name_sent:
                out.content += self.start + body + ("" if unclosed else self.end)
            return
        name, args = parsed
        if not self._name_sent:
            call = ToolCall(name, args)
            out.tool_calls.append(ToolCallDelta(self._index(), id=call.id, name=name, arguments=args))
        else:
            call = ToolCall(name, args, id=self._pending_id)
            rest = args[len(self._streamed_args):] if args.startswith(self._streamed_args) else args
            if rest:
                out.tool_calls.append(ToolCallDelta(self._index(), arguments=rest))
        self._calls.append(call)
        self._streamed_args, self._name_sent = "", False


def _tool_function(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RequestRejected("tools: every tool needs {'type': 'function', 'function': {'name': ...}}", "tools")
    return fn


def tool_call_grammar(
    tools: list[dict[str, Any]],
    only: str | None = None,
    parallel: bool = True,
    any_whitespace: bool = False,
    special_tokens: frozenset[str] = frozenset({"<tool_call>", "</tool_call>"}),
) -> str:
    """A Lark grammar (llguidance dialect) whose sentences are Hermes tool calls to `tools` — to
    `only` when a function is named — one call, or several when `parallel`. Each call is written
    exactly as the chat template writes past calls, and its arguments follow the tool's parameter
    schema, so the output always parses and validates.
    """
    from bowline_runtime.guided.grammars import with_json_options

    functions = [_tool_function(t) for t in tools]
    if only is not None:
        functions = [f for f in functions if f["name"] == only]
        if not functions:
            raise RequestRejected(f"tool_choice: names function {only!r}, which is not in `tools`", "tool_choice")
    if not functions:
        raise RequestRejected("tool_choice: `required` needs at least one tool in `tools`", "tool_choice")

    def tag(text: str) -> str:
        return text if text in special_tokens else json.dumps(text)

    lines = ["%llguidance {}"]
    lines.append("start: tool_call" + (' ("\\n" tool_call)*' if parallel else ""))
    lines.append(
        f'tool_call: {tag(HermesToolParser.start)} "\\n" ('
        + " | ".join(f"call_{i}" for i in range(len(functions)))
        + f') "\\n" {tag(HermesToolParser.end)}'
    )
    for i, fn in enumerate(functions):
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        schema = with_json_options(params, any_whitespace)
        head = json.dumps('{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "arguments": ', ensure_ascii=False)
        lines.append(f'call_{i}: {head} %json {json.dumps(schema, ensure_ascii=False)} "}}"')
    return "\n".join(lines) + "\n"
