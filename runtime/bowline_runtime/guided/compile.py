"""`compile_constraint`: the one entry point the engine calls for guided decoding and reasoning budgets."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from llguidance import LLMatcher

from bowline_runtime.engine.errors import RequestRejected
from bowline_runtime.engine.outputs import LogitsConstraint
from bowline_runtime.engine.sampling_params import GuidedDecodingParams, SamplingParams
from bowline_runtime.guided.backend import compile_matcher, ll_tokenizer, special_tokens, tokenizer_key
from bowline_runtime.guided.constraints import GrammarConstraint, ReasoningConstraint
from bowline_runtime.guided.grammars import canonical_key, grammar_for

THINK_END = "</think>"
CACHE_SIZE = 512

# Tokenizers by cache key, so the cached compile function can take hashable arguments only.
_tokenizer_by_key: dict[int, Any] = {}


def compile_constraint(
    params: SamplingParams, tokenizer: Any, vocab_size: int
) -> Callable[[], LogitsConstraint] | None:
    """A factory of per-sequence constraints for this request, or None when it needs none.

    Called once per request, before admission; the grammar is compiled once per distinct spec and
    tokenizer (cached), and each call of the factory costs only a matcher copy. Raises ValueError,
    naming the field, for a spec that cannot be honoured.
    """
    guided = params.guided if params.guided is not None and params.guided.kind() != "none" else None
    budget = params.reasoning_max_tokens
    if guided is None and budget is None:
        return None
    grammar_factory: Callable[[], GrammarConstraint] | None = None
    if guided is not None:
        key = tokenizer_key(tokenizer)
        _tokenizer_by_key[key] = tokenizer
        prototype = _compiled(canonical_key(guided), key, vocab_size)
        eos = tokenizer.eos_token_id

        def grammar_factory() -> GrammarConstraint:
            return GrammarConstraint(prototype.deep_copy(), vocab_size, eos)

    if budget is None:
        return grammar_factory
    if budget < 0:
        raise RequestRejected(f"reasoning_max_tokens must be >= 0, got {budget}", "reasoning_max_tokens")
    end_id = think_end_id(tokenizer)
    eos_ids = tuple(i for i in {tokenizer.eos_token_id, tokenizer.pad_token_id} if i is not None)

    def reasoning_factory() -> ReasoningConstraint:
        inner = grammar_factory() if grammar_factory is not None else None
        return ReasoningConstraint(end_id, budget, inner, eos_ids)

    return reasoning_factory


def think_end_id(tokenizer: Any) -> int:
    """`</think>` must be a single token: a budget can only force one token."""
    token_id = tokenizer.convert_tokens_to_ids(THINK_END)
    if token_id is None or token_id == tokenizer.unk_token_id or THINK_END not in special_tokens(tokenizer):
        raise RequestRejected(f"reasoning_max_tokens: this model's tokenizer has no {THINK_END} token, so it has no reasoning section to bound", "reasoning_max_tokens")
    return int(token_id)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _compiled(spec_key: str, tok_key: int, vocab_size: int) -> LLMatcher:
    """The prototype matcher of one spec; sequences get deep copies of it."""
    tokenizer = _tokenizer_by_key[tok_key]
    guided = _params_from_key(spec_key)
    grammar = grammar_for(guided, special_tokens(tokenizer))
    return compile_matcher(grammar, ll_tokenizer(tokenizer, vocab_size), guided.kind())


def _params_from_key(spec_key: str) -> GuidedDecodingParams:
    kind, value, any_whitespace = json.loads(spec_key)
    if kind == "json_object":
        return GuidedDecodingParams(json_object=True, any_whitespace=any_whitespace)
    return GuidedDecodingParams(**{kind: value}, any_whitespace=any_whitespace)


def cache_info() -> functools._CacheInfo:
    """Hits and misses of the grammar cache (for tests and /metrics)."""
    return _compiled.cache_info()
