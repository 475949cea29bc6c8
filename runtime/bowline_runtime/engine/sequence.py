"""A sequence is one stream of tokens being generated; a request owns n of them (sampling candidates)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bowline_runtime.engine.outputs import TokenLogprob
from bowline_runtime.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # position among the request's candidates
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival_time: float = field(default_factory=time.time)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose keys/values are in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache
    block_table: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # per-request seeded sampling
    constraint: Any = None  # LogitsConstraint
    bad_word_ids: list[list[int]] = field(default_factory=list)
    images: tuple[Any, ...] = ()  # engine.multimodal.ImageInput per image in the prompt
    detokenizer: Any = None  # IncrementalDetokenizer
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    first_token_time: float | None = None
    # How many output tokens / logprobs the engine has already sent: each step sends only the rest.
    num_sent_tokens: int = 0
    num_sent_logprobs: int = 0
    lora_id: int = 0  # the LoRA adapter serving it (lora.manager); 0: the base model

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        """Still has known tokens (prompt, or recomputed output after preemption) to feed before sampling."""
        return self.num_computed_tokens < self.num_tokens - 1

    def num_blocks_needed(self, block_size: int, num_tokens: int | None = None) -> int:
        n = self.num_tokens if num_tokens is None else num_tokens
        return (n + block_size - 1) // block_size
