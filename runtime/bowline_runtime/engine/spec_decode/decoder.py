"""The engine step with speculation: propose, verify in one target forward, keep what the target agrees with.

Per step: the scheduler's batch (decodes reserve k lookahead slots) -> proposals for each decode (n-gram
lookup or the draft model, which also computes the batch's prefill chunks) -> one target forward in which
a decode with k drafts feeds k + 1 tokens and keeps every position's logits -> per sequence, position by
position, the sampler's own processing (penalties, bias, bad words, min_tokens, the grammar) on the
sequence as it stands, then the greedy or rejection rule, then the engine's own token append (stop
strings, EOS, max_tokens, logprobs) -> the sequence's computed count moves to its accepted tokens only,
and the blocks past its tokens go back (the rejected slots' KV is never read nor hashed).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from bowline_runtime.engine.outputs import RequestOutput, SpecDecodeStats
from bowline_runtime.engine.sequence import Sequence
from bowline_runtime.engine.spec_decode.batching import VerifyPlan, build_verify_plan
from bowline_runtime.engine.spec_decode.config import SpeculativeConfig
from bowline_runtime.engine.spec_decode.draft_model import DraftModelProposer
from bowline_runtime.engine.spec_decode.ngram import propose_ngram
from bowline_runtime.engine.spec_decode.rejection import draw, verify_sampled

if TYPE_CHECKING:
    from bowline_runtime.engine.llm_engine import LLMEngine


def draft_budget(seq: Sequence, k: int, max_model_len: int, block_size: int) -> int:
    """How many tokens to propose for `seq`: k, fewer near max_tokens / max_model_len (a token past
    them would be thrown away) and never past the slots its block table holds."""
    budget = k
    if seq.params.max_tokens is not None:
        budget = min(budget, seq.params.max_tokens - seq.num_output_tokens - 1)
    budget = min(budget, max_model_len - seq.num_tokens - 1)
    budget = min(budget, len(seq.block_table) * block_size - seq.num_tokens)
    return max(0, budget)


def depends_on_output(seq: Sequence) -> bool:
    """Whether the sampler's processing of a row depends on the tokens before it (penalties, bad words,
    min_tokens, a grammar): then each position is processed after the previous one is accepted."""
    p = seq.params
    return bool(
        seq.constraint is not None or seq.bad_word_ids or seq.num_output_tokens < p.min_tokens
        or p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
    )


class SpeculativeDecoder:
    def __init__(self, spec: SpeculativeConfig, engine_config, device, dtype, hf_config, vocab_size: int,
                 tp=None) -> None:
        """`tp`: the engine's TensorParallelGroup, over whose ranks a sharded draft runs."""
        self.spec = spec
        self.k = spec.num_speculative_tokens
        self.draft: DraftModelProposer | None = None
        if spec.method == "draft_model":
            assert spec.model is not None
            self.draft = DraftModelProposer.load(engine_config, spec.model, device, dtype, hf_config, vocab_size,
                                                 tp=tp, sharded=spec.sharded_draft)
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * self.k)

    def kv_bytes_per_token(self) -> int:
        """The draft's KV bytes per token slot (0 for n-gram): the engine sizes its blocks for both."""
        return self.draft.kv_bytes_per_token() if self.draft is not None else 0

    def allocate_kv_cache(self, num_slots: int) -> None:
        if self.draft is not None:
            self.draft.allocate_kv_cache(num_slots)

    # --- proposals ----------------------------------------------------------------------------------

    def _budgets(self, engine: LLMEngine, decodes: list[Sequence]) -> list[int]:
        limit = self.spec.disable_by_batch_size
        if limit is not None and len(engine.scheduler.running) >= limit:
            return [0] * len(decodes)
        return [draft_budget(s, self.k, engine.max_model_len, engine.block_size) for s in decodes]

    def _propose(self, batch, ks: list[int]):
        if self.draft is not None:
            return self.draft.propose(batch, ks)
        drafts, qs = [], []
        for seq, k in zip(batch.seqs[: batch.num_decodes], ks, strict=True):
            tokens = propose_ngram(seq.token_ids, k, self.spec.prompt_lookup_max, self.spec.prompt_lookup_min)
            drafts.append(tokens)
            qs.append([None] * len(tokens))
        return drafts, qs

    # --- the step -----------------------------------------------------------------------------------

    def step(self, engine: LLMEngine) -> list[RequestOutput]:
        batch = engine.scheduler.schedule()
        if batch.is_empty:
            return []
        ks = self._budgets(engine, batch.seqs[: batch.num_decodes])
        drafts, proposals = self._propose(batch, ks)
        group = engine.runner.decode_kernel is None
        verify = build_verify_plan(batch, drafts, proposals, engine.block_size, group)
        logits = engine.tp.execute(verify.plan.step)
        now = time.time()
        to_sample: list[Sequence] = []
        rows: list[int] = []
        moved: list[Sequence] = []
        plan = verify.plan
        for i, (seq, n) in enumerate(zip(verify.seqs, verify.num_tokens, strict=True)):
            if verify.spec_rows[i] is not None:
                self._verify(engine, verify, i, logits, now)
                moved.append(seq)
                continue
            if plan.prompt_rows[i] is not None:
                engine._record_prompt_logprobs(seq, logits, plan, i)
            seq.num_computed_tokens += n
            engine.block_manager.register_full_blocks(seq)
            if plan.sample_rows[i] >= 0:
                to_sample.append(seq)
                rows.append(plan.sample_rows[i])
        if to_sample:
            result = engine.sampler(logits[rows], to_sample)
            for seq, token_id, lp in zip(to_sample, result.token_ids, result.logprobs, strict=True):
                engine._append_token(seq, token_id, lp, now)
                moved.append(seq)
        if self.draft is not None:
            for seq in moved:
                if seq.is_finished:
                    self.draft.forget(seq)
            self.draft.prune({s.seq_id for s in engine.scheduler.running})
        return self._outputs(engine, moved)

    @torch.inference_mode()
    def _verify(self, engine: LLMEngine, verify: VerifyPlan, i: int, logits: torch.Tensor, now: float) -> None:
        """Append the target's tokens for one speculating sequence: the accepted drafts, then the
        correction at the first rejection or the bonus token after the last draft."""
        seq = verify.seqs[i]
        rows = verify.spec_rows[i]
        assert rows is not None
        first, count = rows
        draft, qs = verify.drafts[i], verify.proposals[i]
        sampler = engine.sampler
        accepted = 0
        batched = None
        if not depends_on_output(seq):  # every position processed alike: one call for all of them
            batched = sampler.distributions(logits[first : first + count], [seq] * count)
        for j in range(count):
            # Processed on the sequence as it stands: penalties, bad words, min_tokens and the grammar
            # see exactly the tokens accepted so far, as they would without speculation.
            if batched is not None:
                raw, processed, scaled, greedy = (t[j : j + 1] for t in batched)
            else:
                raw, processed, scaled, greedy = sampler.distributions(logits[first + j : first + j + 1], [seq])
            is_draft = j < len(draft)
            if bool(greedy[0]):
                token = int(processed[0].argmax())
                ok = is_draft and token == draft[j]
            else:
                p = torch.softmax(scaled[0], dim=-1)
                if is_draft:
                    token, ok = verify_sampled(p, qs[j], draft[j], seq.generator)
                else:
                    token, ok = draw(p, seq.generator), False
            lp = sampler.token_logprobs(raw, processed, scaled, [seq], [token])[0]
            engine._append_token(seq, token, lp, now)
            if ok:
                accepted += 1
                self.stats.accepted_per_pos[j] += 1
            if seq.is_finished or not ok:
                break
        self.stats.num_drafts += 1
        self.stats.num_draft_tokens += len(draft)
        self.stats.num_accepted_tokens += accepted
        if self.draft is not None:
            self.draft.accepted(seq, accepted)
        if not seq.is_finished:
            # Only the last token fed and the accepted drafts hold valid KV: the next step starts there.
            seq.num_computed_tokens = seq.num_tokens - 1
            engine.block_manager.register_full_blocks(seq)
            engine.block_manager.trim(seq)

    def _outputs(self, engine: LLMEngine, moved: list[Sequence]) -> list[RequestOutput]:
        touched = {}
        for seq in moved:
            if seq.request_id in engine.requests:
                touched[seq.request_id] = engine.requests[seq.request_id]
        return engine._outputs_for(touched.values())
