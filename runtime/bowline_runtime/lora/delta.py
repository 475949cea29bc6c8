"""Each row's low-rank update, added after the base projection of the whole batch (Punica's idea).

The base model's product runs once over every row of the step, whichever adapter each row uses;
then, per adapter present in the step, its rows are gathered, shrunk (x A^T, [rows, r]) and
expanded (h B^T) and added to those rows of the projection's output. Rows of the base model cost
nothing. q/k/v and gate/up share one shrink each (their A matrices stacked) and one expand (their
B matrices block-diagonal), matching the fused projections of models.packed_decoder, so a layer
makes at most 8 small products per adapter in the step.

With tensor parallelism each rank holds the slice of A and B that matches its shard of the base
weights: column-parallel projections (q/k/v, gate/up) keep A whole and slice B's rows; row-parallel
ones (o, down) slice A's columns, and the partial shrink [rows, r] is summed over ranks (a small
all-reduce) before the whole B expands it, so every rank adds the same full update after the base
projection's own all-reduce.

When a step mixes several adapters over few rows (decode steps), a per-adapter loop would cost
four small products per adapter and product; instead every adapter of the step sits in one of
`--max-loras` slots of a stacked A [in, slots x width] and B [slots x width, out] per product
(copied in when an adapter enters a slot, not per step), and the update is three operations
whatever the number of adapters: h = x A, h *= each row's slot mask, out += h B (Punica's BGMV
done as dense products; base rows have an all-zero mask). Steps with long prefills keep the loop,
whose cost is each row's own rank only.

On the CPU in float32 neither is used: lora.kernel hands every adapter of the step to one C call
per product (kernels/lora.c), which reads each adapter's A and the non-zero blocks of its B once
and skips base rows; at decode sizes that is a third of the stacked slots' time (it reads neither
other slots nor the block-diagonal zeros), and at prefill sizes it beats the loop's products too.

The update is a separate add after whatever Linear implementation the device or a quantized
format chose for the base projection, so it composes with any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from bowline_runtime.lora import kernel
from bowline_runtime.lora.adapter import LoRAAdapter, ModelShapes

# The decoder's products, and which adapter modules feed each (in the order of its output columns).
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
GROUP_INDEX = {group: i for i, group in enumerate(GROUPS)}  # a product's entry in lora.kernel's tables
ROW_PARALLEL = frozenset({"o", "down"})
# Steps with at most this many rows and two or more adapters take the stacked slots.
STACKED_MAX_ROWS = 128


@dataclass(frozen=True, slots=True)
class LoRALayout:
    """What every rank needs to lay adapters out: the base model's shapes and the serving bounds."""

    shapes: ModelShapes
    max_loras: int  # slots in the stacks
    max_rank: int  # each module's columns per slot


@dataclass(slots=True)
class GroupWeights:
    """One adapter's update for one product of one layer, on this rank, ready to multiply."""

    a_t: torch.Tensor  # [in_local, R]: the group's A matrices side by side, transposed
    b_t: torch.Tensor  # [R, out_local]: block-diagonal B, transposed (zeros for modules not adapted)
    sizes: tuple[int, ...]  # each module's local output columns (to split when not fused)
    # Per module adapted: (first column in out, columns, first row in b_t, rank): b_t's non-zero blocks.
    blocks: tuple[tuple[int, int, int, int], ...] = ()


@dataclass(slots=True)
class PackedAdapter:
    """One adapter on this rank: its products' weights and, on the CPU kernel's path, their descriptor table."""

    groups: dict[tuple[int, str], GroupWeights]
    table: torch.Tensor | None = None  # lora.kernel.build_table (raw pointers into `groups`)

    @property
    def max_width(self) -> int:
        """The largest R (sum of ranks) over its products: the columns of the kernel's shrink scratch."""
        return max((w.a_t.shape[1] for w in self.groups.values()), default=0)


def pack_adapter(
    adapter: LoRAAdapter, shapes: ModelShapes, rank: int, world_size: int, dtype: torch.dtype, device: torch.device,
    kernel_table: bool | None = None,
) -> PackedAdapter:
    """This rank's share of `adapter`, per (layer, product); with the CPU kernel's table where it
    will be used (`kernel_table` None: wherever lora.kernel.usable says so)."""
    packed: dict[tuple[int, str], GroupWeights] = {}
    for layer in range(shapes.num_layers):
        for group, parts in GROUPS.items():
            present = [adapter.weights.get((layer, p)) for p in parts]
            if not any(w is not None for w in present):
                continue
            row_parallel = group in ROW_PARALLEL
            sizes = tuple(shapes.sizes[p][1] // (1 if row_parallel else world_size) for p in parts)
            total_r = sum(w[0].shape[0] for w in present if w is not None)
            b = torch.zeros(sum(sizes), total_r)
            a_parts: list[torch.Tensor] = []
            blocks: list[tuple[int, int, int, int]] = []
            row = col = 0
            for size, w in zip(sizes, present, strict=True):
                if w is not None:
                    a, b_part = w
                    r = a.shape[0]
                    if row_parallel:
                        shard = a.shape[1] // world_size
                        a = a[:, rank * shard : (rank + 1) * shard]
                    else:
                        b_part = b_part[rank * size : (rank + 1) * size]
                    a_parts.append(a)
                    b[row : row + size, col : col + r] = b_part
                    blocks.append((row, size, col, r))
                    col += r
                row += size
            packed[(layer, group)] = GroupWeights(
                torch.cat(a_parts).t().contiguous().to(device=device, dtype=dtype),
                b.t().contiguous().to(device=device, dtype=dtype),
                sizes,
                tuple(blocks),
            )
    result = PackedAdapter(packed)
    if kernel.usable(device, dtype) if kernel_table is None else kernel_table:
        result.table = kernel.build_table(packed, shapes.num_layers, tuple(GROUPS))
    return result


class SlotStacks:
    """`max_loras` slots per (layer, product) holding the adapters of recent steps, least recently used reused first."""

    def __init__(self, layout: LoRALayout, rank: int, world_size: int, dtype: torch.dtype, device: torch.device) -> None:
        shapes, slots = layout.shapes, layout.max_loras
        self.num_slots = slots
        self.width = {g: len(parts) * layout.max_rank for g, parts in GROUPS.items()}  # columns per slot
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], torch.Tensor] = {}
        for layer in range(shapes.num_layers):
            for group, parts in GROUPS.items():
                row_parallel = group in ROW_PARALLEL
                in_local = shapes.sizes[parts[0]][0] // (world_size if row_parallel else 1)
                out_local = sum(shapes.sizes[p][1] // (1 if row_parallel else world_size) for p in parts)
                cols = slots * self.width[group]
                self.a[(layer, group)] = torch.zeros(in_local, cols, dtype=dtype, device=device)
                self.b[(layer, group)] = torch.zeros(cols, out_local, dtype=dtype, device=device)
        self.slot_of: dict[int, int] = {}  # lora id -> slot, in least recently used order

    def place(self, wanted: list[int], store: dict[int, PackedAdapter]) -> dict[int, int] | None:
        """Slots for the step's adapters, copying in those not already placed; None if they do not fit."""
        if len(wanted) > self.num_slots:
            return None
        for lora_id in wanted:
            if lora_id in self.slot_of:
                self.slot_of[lora_id] = self.slot_of.pop(lora_id)  # most recently used
                continue
            used = set(self.slot_of.values())
            free = next((s for s in range(self.num_slots) if s not in used), None)
            if free is None:
                victim = next(i for i in self.slot_of if i not in wanted)
                free = self.slot_of.pop(victim)
            self._copy(free, store[lora_id].groups)
            self.slot_of[lora_id] = free
        return {lora_id: self.slot_of[lora_id] for lora_id in wanted}

    def release(self, lora_id: int) -> None:
        self.slot_of.pop(lora_id, None)

    def _copy(self, slot: int, weights: dict[tuple[int, str], GroupWeights]) -> None:
        for key, a in self.a.items():
            w, col = self.width[key[1]], slot * self.width[key[1]]
            a[:, col : col + w].zero_()
            self.b[key][col : col + w].zero_()
            gw = weights.get(key)
            if gw is not None:
                r = gw.a_t.shape[1]
                a[:, col : col + r].copy_(gw.a_t)
                self.b[key][col : col + r].copy_(gw.b_t)


@dataclass(slots=True)
class _Rows:
    """One adapter's rows in this step: a slice when they are contiguous, else an index."""

    weights: dict[tuple[int, str], GroupWeights]
    start: int
    end: int
    index: torch.Tensor | None  # None: rows start..end


class LoRABatch:
    """The step's adapters and their rows; the decoder calls `add` after each base product.

    Three ways, chosen once per step: the C kernel (CPU, float32, every adapter of the step having
    its table: one call per product whatever the number of adapters), the stacked slots (two or more
    adapters over at most STACKED_MAX_ROWS rows, other devices), else the per-adapter loop.
    """

    def __init__(
        self, store: dict[int, PackedAdapter], segments: list[tuple[int, int, int]],
        device: torch.device, world_size: int, slots: SlotStacks | None = None, num_rows: int = 0,
    ) -> None:
        by_id: dict[int, list[tuple[int, int]]] = {}
        for start, end, lora_id in segments:
            by_id.setdefault(lora_id, []).append((start, end))
        missing = [i for i in by_id if i not in store]
        if missing:
            raise RuntimeError(f"LoRA adapter id {missing[0]} is scheduled but not loaded on this rank")
        self.world_size = world_size
        self._by_id = by_id
        self._store = store
        self._device = device
        self._rows: list[_Rows] | None = None
        self.stacks: SlotStacks | None = None
        self.kernel: kernel.KernelStep | None = None
        self.masks: dict[int, torch.Tensor] = {}  # columns per slot -> [rows, slots x columns] 0/1
        tables = [(t, store[i].max_width, spans) for i, spans in by_id.items() if (t := store[i].table) is not None]
        lib = kernel.library() if device.type == "cpu" and len(tables) == len(by_id) else None
        if lib is not None:
            self.kernel = kernel.KernelStep(lib, tables, world_size)
            return
        placed = None
        if slots is not None and len(by_id) > 1 and num_rows <= STACKED_MAX_ROWS:
            placed = slots.place(list(by_id), store)
        if placed is not None:
            assert slots is not None
            row_slot = torch.full((num_rows,), -1, dtype=torch.long)
            for lora_id, spans in by_id.items():
                for s, e in spans:
                    row_slot[s:e] = placed[lora_id]
            row_slot = row_slot.to(device)
            dtype = next(iter(slots.a.values())).dtype
            for w in set(slots.width.values()):
                cols = torch.arange(slots.num_slots * w, device=device) // w
                self.masks[w] = (cols.unsqueeze(0) == row_slot.unsqueeze(1)).to(dtype)
            self.stacks = slots

    @property
    def rows(self) -> list[_Rows]:
        """Each adapter's rows for the per-adapter loop (made on first use)."""
        if self._rows is None:
            self._rows = []
            for lora_id, spans in self._by_id.items():
                weights = self._store[lora_id].groups
                if len(spans) == 1:
                    self._rows.append(_Rows(weights, spans[0][0], spans[0][1], None))
                else:
                    index = torch.cat([torch.arange(s, e) for s, e in spans]).to(self._device)
                    self._rows.append(_Rows(weights, 0, 0, index))
        return self._rows

    def add(self, layer: int, group: str, x: torch.Tensor, outs: list[torch.Tensor]) -> None:
        """outs[i] += each row's update, in place: one tensor for a fused product, else one per module."""
        if self.kernel is not None and kernel.fits(x, outs):
            self.kernel.add(layer * len(GROUPS) + GROUP_INDEX[group], x, outs[0], group in ROW_PARALLEL)
            return
        if self.stacks is not None:
            self._add_stacked(layer, group, x, outs)
            return
        for rows in self.rows:
            w = rows.weights.get((layer, group))
            if w is None:
                continue
            xs = x[rows.start : rows.end] if rows.index is None else x.index_select(0, rows.index)
            h = xs @ w.a_t
            if group in ROW_PARALLEL and self.world_size > 1:
                dist.all_reduce(h)
            delta = h @ w.b_t
            parts = [delta] if len(outs) == 1 else list(delta.split(w.sizes, dim=-1))
            for out, d in zip(outs, parts, strict=True):
                if rows.index is None:
                    out[rows.start : rows.end] += d
                else:
                    out.index_add_(0, rows.index, d)

    def _add_stacked(self, layer: int, group: str, x: torch.Tensor, outs: list[torch.Tensor]) -> None:
        stacks = self.stacks
        assert stacks is not None
        h = x @ stacks.a[(layer, group)]
        if group in ROW_PARALLEL and self.world_size > 1:
            dist.all_reduce(h)
        h.mul_(self.masks[stacks.width[group]])
        b = stacks.b[(layer, group)]
        if len(outs) == 1:
            outs[0].addmm_(h, b)
            return
        sizes = [o.shape[-1] for o in outs]
        for out, d in zip(outs, (h @ b).split(sizes, dim=-1), strict=True):
            out += d
