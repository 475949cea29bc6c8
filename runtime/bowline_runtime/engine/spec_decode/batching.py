"""Packed forwards for speculation, built with the engine's own `prepare_step`.

A speculating sequence enters a forward as a *view*: its tokens extended by draft tokens and its
computed count moved on, so `prepare_step` packs it like any chunk (several query tokens through the
paged prefill attention, or one token through the decode path) without knowing about speculation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bowline_runtime.engine.model_runner import StepPlan, prepare_step
from bowline_runtime.engine.scheduler import ScheduledBatch
from bowline_runtime.engine.sequence import Sequence


@dataclass(slots=True, eq=False)
class SeqView:
    """What prepare_step reads of a sequence, with draft tokens appended (the real one is untouched)."""

    seq_id: int
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    params: object
    num_prompt_tokens: int

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def view(seq: Sequence, extra: list[int], num_computed: int) -> SeqView:
    return SeqView(seq.seq_id, seq.token_ids + extra, num_computed, seq.block_table, seq.params, seq.num_prompt_tokens)


@dataclass(slots=True)
class VerifyPlan:
    """The target's verify forward. `seqs[i]` (the real sequences, in packed order) fed `num_tokens[i]`
    tokens; `spec_rows[i]` = (first logits row, count) of a speculating sequence's k + 1 scored
    positions, None for the rest, which `plan` (prompt logprobs, sample rows) describes as usual."""

    plan: StepPlan
    seqs: list[Sequence]
    num_tokens: list[int]
    spec_rows: list[tuple[int, int] | None]
    drafts: list[list[int]]  # per entry of seqs: its draft tokens ([] for the rest)
    proposals: list[list[torch.Tensor | None]]  # per entry: the proposal distribution of each draft token


def build_verify_plan(
    batch: ScheduledBatch, drafts: list[list[int]], proposals: list[list[torch.Tensor | None]],
    block_size: int, group_decodes: bool,
) -> VerifyPlan:
    """Decodes without drafts stay single-token decodes; decodes with k drafts feed last token + drafts
    (k + 1 positions, every one's logits kept); prefill chunks go as scheduled."""
    d = batch.num_decodes
    plain = [i for i in range(d) if not drafts[i]]
    spec = [i for i in range(d) if drafts[i]]
    order = plain + spec + list(range(d, len(batch.seqs)))
    packed: list = []
    counts: list[int] = []
    for i in order:
        seq = batch.seqs[i]
        if i < d and drafts[i]:
            packed.append(view(seq, drafts[i], seq.num_computed_tokens))
            counts.append(len(drafts[i]) + 1)
        else:
            packed.append(seq)
            counts.append(batch.num_tokens[i])
    inner = prepare_step(ScheduledBatch(packed, counts, len(plain)), block_size, group_decodes=group_decodes)

    old_keep = inner.step.keep.tolist()
    keep: list[int] = []
    sample_rows: list[int] = []
    prompt_rows: list[tuple[int, int, int] | None] = []
    spec_rows: list[tuple[int, int] | None] = []
    cursor = 0
    for j, n in enumerate(counts):
        if len(plain) <= j < len(plain) + len(spec):
            spec_rows.append((len(keep), n))
            keep.extend(range(cursor, cursor + n))
            sample_rows.append(-1)
            prompt_rows.append(None)
        else:
            spec_rows.append(None)
            rows = inner.prompt_rows[j]
            if rows is not None:
                first, pos, count = rows
                prompt_rows.append((len(keep), pos, count))
                keep.extend(old_keep[first : first + count])
            else:
                prompt_rows.append(None)
            if inner.sample_rows[j] >= 0:
                sample_rows.append(len(keep))
                keep.append(old_keep[inner.sample_rows[j]])
            else:
                sample_rows.append(-1)
        cursor += n
    inner.step.keep = torch.tensor(keep, dtype=torch.long)
    plan = StepPlan(inner.step, sample_rows, prompt_rows)
    return VerifyPlan(
        plan, [batch.seqs[i] for i in order], counts, spec_rows,
        [drafts[i] if i < d else [] for i in order], [proposals[i] if i < d else [] for i in order],
    )
