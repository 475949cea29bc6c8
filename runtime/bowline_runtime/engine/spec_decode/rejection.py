"""The acceptance rule that keeps speculative sampling exact (Leviathan et al. 2023; Chen et al. 2023).

A draft token d drawn from the proposal q is kept with probability min(1, p(d) / q(d)), where p is the
target's distribution at that position; on the first rejection the replacement is drawn from
norm(max(0, p - q)). The token that comes out is distributed as p, whatever q is, so the proposal only
changes how many tokens a step yields, never which distribution they follow. A deterministic proposal
(n-gram lookup, a greedy draft) is the one-hot q: keep d with probability p(d), else draw from p with d
removed. Greedy requests need none of this: a draft token stays exactly where it is the target's argmax.
"""

from __future__ import annotations

import torch


def acceptance_probability(p: torch.Tensor, q: torch.Tensor | None, draft: int) -> float:
    """min(1, p(d) / q(d)); `q` None is the one-hot proposal at `draft`."""
    target = float(p[draft])
    proposal = 1.0 if q is None else float(q[draft])
    if proposal <= 0.0:  # d could not have been drawn from q: keep the rule total anyway
        return 0.0
    return min(1.0, target / proposal)


def residual_distribution(p: torch.Tensor, q: torch.Tensor | None, draft: int) -> torch.Tensor:
    """norm(max(0, p - q)): what a rejection draws from. Falls back to p where the residual has no mass
    (p == q: then the acceptance probability was 1 and a rejection cannot happen but for rounding)."""
    if q is None:
        residual = p.clone()
        residual[draft] = 0.0
    else:
        residual = (p - q).clamp(min=0.0)
    total = float(residual.sum())
    if total <= 0.0 or not torch.isfinite(residual).all():
        return p
    return residual / total


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from `probs`; a seeded request draws from its own (CPU) generator alone."""
    if generator is not None:
        return int(torch.multinomial(probs.detach().float().cpu(), 1, generator=generator))
    return int(torch.multinomial(probs.float(), 1))


def uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand(1, generator=generator)) if generator is not None else float(torch.rand(1))


def verify_sampled(
    p: torch.Tensor, q: torch.Tensor | None, draft: int, generator: torch.Generator | None
) -> tuple[int, bool]:
    """The token at one draft position and whether it is the draft's: the rejection rule, one position."""
    if uniform(generator) < acceptance_probability(p, q, draft):
        return draft, True
    return draw(residual_distribution(p, q, draft), generator), False
