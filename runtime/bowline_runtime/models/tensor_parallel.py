"""Tensor parallelism over transformers models, driven by the model's own `base_model_tp_plan`.

transformers declares, per architecture, which projections split by output columns ("colwise": q/k/v,
gate/up) and which by input rows ("rowwise": o_proj, down_proj). We shard those weights in place;
a rowwise layer's partial products are summed across ranks with one all-reduce. Attention heads
follow automatically: transformers reshapes projections with `-1` heads. Quantized layers
(models.quant_linear) shard on the same plan with their own `shard_columns`/`shard_rows`, which
refuse a size that would cut an AWQ group or a packed int32 word.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from bowline_runtime.models.quant_linear import QuantLinear


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b: the bias is added once, after the sum.

    The local product is a plain nn.Linear (`inner`), so device layers can swap in faster kernels.
    """

    def __init__(self, linear: nn.Module, rank: int, world_size: int, name: str = "", group=None) -> None:
        super().__init__()
        self.group = group  # the tensor-parallel ranks of this pipeline stage (None: all ranks)
        if isinstance(linear, QuantLinear):  # quantized: the layer cuts its own rows (whole groups only)
            self.inner = linear.shard_rows(rank, world_size, name)
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(), False)
            return
        in_features = linear.in_features
        if in_features % world_size:
            raise ValueError(f"{in_features} input features do not split over tensor-parallel size {world_size}")
        shard = in_features // world_size
        self.inner = nn.Linear(shard, linear.out_features, bias=False, device=linear.weight.device,
                               dtype=linear.weight.dtype)
        self.inner.weight.data.copy_(linear.weight.data[:, rank * shard : (rank + 1) * shard])
        self.inner.requires_grad_(False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        dist.all_reduce(y, group=self.group)
        if self.bias is not None:
            y = y + self.bias
        return y


def _colwise(linear: nn.Linear, rank: int, world_size: int) -> nn.Linear:
    out_features = linear.out_features
    if out_features % world_size:
        raise ValueError(f"{out_features} output features do not split over tensor-parallel size {world_size}")
    shard = out_features // world_size
    new = nn.Linear(linear.in_features, shard, bias=linear.bias is not None, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    new.weight.data.copy_(linear.weight.data[rank * shard : (rank + 1) * shard])
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data[rank * shard : (rank + 1) * shard])
    new.requires_grad_(False)
    return new


def _pattern(plan_key: str) -> re.Pattern:
    return re.compile("^" + re.escape(plan_key).replace(r"\*", r"\d+") + "$")


def check_divisible(
    config, world_size: int, flag: str = "--tensor-parallel-size", subject: str = "the model's", advice: str = ""
) -> int:
    """Refuse a tensor-parallel size the model's heads cannot be split by, before loading anything;
    returns the model's key/value heads. `flag`, `subject` and `advice` word the refusal (the draft
    model of speculative decoding is checked against its own flag)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % world_size or kv_heads % world_size:
        raise ValueError(
            f"{flag} {world_size} must divide {subject} {heads} attention heads and {kv_heads} key/value heads"
            + advice
        )
    return kv_heads


def shard_model(model: nn.Module, rank: int, world_size: int, group=None) -> None:
    """Replace the planned Linear layers of `model` by this rank's shards, in place.

    `rank` and `world_size` are within the tensor-parallel group `group` (None: the whole world).
    """
    if world_size == 1:
        return
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    plan = getattr(base.config, "base_model_tp_plan", None) or getattr(model.config, "base_model_tp_plan", None)
    if not plan:
        raise ValueError(f"{type(model).__name__} declares no tensor-parallel plan; use --tensor-parallel-size 1")
    rules = [(_pattern(k), v) for k, v in plan.items()]
    prefix = "model." if getattr(model, "model", None) is base else ""
    for name, module in list(base.named_modules()):
        if not isinstance(module, (nn.Linear, QuantLinear)):
            continue
        style = next((style for pattern, style in rules if pattern.match(name)), None)
        if style is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name)
        if style.startswith("colwise") or style == "local_colwise":
            if isinstance(module, QuantLinear):
                setattr(parent, child, module.shard_columns(rank, world_size, prefix + name))
            else:
                setattr(parent, child, _colwise(module, rank, world_size))
        elif style.startswith("rowwise") or style == "local_rowwise":
            setattr(parent, child, RowParallelLinear(module, rank, world_size, prefix + name, group))
        else:
            raise ValueError(f"unsupported tensor-parallel style {style!r} for {name}")
