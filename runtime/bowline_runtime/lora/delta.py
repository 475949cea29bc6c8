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

The update is a separate add after whatever Linear implementation the device or a quantized
format chose for the base projection, so it composes with any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from bowline_runtime.lora.adapter import LoRAAdapter, ModelShapes

# The decoder's products, and which adapter modules feed each (in the order of its output columns).
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
ROW_PARALLEL = frozenset({"o", "down"})


@dataclass(slots=True)
class GroupWeights:
    """One adapter's update for one product of one layer, on this rank, ready to multiply."""

    a_t: torch.Tensor  # [in_local, R]: the group's A matrices side by side, transposed
    b_t: torch.Tensor  # [R, out_local]: block-diagonal B, transposed (zeros for modules not adapted)
    sizes: tuple[int, ...]  # each module's local output columns (to split when not fused)


def pack_adapter(
    adapter: LoRAAdapter, shapes: ModelShapes, rank: int, world_size: int, dtype: torch.dtype, device: torch.device
) -> dict[tuple[int, str], GroupWeights]:
    """This rank's share of `adapter`, per (layer, product)."""
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
                    col += r
                row += size
            packed[(layer, group)] = GroupWeights(
                torch.cat(a_parts).t().contiguous().to(device=device, dtype=dtype),
                b.t().contiguous().to(device=device, dtype=dtype),
                sizes,
            )
    return packed


@dataclass(slots=True)
class _Rows:
    """One adapter's rows in this step: a slice when they are contiguous, else an index."""

    weights: dict[tuple[int, str], GroupWeights]
    start: int
    end: int
    index: torch.Tensor | None  # None: rows start..end


class LoRABatch:
    """The step's adapters and their rows; the decoder calls `add` after each base product."""

    def __init__(
        self, store: dict[int, dict[tuple[int, str], GroupWeights]], segments: list[tuple[int, int, int]],
        device: torch.device, world_size: int,
    ) -> None:
        by_id: dict[int, list[tuple[int, int]]] = {}
        for start, end, lora_id in segments:
            by_id.setdefault(lora_id, []).append((start, end))
        self.rows: list[_Rows] = []
        for lora_id, spans in by_id.items():
            weights = store.get(lora_id)
            if weights is None:
                raise RuntimeError(f"LoRA adapter id {lora_id} is scheduled but not loaded on this rank")
            if len(spans) == 1:
                self.rows.append(_Rows(weights, spans[0][0], spans[0][1], None))
            else:
                index = torch.cat([torch.arange(s, e) for s, e in spans]).to(device)
                self.rows.append(_Rows(weights, 0, 0, index))
        self.world_size = world_size

    def add(self, layer: int, group: str, x: torch.Tensor, outs: list[torch.Tensor]) -> None:
        """outs[i] += each row's update, in place: one tensor for a fused product, else one per module."""
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
