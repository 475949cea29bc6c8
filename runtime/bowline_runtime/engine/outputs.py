"""What the engine hands back: per-step deltas of each request, and the accumulator that turns them
back into cumulative answers.

Each step's message carries only what that step added (new token ids, new logprobs, new text), so a
step costs O(new tokens) to build, to pickle across the engine-core process boundary and to stream,
instead of O(output length): copying whole outputs every step made long generations O(n^2).
"""

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
    """One of a request's n outputs.

    The engine fills the `new_*` fields: what this step added. `text`, `token_ids` and `logprobs`
    are the cumulative views, left empty by the engine and built by `OutputAccumulator` (appends,
    amortised O(1) per token). Neither text ever contains a stop string (unless
    include_stop_str_in_output) nor a partial one still being matched: the engine releases text only
    once it is final, so concatenating the deltas gives the answer.
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[TokenLogprob] | None = None  # None unless logprobs were asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """One step's news about a request (see CompletionOutput). The last one has `finished=True`.

    `prompt_token_ids` and `prompt_logprobs` come once, in the request's first output (empty / None
    afterwards): they do not change, and resending them would make every step O(prompt length).
    """

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[TokenLogprob | None] | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    num_cached_tokens: int = 0


def merge_delta(into: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Fold `later` (the next step's delta of the same request) into `into`, in place.

    A consumer that falls behind drains several queued deltas at once: merging them, rather than
    keeping only the newest as with snapshots, is what keeps every token. `into` must be owned by
    the caller (each engine message is a fresh object, so the stream's consumer owns it).
    """
    by_index = {o.index: o for o in into.outputs}
    for out in later.outputs:
        mine = by_index.get(out.index)
        if mine is None:
            into.outputs.append(out)
            by_index[out.index] = out
            continue
        mine.new_token_ids.extend(out.new_token_ids)
        mine.new_text += out.new_text
        if out.new_logprobs is not None:
            if mine.new_logprobs is None:
                mine.new_logprobs = []
            mine.new_logprobs.extend(out.new_logprobs)
        mine.cumulative_logprob = out.cumulative_logprob
        mine.finish_reason = out.finish_reason
        mine.stop_reason = out.stop_reason
    into.finished = later.finished
    if into.prompt_logprobs is None:
        into.prompt_logprobs = later.prompt_logprobs
    if into.first_token_time is None:
        into.first_token_time = later.first_token_time
    into.num_cached_tokens = later.num_cached_tokens
    return into


class OutputAccumulator:
    """Turns one request's stream of deltas into its cumulative state.

    `add` appends each delta to per-output lists (amortised O(1) per token) and returns the same
    RequestOutput object every time, updated in place: its outputs' `token_ids` / `text` /
    `logprobs` are the whole answer so far and their `new_*` fields the latest step's delta. A
    consumer that reads it later than it was queued therefore sees a newer state, never a torn one;
    streaming code that keeps its own "sent so far" counters loses nothing that way.
    """

    def __init__(self) -> None:
        self.latest: RequestOutput | None = None
        self._by_index: dict[int, CompletionOutput] = {}

    def _output(self, index: int) -> CompletionOutput:
        out = self._by_index.get(index)
        if out is None:
            out = self._by_index[index] = CompletionOutput(index=index)
            assert self.latest is not None
            self.latest.outputs.append(out)
        return out

    def add(self, delta: RequestOutput) -> RequestOutput:
        if self.latest is None:
            self.latest = RequestOutput(
                request_id=delta.request_id,
                prompt_token_ids=delta.prompt_token_ids,
                outputs=[],
                arrival_time=delta.arrival_time,
            )
        latest = self.latest
        seen = set()
        for new in delta.outputs:
            out = self._output(new.index)
            seen.add(new.index)
            out.token_ids.extend(new.new_token_ids)
            out.text += new.new_text
            if new.new_logprobs is not None:
                if out.logprobs is None:
                    out.logprobs = []
                out.logprobs.extend(new.new_logprobs)
            out.new_token_ids, out.new_text, out.new_logprobs = new.new_token_ids, new.new_text, new.new_logprobs
            out.cumulative_logprob = new.cumulative_logprob
            out.finish_reason = new.finish_reason
            out.stop_reason = new.stop_reason
        for index, out in self._by_index.items():
            if index not in seen:  # not in this step: nothing new
                out.new_token_ids, out.new_text = [], ""
                out.new_logprobs = None if out.logprobs is None else []
        latest.finished = delta.finished
        if latest.prompt_logprobs is None:
            latest.prompt_logprobs = delta.prompt_logprobs
        if latest.first_token_time is None:
            latest.first_token_time = delta.first_token_time
        latest.num_cached_tokens = delta.num_cached_tokens
        return latest


@dataclass(slots=True)
class LoRAGauges:
    """vLLM's `vllm:lora_requests_info` labels: the adapters of running and waiting requests."""

    running: tuple[str, ...]
    waiting: tuple[str, ...]
    max_lora: int


@dataclass(slots=True)
class EngineStats:
    """Engine-wide gauges for /metrics and tests."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    lora: LoRAGauges | None = None  # None: LoRA not enabled

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
