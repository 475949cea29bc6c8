"""model_runner.prepare_step: packing a scheduled batch into the step's tensors, by hand-checked numbers."""

from __future__ import annotations

import pytest
from bowline_runtime.engine.block_manager import BlockManager
from bowline_runtime.engine.model_runner import prepare_step
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.engine.scheduler import ScheduledBatch
from bowline_runtime.engine.sequence import Sequence

BS = 4


def make_seq(seq_id, token_ids, num_prompt, computed, table, params=None) -> Sequence:
    seq = Sequence(seq_id, f"r{seq_id}", 0, list(token_ids), num_prompt, params or SamplingParams())
    seq.num_computed_tokens = computed
    seq.block_table = list(table)
    return seq


@pytest.fixture
def plan():
    # A decode: 6 tokens, 5 computed, blocks [7, 2]; it feeds position 5.
    decode = make_seq(0, [50, 51, 52, 53, 54, 55], 4, 5, [7, 2])
    # A fresh prompt of 5 tokens in blocks [3, 5], fed whole.
    fresh = make_seq(1, [60, 61, 62, 63, 64], 5, 0, [3, 5])
    # A 10-token prompt with 4 computed, in blocks [0, 1, 6]; this step feeds 3 (positions 4-6) only.
    chunk = make_seq(2, list(range(70, 80)), 10, 4, [0, 1, 6])
    batch = ScheduledBatch([decode, fresh, chunk], [1, 5, 3], num_decodes=1)
    return prepare_step(batch, BS)


def test_tokens_and_positions_are_packed_in_batch_order(plan):
    step = plan.step
    assert step.input_ids.tolist() == [55, 60, 61, 62, 63, 64, 74, 75, 76]
    assert step.positions.tolist() == [5, 0, 1, 2, 3, 4, 4, 5, 6]


def test_slot_mapping_follows_the_block_tables(plan):
    # slot = block_table[pos // 4] * 4 + pos % 4
    assert plan.step.slot_mapping.tolist() == [2 * 4 + 1, 12, 13, 14, 15, 20, 4, 5, 6]


def test_decode_blocks_and_lengths(plan):
    step = plan.step
    assert step.num_decodes == 1
    [group] = step.decode_groups
    assert (group.start, group.end) == (0, 1)
    assert group.block_tables.tolist() == [[7, 2]]
    assert group.context_lens == [6]
    assert group.seq_ids == [0]  # the decode sequence's id: staged contexts are matched by sequence


def test_prefill_spans(plan):
    fresh, chunk = plan.step.prefills
    assert (fresh.q_start, fresh.q_end, fresh.context_len, fresh.context_slots) == (1, 6, 5, None)  # nothing cached
    assert (chunk.q_start, chunk.q_end, chunk.context_len) == (6, 9, 7)
    assert chunk.context_slots.tolist() == [0, 1, 2, 3, 4, 5, 6]  # all 7 context positions: 4 cached + 3 new


def test_kept_rows_only_where_a_token_is_sampled(plan):
    assert plan.step.keep.tolist() == [0, 5]  # the decode, and the fresh prompt's last token
    assert plan.sample_rows == [0, 1, -1]  # the chunk does not reach its end: no sample
    assert plan.prompt_rows == [None, None, None]


def test_decode_tables_are_cut_to_the_context_and_padded():
    # Over-reserved tables are cut to ceil(len / 4) blocks; shorter ones padded with block 0.
    long = make_seq(0, list(range(9)), 3, 8, [4, 5, 6, 9])
    short = make_seq(1, [1, 2], 1, 1, [8])
    batch = ScheduledBatch([long, short], [1, 1], num_decodes=2)
    step = prepare_step(batch, BS).step
    [group] = step.decode_groups  # similar lengths: one group
    assert (group.start, group.end) == (0, 2)
    assert group.block_tables.tolist() == [[4, 5, 6], [8, 0, 0]]
    assert group.context_lens == [9, 2]
    assert group.seq_ids == [long.seq_id, short.seq_id]  # staged contexts are matched by sequence
    assert step.slot_mapping.tolist() == [6 * 4 + 0, 8 * 4 + 1]
    assert step.prefills == []
    assert step.keep.tolist() == [0, 1]


def test_decodes_of_spread_lengths_split_into_runs_unless_a_kernel_reads_them_whole():
    # Contexts of 2, 3, 40 and 60 blocks (block size 4): padding the short ones to 60 blocks would waste
    # work in padded attention, so they form their own run; a paged kernel takes them all at once.
    seqs = [
        make_seq(i, list(range(4 * blocks)), 1, 4 * blocks - 1, list(range(100 * i, 100 * i + blocks)))
        for i, blocks in enumerate([2, 3, 40, 60])
    ]
    batch = ScheduledBatch(seqs, [1, 1, 1, 1], num_decodes=4)
    runs = prepare_step(batch, BS).step.decode_groups
    assert [(g.start, g.end) for g in runs] == [(0, 2), (2, 4)]
    [group] = prepare_step(batch, BS, group_decodes=False).step.decode_groups
    assert (group.start, group.end) == (0, 4)
    assert group.block_tables.shape == (4, 60) and group.block_tables[0].tolist() == [0, 1] + [0] * 58
    assert group.context_lens == [8, 12, 160, 240]
    assert group.seq_ids == [0, 1, 2, 3]
    assert prepare_step(ScheduledBatch(seqs[:1], [1], num_decodes=0), BS, group_decodes=False).step.decode_groups == []


def test_prompt_logprob_rows_cover_every_prompt_position_across_chunks():
    params = SamplingParams(prompt_logprobs=1)
    seq = make_seq(0, [10, 11, 12, 13, 14, 15], 6, 0, [0, 1])
    first = prepare_step(ScheduledBatch([seq], [4], 0), BS)
    # Positions 0-3 predict tokens 1-4; no sample yet.
    assert first.prompt_rows == [None]  # default params ask for none...
    seq.params = params
    first = prepare_step(ScheduledBatch([seq], [4], 0), BS)
    assert first.prompt_rows == [(0, 0, 4)]
    assert first.step.keep.tolist() == [0, 1, 2, 3]
    assert first.sample_rows == [-1]
    seq.num_computed_tokens = 4
    second = prepare_step(ScheduledBatch([seq], [2], 0), BS)
    # Position 4 predicts token 5 (the last prompt token); position 5 samples the first output.
    assert second.prompt_rows == [(0, 4, 1)]
    assert second.step.keep.tolist() == [0, 1]
    assert second.sample_rows == [1]


def test_prompt_logprobs_cover_the_whole_prompt_even_when_its_prefix_is_cached():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    prompt = list(range(100, 120))
    first = Sequence(0, "a", 0, list(prompt), len(prompt), SamplingParams())
    bm.allocate(first)
    first.num_computed_tokens = len(prompt)
    bm.register_full_blocks(first)
    second = Sequence(1, "b", 0, list(prompt), len(prompt), SamplingParams(prompt_logprobs=0))
    bm.allocate(second)
    n = second.num_tokens - second.num_computed_tokens
    plan = prepare_step(ScheduledBatch([second], [n], 0), BS)
    assert plan.prompt_rows == [(0, 0, len(prompt) - 1)]
