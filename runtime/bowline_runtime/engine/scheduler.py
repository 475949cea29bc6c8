"""Continuous batching: each step's batch is the running decodes plus as much waiting prefill as fits.

Bounds: --max-num-seqs sequences, --max-num-batched-tokens tokens per step (long prompts are
chunked across steps), and free KV blocks. When a running sequence cannot grow, the newest one is
preempted (its blocks freed, it goes back to the front of the queue and is recomputed later):
requests wait for memory, they never fail for lack of it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from bowline_runtime.engine.block_manager import BlockManager
from bowline_runtime.engine.sequence import SeqStatus, Sequence


@dataclass(slots=True)
class ScheduledBatch:
    """Decodes first (one token each), then prefill chunks; `num_tokens[i]` tokens for `seqs[i]`."""

    seqs: list[Sequence]
    num_tokens: list[int]
    num_decodes: int

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, chunked_prefill: bool = True,
        max_loras: int = 0,
    ) -> None:
        self.block_manager = block_manager
        self.chunked_prefill = chunked_prefill
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.max_loras = max_loras  # most LoRA adapters among running sequences (--max-loras); 0: no bound
        # Slots each decode reserves beyond its next token: speculative decoding writes the KV of
        # k draft tokens in the same step (engine.spec_decode); 0 otherwise.
        self.num_lookahead_slots = 0
        # load_lora(lora_id, running adapters) makes an adapter's weights loaded before its first
        # sequence runs (lora.manager.LoRAManager.load_for_batch); False: it cannot be, and its
        # sequences end (in `failed`, for the engine to report) instead of waiting for ever.
        self.load_lora: Callable[[int, set[int]], bool] | None = None
        self.failed: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, admit: bool = True) -> ScheduledBatch:
        """`admit=False` runs only what is already running (the inner steps of a multi-step window)."""
        budget = self.max_num_batched_tokens
        decodes: list[Sequence] = []
        prefills: list[tuple[Sequence, int]] = []

        # 1. Running sequences keep going; the newest give way when blocks run out.
        running = list(self.running)
        kept: list[Sequence] = []
        while running:
            seq = running.pop(0)
            if seq.is_prefilling:
                kept.append(seq)
                continue
            # The token this step feeds is already counted in seq.num_tokens: room for it (and lookahead).
            while not self.block_manager.can_append(seq, 0):
                if running:
                    self._preempt(running.pop())
                else:
                    break
            if not self.block_manager.can_append(seq, 0):
                self._preempt(seq)
                continue
            # Lookahead is best effort, never a reason to preempt: a sequence speculates as far as its
            # block table reaches (engine.spec_decode caps its proposals there).
            lookahead = self.num_lookahead_slots
            if lookahead and not self.block_manager.can_append(seq, lookahead):
                lookahead = 0
            self.block_manager.append_slots(seq, lookahead)
            decodes.append(seq)
            kept.append(seq)
            budget -= 1 + lookahead
        self.running = kept

        # 2. Partially prefilled running sequences continue their chunks.
        for seq in self.running:
            if seq.is_prefilling and budget > 0:
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                prefills.append((seq, n))
                budget -= n

        # 3. Admit waiting sequences while sequences, tokens and blocks allow.
        adapters = {s.lora_id for s in self.running if s.lora_id}
        passed: list[Sequence] = []  # their adapter would exceed --max-loras: they keep their place in line
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.max_loras and seq.lora_id and seq.lora_id not in adapters and len(adapters) >= self.max_loras:
                passed.append(self.waiting.popleft())
                continue
            if not self.chunked_prefill and seq.num_tokens > budget:
                break  # it waits for a step with room for the whole prompt
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            if seq.lora_id and seq.lora_id not in adapters and self.load_lora is not None \
                    and not self.load_lora(seq.lora_id, adapters):
                seq.finish_reason = "abort"
                seq.status = SeqStatus.FINISHED
                self.failed.append(seq)
                continue
            self.block_manager.allocate(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            prefills.append((seq, n))
            budget -= n
            if seq.lora_id:
                adapters.add(seq.lora_id)
        self.waiting.extendleft(reversed(passed))

        # Decodes sorted by context length: the runner batches attention over runs of similar lengths.
        decodes.sort(key=lambda s: s.num_tokens)
        seqs = decodes + [s for s, _ in prefills]
        counts = [1] * len(decodes) + [n for _, n in prefills]
        return ScheduledBatch(seqs, counts, len(decodes))

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first in line for recomputation."""
        self.block_manager.deallocate(seq)
        seq.status = SeqStatus.WAITING
        if seq in self.running:
            self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks at once."""
        if seq.status is SeqStatus.RUNNING and seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.block_manager.deallocate(seq)
        seq.status = SeqStatus.FINISHED
