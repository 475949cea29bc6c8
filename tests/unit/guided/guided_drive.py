"""Helpers for driving a constraint the way the engine does, with random logits."""

from __future__ import annotations

import torch

VOCAB = 2048  # the tiny preset's vocabulary


def drive(constraint, seed: int, max_tokens: int = 400, vocab: int = VOCAB, scale: float = 3.0) -> list[int]:
    """Sample token by token from random logits (temperature 1) under `constraint`, as the engine
    would: mask, sample, accept, stop when finished. EOS is part of the output when sampled."""
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < max_tokens and not constraint.is_finished():
        logits = torch.randn(vocab, generator=gen) * scale
        constraint.mask_logits(logits)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        constraint.accept_token(token)
        out.append(token)
    return out


def text_of(tokenizer, ids: list[int]) -> str:
    """Generated text as the server returns it: EOS dropped, other added tokens kept."""
    return tokenizer.decode([i for i in ids if i != tokenizer.eos_token_id], skip_special_tokens=False)
