"""KV-cache blocks: allocation, reference counts and prefix caching by chained content hash.

Every full block of a sequence gets a hash of (previous block's hash, its token ids); a new sequence
whose leading blocks hash the same reuses them instead of recomputing. Freed cached blocks stay
findable until reused; the free list is ordered least-recently-freed first, so eviction is LRU.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from bowline_runtime.engine.multimodal import image_salt
from bowline_runtime.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None


def block_hash(prev_hash: int | None, token_ids: list[int] | tuple[int, ...], salt: tuple[int, ...] = ()) -> int:
    """`salt`: the hashes of the images whose placeholder tokens the block holds (engine.multimodal)."""
    return hash((prev_hash, tuple(token_ids), *salt))


def chain_root(seq: Sequence) -> int | None:
    """The hash a sequence's chain starts from: the same tokens under another LoRA adapter are other
    keys and values, so each adapter's chain has its own root (None: the base model)."""
    return hash(("lora", seq.lora_id)) if seq.lora_id else None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    # --- allocation --------------------------------------------------------------------------------

    def _take_free(self) -> Block:
        block_id, _ = self.free.popitem(last=False)  # least recently freed first
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]  # evicted from the prefix cache
        block.hash = None
        block.ref_count = 1
        return block

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks matching the sequence's leading full blocks (never its last token's block)."""
        # Prompt logprobs need logits at every prompt position: nothing of such a prompt may be skipped.
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        hits: list[int] = []
        prev: int | None = chain_root(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size  # leave at least one token to compute
        for i in range(max_blocks):
            h = block_hash(prev, seq.token_ids[i * self.block_size : (i + 1) * self.block_size], self._salt(seq, i))
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
            prev = h
        return hits

    def _salt(self, seq: Sequence, i: int) -> tuple[int, ...]:
        return image_salt(seq.images, i * self.block_size, (i + 1) * self.block_size) if seq.images else ()

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._prefix_hits(seq)
        reusable_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        needed = seq.num_blocks_needed(self.block_size) - len(hits)
        return needed + reusable_free <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its current tokens, reusing cached prefix blocks."""
        assert not seq.block_table
        hits = self._prefix_hits(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(seq.num_blocks_needed(self.block_size) - len(hits)):
            seq.block_table.append(self._take_free().block_id)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens

    def deallocate(self, seq: Sequence) -> None:
        """Release a sequence's blocks at once (finished, aborted or preempted)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if not self.enable_prefix_caching:
                    block.hash = None
                self.free[block_id] = None
        seq.block_table.clear()
        seq.num_computed_tokens = 0

    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        return self._blocks_to_grow(seq, num_new_tokens) <= self.num_free_blocks

    def _blocks_to_grow(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, seq.num_blocks_needed(self.block_size, seq.num_tokens + num_new_tokens) - len(seq.block_table))

    def append_slots(self, seq: Sequence, num_new_tokens: int = 1) -> None:
        """Grow the block table so `num_new_tokens` more tokens fit."""
        for _ in range(self._blocks_to_grow(seq, num_new_tokens)):
            seq.block_table.append(self._take_free().block_id)

    def trim(self, seq: Sequence) -> None:
        """Free the blocks beyond what the sequence's tokens need: the lookahead slots that rejected
        speculative tokens were written to (their KV is garbage; no hash was ever given to it)."""
        keep = seq.num_blocks_needed(self.block_size)
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            block.ref_count -= 1
            if block.ref_count == 0:
                block.hash = None
                self.free[block.block_id] = None

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step, hash blocks that became full so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        prev: int | None = chain_root(seq)
        for i in range(num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash = block_hash(prev, seq.token_ids[i * self.block_size : (i + 1) * self.block_size], self._salt(seq, i))
                self.cached.setdefault(block.hash, block.block_id)
            prev = block.hash
