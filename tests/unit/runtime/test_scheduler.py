"""Continuous batching (engine/scheduler.py) driven by a stand-in for the engine's step bookkeeping."""

from __future__ import annotations

from bowline_runtime.engine.block_manager import BlockManager
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.engine.scheduler import ScheduledBatch, Scheduler
from bowline_runtime.engine.sequence import SeqStatus, Sequence

BS = 4


def make_seq(seq_id: int, prompt_len: int) -> Sequence:
    tokens = [100 + seq_id] * prompt_len
    return Sequence(seq_id, f"r{seq_id}", 0, tokens, prompt_len, SamplingParams())


def make_scheduler(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, caching=False) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, caching), max_num_seqs, max_num_batched_tokens)


def finish_step(sched: Scheduler, batch: ScheduledBatch, max_tokens: int | None = None) -> list[Sequence]:
    """What LLMEngine.step does after the forward: advance, register blocks, append a sampled token."""
    done = []
    for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
        assert seq.num_computed_tokens + n <= seq.num_tokens
        assert len(seq.block_table) * BS >= seq.num_computed_tokens + n  # room for the KV it writes
        seq.num_computed_tokens += n
        sched.block_manager.register_full_blocks(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
            if max_tokens is not None and seq.num_output_tokens >= max_tokens:
                sched.finish(seq)
                done.append(seq)
    return done


def test_admission_is_bounded_by_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(i, 3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == seqs[:2]
    assert [s.status for s in seqs] == [SeqStatus.RUNNING] * 2 + [SeqStatus.WAITING] * 2
    assert list(sched.waiting) == seqs[2:]


def test_admission_is_bounded_by_max_num_batched_tokens():
    sched = make_scheduler(max_num_batched_tokens=10)
    seqs = [make_seq(i, 4) for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert sum(batch.num_tokens) <= 10
    # Two whole prompts, then the third starts with the 2 tokens left in the budget (chunked).
    assert batch.seqs == seqs[:3]
    assert batch.num_tokens == [4, 4, 2]
    assert list(sched.waiting) == seqs[3:]


def test_a_long_prompt_is_chunked_over_steps():
    sched = make_scheduler(max_num_batched_tokens=8)
    seq = make_seq(0, 20)
    sched.add(seq)
    chunks = []
    while seq.num_output_tokens == 0:
        batch = sched.schedule()
        assert batch.seqs == [seq] and batch.num_decodes == 0
        chunks.append(batch.num_tokens[0])
        finish_step(sched, batch)
    assert chunks == [8, 8, 4]
    assert seq.num_computed_tokens == 20
    batch = sched.schedule()  # now it decodes
    assert batch.num_decodes == 1 and batch.num_tokens == [1]


def test_decodes_come_first_then_prefill_chunks():
    sched = make_scheduler(max_num_batched_tokens=6)
    a = make_seq(0, 3)
    sched.add(a)
    finish_step(sched, sched.schedule())  # a prefilled, one token sampled
    b = make_seq(1, 10)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b]
    assert batch.num_decodes == 1
    assert batch.num_tokens == [1, 5]  # the decode's token is taken from the budget first
    finish_step(sched, batch)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_decodes == 1 and batch.num_tokens == [1, 5]


def test_running_sequences_are_served_before_new_admissions():
    sched = make_scheduler(max_num_batched_tokens=6)
    a = make_seq(0, 12)
    sched.add(a)
    finish_step(sched, sched.schedule())  # a: 6 of 12 prompt tokens done
    b = make_seq(1, 3)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a] and batch.num_tokens == [6]  # a's remaining chunk uses the whole budget
    assert list(sched.waiting) == [b]


def test_when_blocks_run_out_the_newest_is_preempted_and_later_readmitted():
    # 4 blocks of 4 tokens. Two prompts of 6 tokens take 2 blocks each; both soon need a third.
    sched = make_scheduler(num_blocks=4)
    old, new = make_seq(0, 6), make_seq(1, 6)
    sched.add(old)
    sched.add(new)
    for _ in range(5):  # prefill, then decode until somebody needs a third block
        finish_step(sched, sched.schedule())
        if sched.num_preemptions:
            break
    # Only the newer one gives way.
    assert new.status is SeqStatus.WAITING
    assert list(sched.waiting) == [new]
    assert new.block_table == [] and new.num_computed_tokens == 0
    assert old.status is SeqStatus.RUNNING
    assert sched.num_preemptions == 1
    # It waits (never fails) and comes back, recomputing its prompt and its outputs so far.
    generated_before = list(new.output_token_ids)
    for _ in range(20):
        batch = sched.schedule()
        finish_step(sched, batch, max_tokens=6)
        if old.is_finished:
            break
    assert old.is_finished
    batch = sched.schedule()
    assert new in batch.seqs and new.status is SeqStatus.RUNNING
    i = batch.seqs.index(new)
    assert batch.num_tokens[i] == new.num_tokens  # whole sequence recomputed
    assert new.output_token_ids[: len(generated_before)] == generated_before
    for _ in range(20):
        finish_step(sched, batch, max_tokens=6)
        if new.is_finished:
            break
        batch = sched.schedule()
    assert new.is_finished and new.num_output_tokens == 6
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == 4


def test_a_lone_sequence_that_cannot_grow_waits_instead_of_failing():
    sched = make_scheduler(num_blocks=2)
    seq = make_seq(0, 7)
    sched.add(seq)
    finish_step(sched, sched.schedule())  # 8 tokens in 2 blocks
    finish_step(sched, sched.schedule())  # decode of token 8 (still fits): 9 tokens
    batch = sched.schedule()  # the 9th token needs a third block that does not exist
    assert batch.is_empty
    assert seq.status is SeqStatus.WAITING and seq.block_table == []
    assert sched.block_manager.num_free_blocks == 2


def test_finish_frees_the_blocks_of_running_and_waiting_sequences():
    sched = make_scheduler(num_blocks=8, max_num_seqs=1)
    a, b = make_seq(0, 9), make_seq(1, 2)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert sched.block_manager.num_free_blocks == 5
    sched.finish(a)
    assert a.status is SeqStatus.FINISHED and a.block_table == []
    assert sched.block_manager.num_free_blocks == 8
    assert sched.running == []
    sched.finish(b)  # aborted while still waiting
    assert b.status is SeqStatus.FINISHED
    assert not sched.has_unfinished()
    assert sched.schedule().is_empty


def test_prefix_cached_tokens_are_not_recomputed():
    sched = make_scheduler(caching=True)
    a = make_seq(0, 9)
    sched.add(a)
    finish_step(sched, sched.schedule())
    b = make_seq(1, 9)
    b.token_ids = list(a.token_ids[:9])  # the same prompt
    sched.add(b)
    batch = sched.schedule()
    i = batch.seqs.index(b)
    assert b.num_cached_tokens == 8
    assert batch.num_tokens[i] == 1  # only the last prompt token is fed


def test_a_decode_that_fits_in_the_blocks_it_holds_preempts_nobody():
    # 2 blocks of 4 tokens each for two sequences; each has 8 tokens, 7 computed: the decode of
    # position 7 writes into the second block each already holds, so no new block is needed.
    sched = make_scheduler(num_blocks=4)
    a, b = make_seq(0, 7), make_seq(1, 7)
    sched.add(a)
    sched.add(b)
    finish_step(sched, sched.schedule())
    assert a.num_tokens == b.num_tokens == 8 and len(a.block_table) == len(b.block_table) == 2
    batch = sched.schedule()
    assert sched.num_preemptions == 0
    assert batch.seqs == [a, b] and batch.num_decodes == 2


def test_decodes_are_ordered_by_context_length_for_the_runner():
    sched = make_scheduler()
    long, short = make_seq(0, 11), make_seq(1, 2)
    sched.add(long)
    sched.add(short)
    finish_step(sched, sched.schedule())
    batch = sched.schedule()
    assert batch.num_decodes == 2
    assert batch.seqs == [short, long]  # ascending length, whatever the admission order


def test_without_chunked_prefill_a_prompt_waits_for_a_step_that_fits_it_whole():
    sched = Scheduler(BlockManager(64, BS, False), 8, 20, chunked_prefill=False)
    short, long = make_seq(0, 8), make_seq(1, 16)
    sched.add(short)
    sched.add(long)
    first = sched.schedule()
    assert first.seqs == [short] and first.num_tokens == [8]  # 8 + 16 > 20: the long prompt is not cut
    finish_step(sched, first)
    second = sched.schedule()
    assert second.seqs == [short, long] and second.num_tokens == [1, 16]  # whole, beside the decode
