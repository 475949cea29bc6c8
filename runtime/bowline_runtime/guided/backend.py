"""llguidance, wrapped: one LLTokenizer per (tokenizer, vocab size) and grammar compilation with
errors turned into ValueErrors that name the request field.

Why llguidance (over xgrammar and outlines-core): it is a self-contained Rust wheel with no torch,
CUDA or Triton dependency, so the same code runs on CPU, CUDA and Ascend NPU hosts (the mask is a
CPU bitmask the sampler applies with one torch op on any device). It builds grammars lazily (about
1 ms for a nested schema, no per-vocabulary precomputation) and computes a mask in 7-15 µs per token
on our 2k and 16k vocabularies, against 55-230 µs for xgrammar's CPU path on the same schema.
"""

from __future__ import annotations

import threading
from typing import Any

import llguidance
import llguidance.hf
from llguidance import LLMatcher, LLTokenizer

from bowline_runtime.engine.errors import RequestRejected

_FIELD = {
    "json": "guided_json",
    "json_object": "response_format json_object",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "grammar": "guided_grammar",
    "structural_tag": "structural_tag",
}

_lock = threading.Lock()
# id(tokenizer) -> (tokenizer kept alive so the id is not reused, {vocab_size: LLTokenizer})
_tokenizers: dict[int, tuple[Any, dict[int, LLTokenizer]]] = {}


def field_name(kind: str) -> str:
    return _FIELD.get(kind, kind)


def ll_tokenizer(tokenizer: Any, vocab_size: int) -> LLTokenizer:
    """The llguidance view of a Hugging Face tokenizer, built once (it costs up to a second on large
    vocabularies). `vocab_size` is the model's logits width: ids past the tokenizer's own are never
    allowed, so padded embedding rows cannot be sampled."""
    with _lock:
        entry = _tokenizers.setdefault(id(tokenizer), (tokenizer, {}))
        cached = entry[1].get(vocab_size)
        if cached is not None:
            return cached
    if not getattr(tokenizer, "is_fast", False):
        raise RequestRejected("guided decoding needs a fast (Rust) Hugging Face tokenizer; this model's is a slow one")
    n_vocab = max(vocab_size, len(tokenizer))
    built = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab)
    with _lock:
        entry[1][vocab_size] = built
    return built


def tokenizer_key(tokenizer: Any) -> int:
    """Identity of a tokenizer for cache keys (kept alive by ll_tokenizer's table)."""
    return id(tokenizer)


def special_tokens(tokenizer: Any) -> frozenset[str]:
    """Added tokens that are single ids (`<tool_call>`, `<think>`...): grammars must match them as
    tokens, since the text never spells them out byte by byte."""
    try:
        return frozenset(tokenizer.get_added_vocab())
    except AttributeError:
        return frozenset()


def compile_matcher(grammar: str, llt: LLTokenizer, kind: str) -> LLMatcher:
    """A fresh matcher for `grammar`, or ValueError naming the request field and llguidance's reason."""
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, llt)
    if is_error:
        raise RequestRejected(f"{field_name(kind)}: {_first_line_block(messages[0])}", field_name(kind))
    matcher = LLMatcher(llt, grammar, log_level=0)
    if matcher.is_error():
        raise RequestRejected(f"{field_name(kind)}: {_first_line_block(matcher.get_error())}", field_name(kind))
    return matcher


def _first_line_block(message: str, limit: int = 600) -> str:
    message = message.strip()
    return message if len(message) <= limit else message[:limit] + " ..."


__all__ = ["compile_matcher", "field_name", "ll_tokenizer", "llguidance", "special_tokens", "tokenizer_key"]
