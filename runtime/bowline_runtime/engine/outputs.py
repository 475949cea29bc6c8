"""What the engine hands back: cumulative per-request snapshots, streamed as tokens are produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class TokenLogprob:
    """A generated (or prompt) token's log-probability and its most likely alternatives, best first."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class CompletionOutput:
    """One of a request's n outputs. `text` and `token_ids` are cumulative; `text` never contains
    a stop string (unless include_stop_str_in_output) nor a partial one still being matched."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """A snapshot of a request. The last one yielded has `finished=True`."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[TokenLogprob | None] | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    num_cached_tokens: int = 0


@dataclass(slots=True)
class EngineStats:
    """Engine-wide gauges for /metrics and tests."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int

    @property
    def kv_cache_usage(self) -> float:
        if self.num_total_blocks == 0:
            return 0.0
        return 1.0 - self.num_free_blocks / self.num_total_blocks


class LogitsConstraint(Protocol):
    """A per-sequence constraint on the next token (guided decoding, reasoning budgets).

    Before sampling, the sampler lets each constrained sequence mask its own logits row (set
    disallowed tokens to -inf, in place); after sampling it reports the chosen token back.
    Implementations live outside the engine (bowline_runtime.guided); a factory returned by
    `bowline_runtime.guided.compile_constraint(params, tokenizer, vocab_size)` makes one per sequence.
    """

    def mask_logits(self, logits) -> None:
        """Set the logits of tokens not allowed next to -inf (a 1-D float tensor of size vocab)."""

    def accept_token(self, token_id: int) -> None:
        """Advance the constraint's state by the sampled token."""

    def is_finished(self) -> bool:
        """True once the output is complete: the sequence then stops with finish_reason "stop"."""
