"""The draft-model proposer: a small model with the target's tokenizer proposes k tokens per sequence.

Its KV cache is its own tensors, indexed by the same block tables as the target's (one block manager,
each block id holds both models' keys and values), so allocation, preemption, prefix caching and freeing
need nothing of their own. The draft stays in lockstep with the target: every step it computes the
tokens the target computes (prompt chunks included), so at a step's start both caches hold the same
positions. Proposing k tokens feeds the last token and then d_1..d_k one forward each; the last
forward only writes d_k's KV (no logits), which is what the target holds once all k are accepted.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from bowline_runtime.engine.model_runner import ModelRunner, prepare_step
from bowline_runtime.engine.scheduler import ScheduledBatch
from bowline_runtime.engine.sequence import Sequence
from bowline_runtime.engine.spec_decode.batching import view
from bowline_runtime.engine.spec_decode.rejection import draw

logger = logging.getLogger("bowline.spec_decode")


def proposal_distribution(logits_row: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """q: the draft's softmax at the request's temperature over the real vocabulary. Any q keeps the
    rejection rule exact; this one is cheap and close to the target's when the draft is good."""
    row = logits_row.float()[:vocab_size]
    return torch.softmax(row / temperature, dim=-1)


class DraftModelProposer:
    def __init__(self, runner: ModelRunner, vocab_size: int, block_size: int) -> None:
        self.runner = runner
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.group_decodes = runner.decode_kernel is None

    @classmethod
    def load(cls, engine_config, model_path: str, device, dtype: torch.dtype, target_hf_config, vocab_size: int):
        from bowline_runtime.engine.worker import build_runner
        from bowline_runtime.models import loader

        draft_hf = loader.load_config(model_path, engine_config.trust_remote_code)
        if draft_hf.vocab_size != target_hf_config.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({draft_hf.vocab_size}) differs from the target's "
                f"({target_hf_config.vocab_size}): a draft must share the target's tokenizer"
            )
        draft_config = dataclasses.replace(engine_config, model=model_path, tokenizer=None, tensor_parallel_size=1)
        runner = build_runner(draft_config, device, dtype, 0, 1)
        kv_heads = getattr(draft_hf, "num_key_value_heads", None) or draft_hf.num_attention_heads
        proposer = cls(runner, vocab_size, engine_config.block_size)
        proposer.num_kv_heads = kv_heads
        logger.info("draft model %s (%d layers) loaded", model_path, draft_hf.num_hidden_layers)
        return proposer

    def kv_bytes_per_token(self) -> int:
        return self.runner.kv_bytes_per_token(self.num_kv_heads)

    def allocate_kv_cache(self, num_slots: int) -> None:
        self.runner.allocate_kv_cache(num_slots, self.num_kv_heads)

    def _choose(self, logits_row: torch.Tensor, seq: Sequence) -> tuple[int, torch.Tensor | None]:
        if seq.params.greedy:
            return int(logits_row[: self.vocab_size].argmax()), None
        q = proposal_distribution(logits_row, self.vocab_size, seq.params.temperature)
        return draw(q, seq.generator), q

    @torch.inference_mode()
    def propose(
        self, batch: ScheduledBatch, ks: list[int]
    ) -> tuple[list[list[int]], list[list[torch.Tensor | None]]]:
        """Draft tokens and their proposal distributions (None: a deterministic pick) per decode of
        `batch`, `ks[i]` for decode i; computes the batch's prefill chunks too (lockstep)."""
        d = batch.num_decodes
        decodes = batch.seqs[:d]
        drafts: list[list[int]] = [[] for _ in decodes]
        qs: list[list[torch.Tensor | None]] = [[] for _ in decodes]
        # Forward 0: each decode's last token, each prefill chunk as scheduled.
        first = ScheduledBatch(
            [view(s, [], s.num_computed_tokens) for s in decodes] + batch.seqs[d:],
            [1] * d + batch.num_tokens[d:], d,
        )
        plan = prepare_step(first, self.block_size, group_decodes=self.group_decodes)
        wanted = [i for i in range(d) if ks[i] > 0]
        plan.step.keep = torch.tensor(wanted, dtype=torch.long)
        logits = self.runner.execute(plan.step)
        for row, i in enumerate(wanted):
            token, q = self._choose(logits[row], decodes[i])
            drafts[i].append(token)
            qs[i].append(q)
        # Forwards 1..k: feed the newest draft token; its successor is the next proposal.
        for j in range(1, max(ks, default=0) + 1):
            active = [i for i in range(d) if ks[i] >= j]
            views = [view(decodes[i], drafts[i][:j], decodes[i].num_computed_tokens + j) for i in active]
            plan = prepare_step(ScheduledBatch(views, [1] * len(views), len(views)), self.block_size,
                                group_decodes=self.group_decodes)
            wanted_rows = [r for r, i in enumerate(active) if ks[i] > j]
            plan.step.keep = torch.tensor(wanted_rows, dtype=torch.long)
            logits = self.runner.execute(plan.step)
            for out_row, r in enumerate(wanted_rows):
                i = active[r]
                token, q = self._choose(logits[out_row], decodes[i])
                drafts[i].append(token)
                qs[i].append(q)
        return drafts, qs
