"""Split generated text into reasoning (`<think>...</think>`) and the answer, whole or streamed.

One parser serves Qwen3 and DeepSeek-R1 style models: whether the output starts inside a reasoning
block is read from the prompt (a template that ends its generation prompt with `<think>` opens the
block for the model; `enable_thinking=false` templates pre-fill `<think>\\n\\n</think>` and close it),
instead of being guessed from the output.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"


def prompt_opens_reasoning(prompt_text: str, start: str = THINK_START, end: str = THINK_END) -> bool:
    """True when the prompt leaves a reasoning block open (its last `<think>` is not closed)."""
    opened = prompt_text.rfind(start)
    return opened >= 0 and prompt_text.rfind(end) < opened


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (a tag being split
    across deltas must not leak out as text)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@dataclass(slots=True)
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ThinkReasoningParser:
    """`<think>` / `</think>` splitter. Content that directly follows `</think>` loses its leading
    newlines (templates put a blank line there); nothing else is altered, so the streamed pieces
    always join to the non-streaming result."""

    start = THINK_START
    end = THINK_END

    def __init__(self, starts_in_reasoning: bool = False) -> None:
        self._state = "reasoning" if starts_in_reasoning else "start"
        self._buffer = ""

    # --- whole text ---------------------------------------------------------------------------------

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content); either is None when empty."""
        delta = self.feed(text)
        tail = self.finish()
        reasoning, content = delta.reasoning + tail.reasoning, delta.content + tail.content
        return reasoning or None, content or None

    # --- streaming ----------------------------------------------------------------------------------

    def feed(self, text: str) -> ReasoningDelta:
        """Consume the next piece of output; return what can be released now."""
        self._buffer += text
        out = ReasoningDelta()
        while self._buffer:
            if self._state == "start":
                # Before anything is produced, the model may open a block itself.
                stripped = self._buffer.lstrip()
                if stripped.startswith(self.start):
                    self._buffer = stripped[len(self.start):]
                    self._state = "reasoning"
                    continue
                if self.start.startswith(stripped):
                    return out  # maybe the start of `<think>`: wait
                self._state = "content"
                continue
            if self._state == "reasoning":
                idx = self._buffer.find(self.end)
                if idx >= 0:
                    out.reasoning += self._buffer[:idx]
                    self._buffer = self._buffer[idx + len(self.end):]
                    self._state = "after_end"
                    continue
                hold = _held_prefix(self._buffer, self.end)
                out.reasoning += self._buffer[: len(self._buffer) - hold]
                self._buffer = self._buffer[len(self._buffer) - hold:]
                return out
            if self._state == "after_end":
                self._buffer = self._buffer.lstrip("\n")
                if not self._buffer:
                    return out
                self._state = "content"
                continue
            out.content += self._buffer
            self._buffer = ""
        return out

    def finish(self) -> ReasoningDelta:
        """Release what was held back at the end of the output."""
        rest, self._buffer = self._buffer, ""
        if self._state == "reasoning":
            return ReasoningDelta(reasoning=rest)
        if self._state == "after_end":
            rest = rest.lstrip("\n")
        return ReasoningDelta(content=rest)

    @property
    def in_reasoning(self) -> bool:
        return self._state == "reasoning"
