"""Pipeline parallelism over transformers models: each stage keeps a contiguous slice of the decoder layers.

The model's own forward still runs on every stage (embedding, rotary tables, final norm are small);
the layers outside this stage's slice become pass-throughs and are freed, the first layer of a
stage takes its input hidden states from the previous stage, and the last one hands its output to
the next stage. Every tensor-parallel rank holds the full hidden state after its row-parallel
all-reduce, so stage s tp-rank t talks to stage s+1 tp-rank t only. One step flows through the
stages in turn (no micro-batching): the point is to fit a model over nodes with slow links between
them, with the TP all-reduces kept inside a node.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def stage_layers(num_layers: int, pp_size: int, stage: int) -> range:
    """The layers of `stage`: as even a split as possible, the earlier stages taking the extra ones."""
    if num_layers < pp_size:
        raise ValueError(f"--pipeline-parallel-size {pp_size} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp_size)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


class _PassThrough(nn.Module):
    """A layer another stage runs: its input goes on unchanged (it is replaced at the next stage's entry)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class _FromPreviousStage(nn.Module):
    def __init__(self, layer: nn.Module, src: int) -> None:
        super().__init__()
        self.layer = layer
        self.src = src

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        received = torch.empty_like(hidden_states)
        dist.recv(received, src=self.src)
        return self.layer(received, *args, **kwargs)


class _ToNextStage(nn.Module):
    def __init__(self, layer: nn.Module, dst: int) -> None:
        super().__init__()
        self.layer = layer
        self.dst = dst

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.layer(hidden_states, *args, **kwargs)
        dist.send(out.contiguous(), dst=self.dst)
        return out


def split_model(model: nn.Module, stage: int, pp_size: int, tp_size: int, rank: int) -> range:
    """Keep this stage's layers of `model` (in place); returns their indices.

    Global rank = stage * tp_size + tp_rank, so the peer in the previous/next stage is rank -/+ tp_size.
    """
    top: Any = model  # a transformers model: typed by what nn.Module knows, which has no get_decoder
    base = top.get_decoder() if hasattr(top, "get_decoder") else top.model
    layers: nn.ModuleList = base.layers
    mine = stage_layers(len(layers), pp_size, stage)
    if pp_size == 1:
        return mine
    for i in range(len(layers)):
        if i not in mine:
            layers[i] = _PassThrough()
    if stage > 0:
        layers[mine.start] = _FromPreviousStage(layers[mine.start], rank - tp_size)
    if stage < pp_size - 1:
        layers[mine.stop - 1] = _ToNextStage(layers[mine.stop - 1], rank + tp_size)
    return mine
