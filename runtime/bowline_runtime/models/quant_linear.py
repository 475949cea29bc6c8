"""Linear layers over quantized weights: each is one `y = layer(x)` unit, like nn.Linear.

The forward here is the portable torch path (dequantize this layer's weight, then one product):
what accelerators run. The CPU swaps these layers for fused dequantize-and-multiply kernels
(kernels.quant_cpu) and never runs this forward on the engine's hot path. Each layer also knows how
to be joined with its siblings (q/k/v, gate/up: `concat`) and split for tensor parallelism
(`shard_columns`, `shard_rows`), so the packed decoder and the sharding plan treat them as they
treat nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bowline_runtime.models.quantization import PACK, QuantizationError, dequantize_awq, quantize_activations


def _bias_or_none(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().clone()


class QuantLinear(nn.Module):
    """Common base: in_features, out_features and an optional float bias, as nn.Linear has them."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight [out, in] this layer computes with."""
        raise NotImplementedError

    def to_float_linear(self, dtype: torch.dtype) -> nn.Linear:
        """An nn.Linear with the dequantized weight (where no quantized kernel serves this layer)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                           device="meta")
        linear.weight = nn.Parameter(self.dequantized_weight(dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.to(dtype), requires_grad=False)
        return linear


class AwqLinear(QuantLinear):
    """4-bit AWQ weights (qweight, qzeros, scales as the checkpoint stores them) with an optional bias."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.shape[0], qweight.shape[1] * PACK
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_awq(self.qweight, self.qzeros, self.scales, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @classmethod
    def concat(cls, parts: list[AwqLinear]) -> AwqLinear | None:
        """One layer whose output is the parts' outputs side by side (None when their groups differ)."""
        if len({p.group_size for p in parts}) != 1 or len({p.in_features for p in parts}) != 1:
            return None
        bias = None
        if any(p.bias is not None for p in parts):
            bias = torch.cat([p.bias if p.bias is not None else p.scales.new_zeros(p.out_features) for p in parts])
        return cls(torch.cat([p.qweight for p in parts], 1), torch.cat([p.qzeros for p in parts], 1),
                   torch.cat([p.scales for p in parts], 1), parts[0].group_size, bias)

    def shard_columns(self, rank: int, world_size: int, name: str) -> AwqLinear:
        shard = self.out_features // world_size
        if self.out_features % world_size or shard % PACK:
            raise QuantizationError(f"--tensor-parallel-size {world_size} cannot split {name}: {self.out_features} "
                                    f"output columns per rank would not be whole int32 words of 8")
        words = slice(rank * shard // PACK, (rank + 1) * shard // PACK)
        cols = slice(rank * shard, (rank + 1) * shard)
        bias = None if self.bias is None else self.bias[cols].clone()
        return AwqLinear(self.qweight[:, words].clone(), self.qzeros[:, words].clone(), self.scales[:, cols].clone(),
                         self.group_size, bias)

    def shard_rows(self, rank: int, world_size: int, name: str) -> AwqLinear:
        """This rank's input rows, without the bias (the row-parallel sum adds it once)."""
        shard = self.in_features // world_size
        if self.in_features % world_size or shard % self.group_size:
            raise QuantizationError(
                f"--tensor-parallel-size {world_size} splits the quantization groups of {name}.qweight: "
                f"{self.in_features} input rows give {self.in_features / world_size:g} per rank, not a multiple "
                f"of group_size {self.group_size}")
        rows = slice(rank * shard, (rank + 1) * shard)
        groups = slice(rank * shard // self.group_size, (rank + 1) * shard // self.group_size)
        return AwqLinear(self.qweight[rows].clone(), self.qzeros[groups].clone(), self.scales[groups].clone(),
                         self.group_size)


class Int8Linear(QuantLinear):
    """int8 weights [out, in] with one float32 scale per output channel; `act_quant` quantizes each
    token's activations to int8 first (W8A8), else the activations stay float (weight-only)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 act_quant: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.act_quant = act_quant
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.reshape(-1).float().expand(self.out_features).contiguous())
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        from bowline_runtime.models.quantization import quantize_int8

        q, scale = quantize_int8(linear.weight)
        return cls(q, scale, _bias_or_none(linear.bias))

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale.unsqueeze(1)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant:
            x = quantize_activations(x)
        y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @classmethod
    def concat(cls, parts: list[Int8Linear]) -> Int8Linear | None:
        if len({p.act_quant for p in parts}) != 1 or len({p.in_features for p in parts}) != 1:
            return None
        bias = None
        if any(p.bias is not None for p in parts):
            bias = torch.cat([p.bias if p.bias is not None else p.weight_scale.new_zeros(p.out_features)
                              for p in parts])
        return cls(torch.cat([p.weight for p in parts]), torch.cat([p.weight_scale for p in parts]), bias,
                   parts[0].act_quant)

    def shard_columns(self, rank: int, world_size: int, name: str) -> Int8Linear:
        if self.out_features % world_size:
            raise QuantizationError(f"{name}: {self.out_features} output features do not split over "
                                    f"tensor-parallel size {world_size}")
        shard = self.out_features // world_size
        cols = slice(rank * shard, (rank + 1) * shard)
        bias = None if self.bias is None else self.bias[cols].clone()
        return Int8Linear(self.weight[cols].clone(), self.weight_scale[cols].clone(), bias, self.act_quant)

    def shard_rows(self, rank: int, world_size: int, name: str) -> Int8Linear:
        """This rank's input columns; per-channel scales are whole on every rank. W8A8's per-token scale
        is then taken over the rank's slice of the token (vLLM does the same with row-parallel int8)."""
        if self.in_features % world_size:
            raise QuantizationError(f"{name}: {self.in_features} input features do not split over "
                                    f"tensor-parallel size {world_size}")
        shard = self.in_features // world_size
        return Int8Linear(self.weight[:, rank * shard : (rank + 1) * shard].clone(), self.weight_scale.clone(),
                          None, self.act_quant)


class HalfLinear(QuantLinear):
    """A float16 weight [out, in] used by a float32 model: a quantized checkpoint's LM head as AutoAWQ
    saves it. Widening float16 to float32 is exact, so the product is the float32 model's; keeping the
    half-precision bytes halves what the decode step reads for this layer (on the bench model the LM head
    is two thirds of an AWQ step's weight bytes). Only the LM head, which tensor parallelism leaves whole,
    is made one: it has no shard methods."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.dtype != torch.float16 or weight.dim() != 2:
            raise ValueError(f"a float16 matrix is needed, not {weight.dtype} of {weight.dim()} dimensions")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", bias)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
