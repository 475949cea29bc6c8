"""The draft-model proposer: a small model with the target's tokenizer proposes k tokens per sequence.

Its KV cache is its own tensors, indexed by the same block tables as the target's (one block manager,
each block id holds both models' keys and values), so allocation, preemption, prefix caching and freeing
need nothing of their own. The draft computes every prompt chunk the target computes, in the same step.
Proposing k tokens feeds the tokens the draft has not seen yet (the last one, or two when all k drafts
of the previous step were accepted: d_k and the bonus token) and then d_1..d_(k-1), one forward each.

The draft's cache only shapes proposals, never outputs (the target verifies every token), so a position
the draft has not computed — a prefix-cache hit on a block whose last draft token was never fed — costs
acceptance, not correctness.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable
from typing import Any

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


def build_draft_runner(engine_config, model_path: str, device, dtype: torch.dtype, layout, rank: int, tp_group=None):
    """This rank's runner of the draft model and its KV heads here: the whole draft (Layout(), rank 0),
    or its shard over the target's ranks (the target's layout and group; every rank builds one)."""
    from bowline_runtime.engine.worker import build_runner
    from bowline_runtime.models import loader
    from bowline_runtime.models.tensor_parallel import check_divisible

    tp = layout.tensor_parallel_size
    draft_hf = loader.load_config(model_path, engine_config.trust_remote_code).get_text_config()
    kv_heads = check_divisible(draft_hf, tp, "--speculative-draft-tensor-parallel-size", "the draft model's",
                               " (or use 1: the draft unsharded beside rank 0)")
    # The draft's weights follow its own config.json (a quantized target may have a plain draft).
    draft_config = dataclasses.replace(engine_config, model=model_path, tokenizer=None, tensor_parallel_size=tp,
                                       quantization="auto", enable_lora=False, lora_modules=None)
    return build_runner(draft_config, device, dtype, layout, rank, tp_group), kv_heads // tp


class DraftModelProposer:
    def __init__(self, runner: ModelRunner, vocab_size: int, block_size: int, num_kv_heads: int,
                 execute: Callable[[Any], torch.Tensor | None] | None = None) -> None:
        self.runner = runner
        self.num_kv_heads = num_kv_heads  # on this rank (a sharded draft's share)
        # One draft forward: the runner's own, or for a sharded draft the group's (every rank runs its shard).
        self.execute = execute or runner.execute
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.group_decodes = runner.decode_kernel is None
        # Per sequence: positions of valid draft KV, and (first draft position, k) of this step's feed.
        self._computed: dict[int, int] = {}
        self._fed: dict[int, tuple[int, int]] = {}

    @classmethod
    def load(cls, engine_config, model_path: str, device, dtype: torch.dtype, target_hf_config, vocab_size: int,
             tp=None, sharded: bool = False):
        """The proposer on rank 0. `sharded`: the draft is split over the target's ranks (`tp`, the
        TensorParallelGroup, whose workers build their shards from the same flags); otherwise one
        unsharded copy runs beside rank 0."""
        from bowline_runtime.engine.distributed import Layout
        from bowline_runtime.models import loader

        draft_hf = loader.load_config(model_path, engine_config.trust_remote_code)
        if draft_hf.vocab_size != target_hf_config.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({draft_hf.vocab_size}) differs from the target's "
                f"({target_hf_config.vocab_size}): a draft must share the target's tokenizer"
            )
        if sharded:
            assert tp is not None
            runner, kv_heads = build_draft_runner(engine_config, model_path, device, dtype, tp.layout, 0, tp.tp_group)
            proposer = cls(runner, vocab_size, engine_config.block_size, kv_heads, execute=tp.attach_draft(runner))
        else:
            runner, kv_heads = build_draft_runner(engine_config, model_path, device, dtype, Layout(), 0)
            proposer = cls(runner, vocab_size, engine_config.block_size, kv_heads)
        logger.info("draft model %s (%d layers) loaded, %s", model_path, draft_hf.num_hidden_layers,
                    f"sharded over {runner.tp_size} ranks" if sharded else "unsharded beside rank 0")
        return proposer

    def kv_bytes_per_token(self) -> int:
        return self.runner.kv_bytes_per_token(self.num_kv_heads)

    def allocate_kv_cache(self, num_slots: int) -> None:
        self.runner.allocate_kv_cache(num_slots, self.num_kv_heads)

    def _choose(self, logits_row: torch.Tensor, seq: Sequence, grammar: Any = None) -> tuple[int, torch.Tensor | None]:
        """The draft's next token; `grammar` (a fork of the sequence's constraint, advanced through the
        earlier drafts) masks the draft as it masks the target, so proposals stay inside the grammar."""
        row = logits_row.float()[: self.vocab_size]
        if grammar is not None:
            row = row.clone()
            grammar.mask_logits(row)
        if seq.params.greedy:
            token, q = int(row.argmax()), None
        else:
            q = proposal_distribution(row, self.vocab_size, seq.params.temperature)
            token = draw(q, seq.generator)
        if grammar is not None:
            grammar.accept_token(token)
        return token, q

    def accepted(self, seq: Sequence, num_accepted: int) -> None:
        """After verification: the draft's valid positions end at the last accepted token it was fed."""
        fed = self._fed.get(seq.seq_id)
        if fed is not None:
            start, k = fed
            self._computed[seq.seq_id] = start + min(num_accepted, max(k - 1, 0))

    def forget(self, seq: Sequence) -> None:
        self._computed.pop(seq.seq_id, None)
        self._fed.pop(seq.seq_id, None)

    def prune(self, live: set[int]) -> None:
        """Drop the records of sequences that left without finishing in a step (aborted)."""
        if len(self._computed) > 2 * len(live) + 64:
            for table in (self._computed, self._fed):
                for seq_id in [s for s in table if s not in live]:
                    del table[seq_id]

    @torch.inference_mode()
    def propose(
        self, batch: ScheduledBatch, ks: list[int]
    ) -> tuple[list[list[int]], list[list[torch.Tensor | None]]]:
        """Draft tokens and their proposal distributions (None: a deterministic pick) per decode of
        `batch`, `ks[i]` for decode i; computes the batch's prefill chunks too."""
        d = batch.num_decodes
        decodes = batch.seqs[:d]
        drafts: list[list[int]] = [[] for _ in decodes]
        qs: list[list[torch.Tensor | None]] = [[] for _ in decodes]
        # Forward 0: each decode's unseen tokens (one decode row per position), each prefill chunk as scheduled.
        rows: list[Any] = []
        wanted: list[int] = []
        for i, seq in enumerate(decodes):
            last = seq.num_computed_tokens  # the position of the token this step feeds
            start = min(self._computed.get(seq.seq_id, last), last)
            for pos in range(start, last + 1):
                row = view(seq, [], pos)
                if pos < last:
                    row.seq_id = -next(_LAG_IDS)
                rows.append(row)
            if ks[i] > 0:
                wanted.append(len(rows) - 1)
            self._fed[seq.seq_id] = (last + 1, ks[i])
            self._computed[seq.seq_id] = last + 1  # moved on by accepted() after verification
        for seq, n in zip(batch.seqs[d:], batch.num_tokens[d:], strict=True):
            self._computed[seq.seq_id] = seq.num_computed_tokens + n
        first = ScheduledBatch(rows + batch.seqs[d:], [1] * len(rows) + batch.num_tokens[d:], len(rows))
        plan = prepare_step(first, self.block_size, group_decodes=self.group_decodes)
        plan.step.keep = torch.tensor(wanted, dtype=torch.long)
        plan.step.lora_segments = []  # LoRA adapters live on the target; the draft proposes with its own weights
        logits = self.execute(plan.step)
        assert logits is not None  # the runner is a driver
        forks: list[Any] = []
        for i, seq in enumerate(decodes):
            if seq.constraint is None or ks[i] == 0:
                forks.append(None)
            else:
                forks.append(_Once(seq.constraint) if ks[i] == 1 else _fork(seq.constraint))
        out_row = 0
        for i in range(d):
            if ks[i] > 0:
                token, q = self._choose(logits[out_row], decodes[i], forks[i])
                drafts[i].append(token)
                qs[i].append(q)
                out_row += 1
        # Forwards 1..k-1: feed the newest draft token; its successor is the next proposal. The last
        # draft token is fed only if it is accepted (next step's forward 0).
        for j in range(1, max(ks, default=0)):
            active = [i for i in range(d) if ks[i] > j]
            views: list[Any] = [view(decodes[i], drafts[i][:j], decodes[i].num_computed_tokens + j) for i in active]
            plan = prepare_step(ScheduledBatch(views, [1] * len(views), len(views)), self.block_size,
                                group_decodes=self.group_decodes)
            plan.step.keep = torch.arange(len(views), dtype=torch.long)
            plan.step.lora_segments = []
            logits = self.execute(plan.step)
            assert logits is not None
            for out_row, i in enumerate(active):
                token, q = self._choose(logits[out_row], decodes[i], forks[i])
                drafts[i].append(token)
                qs[i].append(q)
        return drafts, qs


_LAG_IDS = itertools.count(1)


def _fork(constraint: Any) -> Any:
    """A copy of a sequence's constraint for its draft to advance (None: no constraint, or one that
    cannot be copied — then the draft proposes unmasked, which the target's verification corrects)."""
    fork = getattr(constraint, "fork", None)
    return fork() if fork is not None else None


class _Once:
    """A constraint's mask without its advance: for a single proposal no copy of the state is needed."""

    def __init__(self, constraint: Any) -> None:
        self._constraint = constraint

    def mask_logits(self, logits: torch.Tensor) -> None:
        self._constraint.mask_logits(logits)

    def accept_token(self, token_id: int) -> None:
        pass
