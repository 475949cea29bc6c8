"""Per-sequence LogitsConstraint implementations (see engine/outputs.py for the protocol).

A constraint is stateful and belongs to one sequence; the engine masks that sequence's logits row
before sampling and reports the sampled token back. Masking happens on the host-side bitmask and
is applied to the row with one `masked_fill_`, so the same code serves CPU, CUDA and NPU rows.
"""

from __future__ import annotations

import logging

import torch
from llguidance import LLMatcher

logger = logging.getLogger("bowline.guided")

_SHIFTS = torch.arange(32, dtype=torch.int32)
_NEG_INF = float("-inf")


def unpack_bitmask(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's packed mask (bit i of word j allows token 32*j+i) as a bool vector."""
    return ((bits.unsqueeze(1) >> _SHIFTS) & 1).view(-1)[:vocab_size].bool()


class GrammarConstraint:
    """Allows exactly the tokens that keep the output a prefix of a sentence of the grammar; once the
    sentence is complete only EOS is allowed and `is_finished` turns True."""

    __slots__ = ("_matcher", "_bits", "_eos")

    def __init__(self, matcher: LLMatcher, vocab_size: int, eos_token_id: int | None) -> None:
        self._matcher = matcher
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self._eos = eos_token_id

    def mask_logits(self, logits: torch.Tensor) -> None:
        self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        vocab = logits.shape[-1]
        allowed = unpack_bitmask(self._bits, min(vocab, self._bits.numel() * 32))
        if self._matcher.is_error() or not bool(allowed.any()):
            # Nothing can follow (an internal limit was hit): end the sequence rather than sample
            # from an all -inf row.
            allowed = torch.zeros_like(allowed)
            if self._eos is not None and self._eos < allowed.numel():
                allowed[self._eos] = True
        if allowed.numel() < vocab:
            logits[allowed.numel():] = _NEG_INF
            logits = logits[: allowed.numel()]
        logits.masked_fill_(~allowed.to(logits.device, non_blocking=True), _NEG_INF)

    def accept_token(self, token_id: int) -> None:
        if not self._matcher.consume_token(int(token_id)):
            logger.warning("guided decoding: token %d rejected: %s", token_id, self._matcher.get_error())

    def is_finished(self) -> bool:
        return self._matcher.is_stopped()

    def fork(self) -> GrammarConstraint:
        """An independent copy of the current state: a speculative draft advances it through its own
        proposals while the sequence's constraint stays where the accepted tokens left it."""
        return GrammarConstraint(self._matcher.deep_copy(), (self._bits.numel()) * 32, self._eos)


class ReasoningConstraint:
    """The reasoning section (from the first output token up to `</think>`) and what follows it.

    With a budget, after `budget` reasoning tokens only `</think>` is allowed. With an inner
    constraint (guided decoding), reasoning is free except that it may not end the sequence (EOS),
    and the inner constraint governs everything after `</think>`. The output is assumed to start in
    reasoning: the API only sets a budget when the prompt leaves a `<think>` block open or the model
    opens one itself as its first token.
    """

    __slots__ = ("_end_id", "_budget", "_inner", "_eos_ids", "_count", "_reasoning")

    def __init__(
        self,
        think_end_id: int,
        budget: int | None,
        inner: GrammarConstraint | None,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self._end_id = think_end_id
        self._budget = budget
        self._inner = inner
        self._eos_ids = eos_token_ids
        self._count = 0
        self._reasoning = True

    @property
    def in_reasoning(self) -> bool:
        return self._reasoning

    def mask_logits(self, logits: torch.Tensor) -> None:
        if not self._reasoning:
            if self._inner is not None:
                self._inner.mask_logits(logits)
            return
        if self._budget is not None and self._count >= self._budget:
            keep = logits[self._end_id].clone()
            logits.fill_(_NEG_INF)
            logits[self._end_id] = keep if torch.isfinite(keep) else 0.0
        elif self._inner is not None:
            for eos in self._eos_ids:
                if eos < logits.shape[-1]:
                    logits[eos] = _NEG_INF

    def accept_token(self, token_id: int) -> None:
        if self._reasoning:
            self._count += 1
            if token_id == self._end_id:
                self._reasoning = False
        elif self._inner is not None:
            self._inner.accept_token(token_id)

    def is_finished(self) -> bool:
        return not self._reasoning and self._inner is not None and self._inner.is_finished()

    def fork(self) -> ReasoningConstraint:
        """An independent copy of the current state (see GrammarConstraint.fork)."""
        copy = ReasoningConstraint(self._end_id, self._budget, self._inner.fork() if self._inner else None, self._eos_ids)
        copy._count, copy._reasoning = self._count, self._reasoning
        return copy
