"""The rules a request must meet that depend on the loaded engine: vocabulary, context length,
and the logprobs ceiling.

One pure function over a small limits object, so the API (before it sends any header) and the
engine (wherever it runs, even in another process) apply exactly the same rule with the same
words. Value ranges that need no engine live in SamplingParams.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bowline_runtime.engine.errors import RequestRejected
from bowline_runtime.engine.sampling_params import SamplingParams


@dataclass(slots=True, frozen=True)
class RequestLimits:
    """What the loaded engine can serve."""

    vocab_size: int  # valid token ids are 0..vocab_size-1
    max_model_len: int  # prompt + output tokens
    max_logprobs: int  # most alternatives per token


def check_token_ids(ids: Iterable[int], vocab_size: int, param: str, what: str = "token id") -> None:
    """Every id must name a vocabulary entry. Checked before any decode: a tokenizer given an id
    outside 0..2^32 raises OverflowError, which is not the client's message to read."""
    for token_id in ids:
        if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise RequestRejected(f"{what} {token_id} is outside the vocabulary (0..{vocab_size - 1})", param)


def check_prompt(prompt_token_ids: list[int], limits: RequestLimits, param: str = "prompt") -> None:
    """A prompt must be non-empty, in the vocabulary, and leave room for at least one output token."""
    if not prompt_token_ids:
        raise RequestRejected("the prompt is empty: give at least one token", param)
    check_token_ids(prompt_token_ids, limits.vocab_size, param, "prompt token id")
    if len(prompt_token_ids) >= limits.max_model_len:
        raise RequestRejected(
            f"this model's maximum context length is {limits.max_model_len} tokens, but the prompt has "
            f"{len(prompt_token_ids)} tokens, leaving no room for output; shorten the prompt",
            param,
        )


def check_params(prompt_len: int, params: SamplingParams, limits: RequestLimits, logprobs_param: str = "logprobs") -> None:
    """The sampling parameters that name token ids or lengths, against this engine.

    `logprobs_param` is the request field that set `params.logprobs` (chat calls it top_logprobs).
    """
    if params.max_tokens is not None and prompt_len + params.max_tokens > limits.max_model_len:
        raise RequestRejected(
            f"this model's maximum context length is {limits.max_model_len} tokens; the prompt has {prompt_len} "
            f"tokens and max_tokens asks for {params.max_tokens} more ({prompt_len + params.max_tokens} in all); "
            "lower max_tokens or shorten the prompt",
            "max_tokens",
        )
    for count, name in ((params.logprobs, logprobs_param), (params.prompt_logprobs, "prompt_logprobs")):
        if count is not None and count > limits.max_logprobs:
            raise RequestRejected(f"{name}: at most {limits.max_logprobs} alternatives per token, got {count}", name)
    check_token_ids(params.stop_token_ids, limits.vocab_size, "stop_token_ids")
    check_token_ids((params.logit_bias or {}).keys(), limits.vocab_size, "logit_bias")
    for seq in params.bad_words_token_ids:
        check_token_ids(seq, limits.vocab_size, "bad_words_token_ids")


def check_request(
    prompt_token_ids: list[int],
    params: SamplingParams,
    limits: RequestLimits,
    param: str = "prompt",
    logprobs_param: str = "logprobs",
) -> None:
    """Everything engine-dependent about one request; raises RequestRejected naming the field."""
    check_prompt(prompt_token_ids, limits, param)
    check_params(len(prompt_token_ids), params, limits, logprobs_param)
