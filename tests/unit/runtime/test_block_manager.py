"""KV-block accounting and prefix caching (engine/block_manager.py), on hand-made sequences."""

from __future__ import annotations

import pytest
from bowline_runtime.engine.block_manager import BlockManager
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.engine.sequence import Sequence

BS = 4


def make_seq(token_ids: list[int], seq_id: int = 0) -> Sequence:
    return Sequence(
        seq_id=seq_id,
        request_id=f"r{seq_id}",
        index=0,
        token_ids=list(token_ids),
        num_prompt_tokens=len(token_ids),
        params=SamplingParams(),
    )


def computed(bm: BlockManager, seq: Sequence) -> None:
    """What the engine does after a step that fed every known token: mark them computed, register blocks."""
    seq.num_computed_tokens = seq.num_tokens
    bm.register_full_blocks(seq)


@pytest.mark.parametrize("caching", [False, True])
def test_allocate_then_deallocate_restores_the_free_count(caching):
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=caching)
    a, b = make_seq(list(range(9)), 0), make_seq(list(range(100, 104)), 1)
    bm.allocate(a)
    bm.allocate(b)
    assert len(a.block_table) == 3  # 9 tokens / 4 per block, rounded up
    assert len(b.block_table) == 1  # exactly one full block
    assert len(set(a.block_table) | set(b.block_table)) == 4  # no block given twice
    assert bm.num_free_blocks == 6
    computed(bm, a)
    bm.deallocate(a)
    bm.deallocate(b)
    assert bm.num_free_blocks == 10
    assert a.block_table == [] and b.block_table == []
    assert a.num_computed_tokens == 0
    assert all(block.ref_count == 0 for block in bm.blocks)


def test_append_slots_grows_only_at_block_boundaries():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    seq = make_seq([1, 2, 3])
    bm.allocate(seq)
    bm.append_slots(seq, 1)  # 4 tokens still fit in one block
    assert len(seq.block_table) == 1
    bm.append_slots(seq, 2)  # 5 tokens need a second
    assert len(seq.block_table) == 2
    assert bm.num_free_blocks == 2


def test_can_allocate_refuses_when_blocks_run_out():
    bm = BlockManager(num_blocks=3, block_size=BS, enable_prefix_caching=False)
    first = make_seq(list(range(8)), 0)  # 2 blocks
    assert bm.can_allocate(first)
    bm.allocate(first)
    assert bm.can_allocate(make_seq(list(range(4)), 1))  # 1 block left: fits
    assert not bm.can_allocate(make_seq(list(range(5)), 2))  # needs 2
    assert bm.can_append(first, 1)  # a 9th token needs the last free block
    bm.allocate(make_seq(list(range(4)), 1))
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(make_seq([7], 3))
    assert not bm.can_append(first, 1)


def test_common_prefix_shares_full_blocks_only():
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    prefix = list(range(10, 18))  # two full blocks
    a = make_seq(prefix + [1, 2], 0)
    bm.allocate(a)
    computed(bm, a)
    b = make_seq(prefix + [3, 4, 5], 1)
    free_before = bm.num_free_blocks
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]  # the shared prefix
    assert b.block_table[2] != a.block_table[2]  # the partial block is never shared
    assert [bm.blocks[i].ref_count for i in b.block_table] == [2, 2, 1]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert bm.num_free_blocks == free_before - 1  # only the new tail block was taken
    # Freeing one sharer keeps the shared blocks alive for the other.
    bm.deallocate(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    assert not set(b.block_table) & set(bm.free)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    prompt = list(range(20, 28))  # exactly two blocks
    a = make_seq(prompt, 0)
    bm.allocate(a)
    computed(bm, a)
    b = make_seq(prompt, 1)
    bm.allocate(b)
    # The block holding the last token is recomputed, so the model produces logits to sample from.
    assert b.num_computed_tokens == 4
    assert b.block_table[0] == a.block_table[0]
    assert b.block_table[1] != a.block_table[1]
    assert b.is_prefilling or b.num_computed_tokens == b.num_tokens - 1


def test_prefix_match_is_chained_not_per_block():
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], 0)
    bm.allocate(a)
    computed(bm, a)
    # Same second block, different first block: nothing may be shared (the KV depends on the prefix).
    b = make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9], 1)
    bm.allocate(b)
    assert b.num_computed_tokens == 0
    assert not set(a.block_table) & set(b.block_table)


def test_no_sharing_when_prefix_caching_is_off():
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    a = make_seq(list(range(9)), 0)
    bm.allocate(a)
    computed(bm, a)
    b = make_seq(list(range(9)), 1)
    bm.allocate(b)
    assert b.num_computed_tokens == 0
    assert not set(a.block_table) & set(b.block_table)


def test_freed_cached_blocks_are_reused_by_a_later_identical_prefix():
    bm = BlockManager(num_blocks=6, block_size=BS, enable_prefix_caching=True)
    a = make_seq(list(range(9)), 0)
    bm.allocate(a)
    computed(bm, a)
    cached_blocks = a.block_table[:2]
    bm.deallocate(a)
    assert bm.num_free_blocks == 6  # cached blocks count as free...
    b = make_seq(list(range(8)) + [99, 98], 1)
    bm.allocate(b)  # ...yet are found again while nobody has reused them
    assert b.block_table[:2] == cached_blocks
    assert b.num_computed_tokens == 8
    assert [bm.blocks[i].ref_count for i in cached_blocks] == [1, 1]
    assert bm.num_free_blocks == 6 - 3


def test_eviction_takes_the_least_recently_freed_block_first():
    bm = BlockManager(num_blocks=5, block_size=BS, enable_prefix_caching=True)
    old = make_seq([1, 1, 1, 1, 9], 0)
    new = make_seq([2, 2, 2, 2, 9], 1)
    bm.allocate(old)
    bm.allocate(new)
    computed(bm, old)
    computed(bm, new)
    old_block, new_block = old.block_table[0], new.block_table[0]
    bm.deallocate(old)  # freed first: evicted first
    bm.deallocate(new)
    # Three unrelated blocks: the never-used block, then old's two; new's cached prefix survives.
    filler = make_seq([5] * 12, 2)
    bm.allocate(filler)
    assert old_block in filler.block_table
    assert new_block not in filler.block_table
    again_old = make_seq([1, 1, 1, 1, 9], 3)
    again_new = make_seq([2, 2, 2, 2, 9], 4)
    assert bm.can_allocate(again_new)
    bm.allocate(again_new)
    assert again_new.block_table[0] == new_block and again_new.num_computed_tokens == 4
    bm.deallocate(filler)
    bm.allocate(again_old)
    assert again_old.num_computed_tokens == 0  # its cached block was evicted and overwritten


def test_can_allocate_counts_free_cached_hits_against_the_free_pool():
    bm = BlockManager(num_blocks=3, block_size=BS, enable_prefix_caching=True)
    a = make_seq(list(range(9)), 0)  # 3 blocks, two of them full
    bm.allocate(a)
    computed(bm, a)
    bm.deallocate(a)
    # 9 + 2 tokens need 3 blocks: 2 cached hits (both free) + 1 new = all 3 free blocks.
    b = make_seq(list(range(9)) + [50, 51], 1)
    assert bm.can_allocate(b)
    c = make_seq(list(range(8)) + list(range(60, 66)), 2)  # 14 tokens: 4 blocks, more than exist
    assert not bm.can_allocate(c)
    bm.allocate(b)
    assert bm.num_free_blocks == 0
    assert b.num_computed_tokens == 8
