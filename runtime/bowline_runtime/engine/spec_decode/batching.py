"""Packed forwards for speculation, built with the engine's own `prepare_step`.

A speculating sequence enters a forward as a *view*: its tokens extended by draft tokens and its
computed count moved on, so `prepare_step` packs it like any chunk (several query tokens through the
paged prefill attention, or one token through the decode path) without knowing about speculation.
"""

from __future__ import annotations

import itertools
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
    lora_id: int = 0  # the target's rows keep the sequence's adapter; the draft runs its own base weights


    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


_ROW_IDS = itertools.count(1)


def view(seq: Sequence, extra: list[int], num_computed: int) -> SeqView:
    return SeqView(seq.seq_id, seq.token_ids + extra, num_computed, seq.block_table, seq.params, seq.num_prompt_tokens,
                   seq.lora_id)


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
    """A decode with k drafts feeds its last token and the k drafts as k + 1 decode rows, row j a view
    of the sequence grown by j drafts (context length N + j, the same block table): each row attends
    through the decode path exactly as the non-speculative step would at that position, and the
    keys/values of all rows are written before any row attends. Prefill chunks go as scheduled."""
    d = batch.num_decodes
    packed: list = []
    owner: list[int] = []  # packed entry -> index into batch.seqs
    for i in range(d):
        seq = batch.seqs[i]
        if not drafts[i]:
            packed.append(seq)
            owner.append(i)
            continue
        for j in range(len(drafts[i]) + 1):
            row = view(seq, drafts[i][:j], seq.num_computed_tokens + j)
            row.seq_id = -next(_ROW_IDS)  # never reuse a staged context for rows that may be rejected
            packed.append(row)
            owner.append(i)
    num_rows = len(packed)
    packed.extend(batch.seqs[d:])
    owner.extend(range(d, len(batch.seqs)))
    counts = [1] * num_rows + batch.num_tokens[d:]
    inner = prepare_step(ScheduledBatch(packed, counts, num_rows), block_size, group_decodes=group_decodes)

    sample_rows: list[int] = []
    prompt_rows: list[tuple[int, int, int] | None] = []
    spec_rows: list[tuple[int, int] | None] = []
    first_entry: dict[int, int] = {}
    for entry, i in enumerate(owner):
        first_entry.setdefault(i, entry)
    for i in range(len(batch.seqs)):
        entry = first_entry[i]
        if i < d and drafts[i]:
            spec_rows.append((inner.sample_rows[entry], len(drafts[i]) + 1))
            sample_rows.append(-1)
            prompt_rows.append(None)
        else:
            spec_rows.append(None)
            sample_rows.append(inner.sample_rows[entry])
            prompt_rows.append(inner.prompt_rows[entry])
    plan = StepPlan(inner.step, sample_rows, prompt_rows)
    return VerifyPlan(
        plan, list(batch.seqs), list(batch.num_tokens), spec_rows,
        [drafts[i] if i < d else [] for i in range(len(batch.seqs))],
        [proposals[i] if i < d else [] for i in range(len(batch.seqs))],
    )
