"""The CPU path of each row's LoRA update: one C call per projection for every adapter of the step.

kernels/lora.c reads each adapter's A^T and the non-zero blocks of its B^T once per step and
processes all of that adapter's rows against them (see its header for why this beats torch's
stacked slots and per-adapter loop on the CPU). This module lays out what the kernel reads: per
adapter, a table of raw pointers and block offsets, one row per (layer, product), built once when
the adapter is installed; per step, the rows grouped by adapter and a scratch for the shrink.

The tables hold raw pointers into the adapter's packed tensors, so an adapter's `KernelTable`
lives exactly as long as its packed weights (both sit in lora.delta.PackedAdapter).
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from bowline_runtime.config import switch_on

# Must match TABLE_WIDTH in kernels/lora.c: R, A^T, B^T, B^T's row stride, in, module count, and
# per module (of at most three) its column offset, columns, rank offset and rank.
TABLE_WIDTH = 18
MAX_MODULES = 3
# BOWLINE_LORA_KERNEL=0 keeps torch's products on the CPU too (to compare, or as a way out).
KERNEL_ENV = "BOWLINE_LORA_KERNEL"


def library() -> ctypes.CDLL | None:
    """The kernel library when the LoRA kernel may be used here, else None."""
    if not switch_on(KERNEL_ENV):
        return None
    from bowline_runtime.kernels import cpu

    lib = cpu.load()
    if lib is None:
        return None
    if lib.bowline_lora_table_width() != TABLE_WIDTH:
        raise RuntimeError("kernels/lora.c and lora/kernel.py disagree on the descriptor layout")
    return lib


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether adapters on `device` in `dtype` take the C kernel (float32 on the CPU, kernels built)."""
    return device.type == "cpu" and dtype == torch.float32 and library() is not None


def build_table(
    groups: Mapping[tuple[int, str], Any], num_layers: int, group_names: tuple[str, ...]
) -> torch.Tensor:
    """int64 [num_layers x products, TABLE_WIDTH]: what lora.c reads for each (layer, product).

    `groups` maps (layer, product) to lora.delta.GroupWeights; absent entries get R = 0 (skipped).
    """
    table = torch.zeros(num_layers * len(group_names), TABLE_WIDTH, dtype=torch.int64)
    for (layer, group), w in groups.items():
        a_t, b_t, blocks = w.a_t, w.b_t, w.blocks
        if len(blocks) > MAX_MODULES:
            raise ValueError(f"at most {MAX_MODULES} modules per product, got {len(blocks)}")
        row = [a_t.shape[1], a_t.data_ptr(), b_t.data_ptr(), b_t.stride(0), a_t.shape[0], len(blocks)]
        for block in blocks:
            row += list(block)
        table[layer * len(group_names) + group_names.index(group), : len(row)] = torch.tensor(row, dtype=torch.int64)
    return table


class KernelStep:
    """One step's rows grouped by adapter, ready for a C call per projection."""

    def __init__(self, lib: ctypes.CDLL, spans: list[tuple[torch.Tensor, int, list[tuple[int, int]]]],
                 world_size: int) -> None:
        """`spans`: per adapter of the step, (its table, its largest R, its row spans [start, end))."""
        self._lib = lib
        self.world_size = world_size
        rows: list[int] = []
        offsets = [0]
        for _, _, adapter_spans in spans:
            for start, end in adapter_spans:
                rows.extend(range(start, end))
            offsets.append(len(rows))
        self._tables = torch.tensor([table.data_ptr() for table, _, _ in spans], dtype=torch.int64)
        self._keep = [table for table, _, _ in spans]  # the tables must outlive the step
        self._rows = torch.tensor(rows, dtype=torch.int64)
        self._offsets = torch.tensor(offsets, dtype=torch.int64)
        width = max((r for _, r, _ in spans), default=0)
        self._h = torch.zeros(len(rows), max(width, 1))
        self._count = len(spans)
        self._threads = torch.get_num_threads()

    def add(self, slot: int, x: torch.Tensor, out: torch.Tensor, row_parallel: bool) -> None:
        """out[row] += row's update for entry `slot` of the tables (layer x products + product)."""
        lib, h = self._lib, self._h
        args = (x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), slot, self._count,
                self._tables.data_ptr(), self._rows.data_ptr(), self._offsets.data_ptr(), h.data_ptr(), h.shape[1])
        if row_parallel and self.world_size > 1:
            lib.bowline_lora_f32(*args, 1, self._threads)
            dist.all_reduce(h)
            lib.bowline_lora_f32(*args, 2, self._threads)
        else:
            lib.bowline_lora_f32(*args, 3, self._threads)


def fits(x: torch.Tensor, outs: list[torch.Tensor]) -> bool:
    """Whether the kernel can read x and write outs directly: one float32 output, unit column stride."""
    return (
        len(outs) == 1 and x.dtype == torch.float32 and outs[0].dtype == torch.float32
        and x.dim() == 2 and outs[0].dim() == 2 and x.stride(1) == 1 and outs[0].stride(1) == 1
    )
