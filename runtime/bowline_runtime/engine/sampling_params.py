"""Per-request generation parameters, as the engine sees them (vLLM's names and meanings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bowline_runtime.engine.errors import RequestRejected

# torch.Generator.manual_seed takes a 64-bit value; the engine adds a small per-candidate offset,
# so the signed range leaves that headroom while still covering every seed OpenAI clients send.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


@dataclass(slots=True)
class GuidedDecodingParams:
    """One constraint on the output's shape; exactly one field is set.

    `json` is a JSON Schema (dict or string), `json_object` any JSON object, `regex` a regular
    expression, `choice` a list of literal strings, `grammar` an EBNF/GBNF/Lark grammar,
    `structural_tag` a structural-tag spec (triggers, begin/end and a schema each).
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: dict[str, Any] | str | None = None
    any_whitespace: bool = False

    def kind(self) -> str:
        for name in ("json", "regex", "choice", "grammar", "structural_tag"):
            if getattr(self, name) is not None:
                return name
        return "json_object" if self.json_object else "none"


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. Defaults are OpenAI's (temperature 1, top_p 1).

    The one owner of value ranges: each bad value raises RequestRejected naming its field.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    bad_words: list[str] = field(default_factory=list)
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    min_tokens: int = 0
    max_tokens: int | None = None  # None: up to max_model_len
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's only; k: plus top-k alternatives
    prompt_logprobs: int | None = None
    temp_scaled_logprobs: bool = False
    top_p_normalized_logprobs: bool = False
    use_beam_search: bool = False
    length_penalty: float = 1.0
    skip_special_tokens: bool = True
    # vLLM's meaning: False leaves the outputs' text empty (token ids only). The server sets it for
    # requests without stop strings and assembles the text itself (api/detokenize.py), so the engine
    # core's step never decodes; stop strings must be matched where the sequence is stopped, in the core.
    detokenize: bool = True
    guided: GuidedDecodingParams | None = None
    reasoning_max_tokens: int | None = None
    lora_name: str | None = None  # the LoRA adapter the request named as `model`; None: the base model

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        if self.n < 1:
            raise RequestRejected(f"n must be at least 1, got {self.n}", "n")
        if self.best_of is not None and self.best_of < self.n:
            raise RequestRejected(f"best_of must be >= n, got best_of={self.best_of} and n={self.n}", "best_of")
        if self.temperature < 0:
            raise RequestRejected(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise RequestRejected(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise RequestRejected(f"top_k must be -1 (off) or >= 0, got {self.top_k}", "top_k")
        if not 0 <= self.min_p <= 1:
            raise RequestRejected(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.repetition_penalty <= 0:
            raise RequestRejected(f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty")
        if not -2 <= self.presence_penalty <= 2:
            raise RequestRejected(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}", "presence_penalty")
        if not -2 <= self.frequency_penalty <= 2:
            raise RequestRejected(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}", "frequency_penalty")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestRejected(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if self.min_tokens < 0:
            raise RequestRejected(f"min_tokens must be >= 0, got {self.min_tokens}", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestRejected(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})", "min_tokens")
        if self.logprobs is not None and self.logprobs < 0:
            raise RequestRejected(f"logprobs must be >= 0, got {self.logprobs}", "logprobs")
        for token_id, bias in (self.logit_bias or {}).items():
            if not -100 <= bias <= 100:
                raise RequestRejected(f"logit_bias values must be in [-100, 100], got {bias} for {token_id}", "logit_bias")
        if self.stop and not self.detokenize:
            raise RequestRejected("stop strings are only supported when detokenize is True", "stop")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise RequestRejected(f"seed must be a 64-bit integer ({SEED_MIN}..{SEED_MAX}), got {self.seed}", "seed")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def num_candidates(self) -> int:
        """Sequences generated per request: best_of when given (the n best are returned), else n."""
        return max(self.n, self.best_of or 0)
