"""The engine's TokenLogprob records in OpenAI's two shapes: chat's per-token objects and
completions' parallel arrays (tokens, token_logprobs, top_logprobs, text_offset)."""

from __future__ import annotations

import math
from typing import Any

from bowline_runtime.api.protocol import ChatLogprobs, ChatLogprobToken, ChatLogprobTop, CompletionLogprobs
from bowline_runtime.engine.outputs import TokenLogprob


class TokenTexts:
    """Decoded text of single tokens, cached: logprob responses name the same tokens over and over."""

    def __init__(self, tokenizer: Any, limit: int = 65536) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._limit = limit

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._cache) < self._limit:
                self._cache[token_id] = text
        return text


def _finite(value: float) -> float:
    """JSON has no -inf: a token the sampler made impossible reports the most negative float instead."""
    return value if math.isfinite(value) else -9999.0


def chat_logprobs(entries: list[TokenLogprob], top_n: int, texts: TokenTexts) -> ChatLogprobs:
    content = []
    for entry in entries:
        token = texts(entry.token_id)
        top = [
            ChatLogprobTop(token=texts(tid), logprob=_finite(lp), bytes=list(texts(tid).encode("utf-8")))
            for tid, lp in entry.top[:top_n]
        ]
        content.append(
            ChatLogprobToken(
                token=token, logprob=_finite(entry.logprob), bytes=list(token.encode("utf-8")), top_logprobs=top
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    entries: list[TokenLogprob | None],
    token_ids: list[int],
    top_n: int,
    texts: TokenTexts,
    start_offset: int = 0,
) -> CompletionLogprobs:
    """`entries[i]` describes `token_ids[i]`; None (the first prompt token) has no logprob.

    `top_logprobs[i]` holds the `top_n` most likely tokens plus the chosen one, as OpenAI's legacy
    completions API does; `text_offset` counts characters from `start_offset`.
    """
    out = CompletionLogprobs()
    offset = start_offset
    for token_id, entry in zip(token_ids, entries, strict=True):
        token = texts(token_id)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_finite(entry.logprob))
        top = {texts(tid): _finite(lp) for tid, lp in entry.top[:top_n]}
        top.setdefault(token, _finite(entry.logprob))
        out.top_logprobs.append(top)
    return out


def merge_completion_logprobs(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    """Echoed prompt logprobs followed by the generated ones."""
    return CompletionLogprobs(
        text_offset=first.text_offset + second.text_offset,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        tokens=first.tokens + second.tokens,
        top_logprobs=first.top_logprobs + second.top_logprobs,
    )
