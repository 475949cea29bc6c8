"""Runs one forward pass over a scheduled batch: packs tokens, builds attention metadata, keeps the KV cache.

`prepare_step` (pure) turns a ScheduledBatch into a StepInput of plain tensors; the same StepInput is
broadcast to every tensor-parallel rank, each of which calls `ModelRunner.execute` on its shard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from bowline_runtime.engine.multimodal import ImageBatch, plan_images
from bowline_runtime.engine.scheduler import ScheduledBatch
from bowline_runtime.lora.delta import PackedAdapter
from bowline_runtime.models.attention import AttentionMetadata, DecodeGroup, PrefillSpan, head_dim
from bowline_runtime.models.packed_decoder import PackedDecoder
from bowline_runtime.models.vision import VisionEncoder

# Tokens of room a staged decode context gets beyond its current length: it is gathered afresh
# from the paged cache only every this many steps (or when its group changes).
STAGING_HEADROOM = 64


@dataclass(slots=True)
class DecodeGroupInput:
    """A run of single-token decodes attended together (see group_by_length), device-neutral."""

    start: int  # first packed row of the run (decodes sit at the front of the packed batch)
    end: int  # one past its last row
    block_tables: torch.Tensor  # [end - start, max blocks] each sequence's blocks, padded with block 0
    context_lens: list[int]  # each sequence's context length including this step's token
    seq_ids: list[int]  # which sequences, so the runner can reuse last step's staged contexts


@dataclass(slots=True)
class PrefillInput:
    """One sequence's chunk of prompt tokens in this step."""

    q_start: int  # first packed row of the chunk
    q_end: int  # one past its last row
    context_len: int  # tokens attended: cached ones plus this chunk
    context_slots: torch.Tensor | None  # KV-cache slots of all context_len positions; None: nothing cached yet


@dataclass(slots=True)
class StepInput:
    """One step's packed batch: the same object is broadcast to every tensor-parallel rank."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    num_decodes: int
    decode_groups: list[DecodeGroupInput]
    prefills: list[PrefillInput]
    keep: torch.Tensor  # [K] packed positions whose logits are needed
    images: ImageBatch | None = None  # images whose placeholder rows are in this step (engine.multimodal)
    # (first row, end row, adapter id) of each sequence served by a LoRA adapter (none: base model only)
    lora_segments: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass(slots=True)
class _StagedContext:
    """A decode group's gathered context, kept for the next step when the same sequences grow by one."""

    seq_ids: tuple[int, ...]  # the group's sequences, in order
    context_lens: list[int]  # their lengths at the step that staged it
    capacity: int  # tokens the staged buffers hold
    store: dict  # the per-layer buffers (models.attention fills them)


@dataclass(slots=True)
class StepPlan:
    """Rank 0's bookkeeping for a step: which kept logits rows belong to which sequence."""

    step: StepInput
    sample_rows: list[int]  # row in logits -> sampled for batch.seqs[i] (-1: no sample this step)
    prompt_rows: list[tuple[int, int, int] | None]  # per seq: (first row, first position, count) of prompt logprobs


def _slots(block_table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    table = torch.tensor(block_table, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


def group_by_length(num_blocks: list[int], ratio: float = 1.5, slack: int = 8) -> list[tuple[int, int]]:
    """Split ascending context sizes (in blocks) into runs attended together.

    Padding every decode to the batch's longest context wastes gather and attention work in
    proportion to the spread (a 2,000-token context beside 100-token ones pads them twenty-fold);
    a new run starts where the size outgrows the run's first by `ratio` and by more than `slack`
    blocks, so short contexts never split into many tiny calls.
    """
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(num_blocks) + 1):
        if i == len(num_blocks) or (
            num_blocks[i] > ratio * num_blocks[start] and num_blocks[i] - num_blocks[start] > slack
        ):
            groups.append((start, i))
            start = i
    return groups


def prepare_step(batch: ScheduledBatch, block_size: int, group_decodes: bool = True) -> StepPlan:
    """The step's packed tensors and bookkeeping. `group_decodes`: split decodes into runs of similar
    context length (`group_by_length`), which padded attention needs; a paged decode kernel reads each
    context at its own length, so it takes all decodes as one group (one call per layer, and every
    (sequence, head) task in one pool: 10 % less attention time for 16 spread contexts)."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    keep: list[int] = []
    sample_rows: list[int] = []
    prompt_rows: list[tuple[int, int, int] | None] = []
    prefills: list[PrefillInput] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    decode_ids: list[int] = []
    lora_segments: list[tuple[int, int, int]] = []

    cursor = 0
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens, strict=True)):
        start = seq.num_computed_tokens
        end = start + n
        ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        # Plain integers: most rows are single-token decodes, where a tensor op per sequence costs more.
        table = seq.block_table
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        if i < batch.num_decodes:
            decode_tables.append(seq.block_table[: -(-end // block_size)])
            decode_lens.append(end)
            decode_ids.append(seq.seq_id)
        else:
            context = None if start == 0 else _slots(seq.block_table, 0, end, block_size)
            prefills.append(PrefillInput(cursor, cursor + n, end, context))
        wants_prompt = seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1
        if wants_prompt:
            count = min(end, seq.num_prompt_tokens - 1) - start
            prompt_rows.append((len(keep), start, count))
            keep.extend(range(cursor, cursor + count))
        else:
            prompt_rows.append(None)
        if end == seq.num_tokens:  # the chunk reaches the end: sample the next token
            sample_rows.append(len(keep))
            keep.append(cursor + n - 1)
        else:
            sample_rows.append(-1)
        if seq.lora_id:
            lora_segments.append((cursor, cursor + n, seq.lora_id))
        cursor += n

    decode_groups: list[DecodeGroupInput] = []
    sizes = [len(t) for t in decode_tables]
    runs = group_by_length(sizes) if group_decodes else ([(0, len(sizes))] if sizes else [])
    for a, b in runs:
        width = max(len(t) for t in decode_tables[a:b])
        tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables[a:b]], dtype=torch.long)
        decode_groups.append(DecodeGroupInput(a, b, tables, decode_lens[a:b], decode_ids[a:b]))
    step = StepInput(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        num_decodes=batch.num_decodes,
        decode_groups=decode_groups,
        prefills=prefills,
        keep=torch.tensor(keep, dtype=torch.long),
        images=plan_images(batch.seqs, batch.num_tokens),
        lora_segments=lora_segments,
    )
    return StepPlan(step, sample_rows, prompt_rows)


class ModelRunner:
    """Holds a (possibly sharded) model and its KV cache on one device."""

    def __init__(
        self, model: nn.Module, device: torch.device, dtype: torch.dtype, is_driver: bool, block_size: int,
        stage_decode_context: bool = True, decode_kernel: Callable[..., None] | None = None,
        prefill_kernel: Callable[..., None] | None = None, decoder: PackedDecoder | None = None,
        cache_writer: Callable[..., None] | None = None, vision: VisionEncoder | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.vision = vision  # a vision-language model's image encoder (models.vision), or None
        self.decoder = decoder  # the lean forward (models.packed_decoder), or None: transformers' forward
        self.block_size = block_size
        # A kernel reading the paged cache directly needs neither staged copies nor padding masks.
        self.decode_kernel = decode_kernel
        self.stage_decode_context = stage_decode_context and decode_kernel is None
        self.prefill_kernel = prefill_kernel
        self.cache_writer = cache_writer  # None: torch's index_copy_
        self.device = device
        self.dtype = dtype
        self.kv_dtype = dtype if kv_dtype is None else kv_dtype  # --kv-cache-dtype (loader.resolve_kv_cache_dtype)
        self.is_driver = is_driver
        config = model.config.get_text_config()
        self.num_layers = config.num_hidden_layers
        self.head_dim = head_dim(config)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._staged: dict[int, _StagedContext] = {}  # by decode-group index
        # LoRA adapters on this rank, by id (lora.delta.pack_adapter); the shard this rank holds.
        self.lora_store: dict[int, PackedAdapter] = {}
        self.lora_slots = None  # lora.delta.SlotStacks, made with the first adapter
        self.tp_rank, self.tp_size = 0, 1

    def set_lora(self, lora_id: int, adapter, layout) -> None:
        """Install this rank's share of an adapter (lora.adapter.LoRAAdapter), or drop it (None);
        `layout` is the lora.delta.LoRALayout."""
        from bowline_runtime.lora import kernel
        from bowline_runtime.lora.delta import SlotStacks, pack_adapter

        # The stacked slots serve devices without the C kernel; on the CPU it reads each adapter in place.
        if self.lora_slots is None and not kernel.usable(self.device, self.dtype):
            self.lora_slots = SlotStacks(layout, self.tp_rank, self.tp_size, self.dtype, self.device)
        if self.lora_slots is not None:
            self.lora_slots.release(lora_id)
        if adapter is None:
            self.lora_store.pop(lora_id, None)
        else:
            self.lora_store[lora_id] = pack_adapter(
                adapter, layout.shapes, self.tp_rank, self.tp_size, self.dtype, self.device
            )

    def kv_bytes_per_token(self, num_kv_heads_local: int) -> int:
        return 2 * self.num_layers * num_kv_heads_local * self.head_dim * torch.finfo(self.kv_dtype).bits // 8

    def allocate_kv_cache(self, num_slots: int, num_kv_heads_local: int) -> None:
        # Zeroed, not empty: padded context slots are read (then masked), and NaN * 0 would still be NaN.
        shape = (num_kv_heads_local, num_slots, self.head_dim)  # head-major: see models.attention
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
             torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
            for _ in range(self.num_layers)
        ]

    def _decode_groups(self, step: StepInput) -> list[DecodeGroup]:
        """Attention groups for this step, reusing last step's staged contexts where the same
        sequences simply grew by one token (see models.attention.DecodeGroup)."""
        groups: list[DecodeGroup] = []
        staged: dict[int, _StagedContext] = {}
        for index, group in enumerate(step.decode_groups):
            start, end, tables, lens = group.start, group.end, group.block_tables, group.context_lens
            ids, longest = tuple(group.seq_ids), max(lens)
            prev = self._staged.get(index)
            reuse = (
                prev is not None and prev.seq_ids == ids and longest <= prev.capacity
                and all(now == before + 1 for now, before in zip(lens, prev.context_lens, strict=True))
            )
            if reuse:
                assert prev is not None
                capacity, store = prev.capacity, prev.store
            else:
                headroom = STAGING_HEADROOM if self.stage_decode_context else 0
                capacity, store = -(-(longest + headroom) // self.block_size) * self.block_size, {}
            if self.stage_decode_context:
                staged[index] = _StagedContext(ids, lens, capacity, store)
            lens_t = torch.tensor(lens)
            mask = None
            if self.decode_kernel is None:
                valid = torch.arange(longest).unsqueeze(0) < lens_t.unsqueeze(1)
                mask = torch.zeros(valid.shape, dtype=self.dtype).masked_fill(~valid, float("-inf"))
                mask = mask.view(1, end - start, 1, longest).to(self.device)
            groups.append(DecodeGroup(
                start, end, tables.to(self.device), lens_t.to(self.device), mask, store, reuse, capacity,
            ))
        self._staged = staged  # groups that ended release their buffers here
        return groups

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor | None:
        dev = self.device
        groups = self._decode_groups(step)
        meta = AttentionMetadata(
            slot_mapping=step.slot_mapping.to(dev),
            decode_groups=groups,
            block_size=self.block_size,
            prefills=[
                PrefillSpan(p.q_start, p.q_end, p.context_len, None if p.context_slots is None else p.context_slots.to(dev))
                for p in step.prefills
            ],
            kv_caches=self.kv_caches,
            decode_kernel=self.decode_kernel,
            prefill_kernel=self.prefill_kernel,
            cache_writer=self.cache_writer,
        )
        keep = step.keep if self.is_driver else step.keep[:0]
        embeds = None
        if step.images is not None:
            if self.vision is None:
                raise ValueError("image inputs reached a text-only model")
            embeds = self.vision.embed(step.input_ids.to(dev), step.images)
        lora = None
        if step.lora_segments:
            from bowline_runtime.lora.delta import LoRABatch

            lora = LoRABatch(self.lora_store, step.lora_segments, dev, self.tp_size, self.lora_slots,
                             len(step.input_ids))
        if self.decoder is not None:
            logits = self.decoder(step.input_ids.to(dev), step.positions.to(dev), keep.to(dev), meta, lora=lora,
                                  inputs_embeds=embeds)
            return logits if self.is_driver else None
        tokens = {"input_ids": step.input_ids.to(dev).unsqueeze(0)} if embeds is None else {"inputs_embeds": embeds.unsqueeze(0)}
        out = self.model(
            **tokens,
            position_ids=step.positions.to(dev).unsqueeze(0),
            use_cache=False,
            logits_to_keep=keep.to(dev),
            attn_meta=meta,
        )
        return out.logits[0] if self.is_driver else None
