"""Quantized Linear layers on the CPU: weights packed once for kernels/quant_gemm.c, which dequantizes
them in registers while multiplying (never the whole weight back to floats on each step).

`swap_quantized` is what CpuDevice.optimize_model calls: each models.quant_linear layer becomes its
kernel layer where the C kernels build and activations are float32; elsewhere (no compiler,
BOWLINE_CPU_KERNELS=0, a half-precision model) it becomes a float nn.Linear dequantized once at load
(the same numbers, no speed gain), which the CPU's own Linear choice then packs like any other.
"""

from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn.functional as F
from torch import nn

from bowline_runtime.kernels import cpu as kernels
from bowline_runtime.models.quant_linear import AwqLinear, HalfLinear, Int8Linear, QuantLinear
from bowline_runtime.models.quantization import quantize_activations, unpack_awq

logger = logging.getLogger(__name__)

# The 4-bit kernel reads input rows in blocks of 8 (one 32-bit word a column): AWQ groups must be whole blocks.
ROWS_PER_BLOCK = 8


def _library() -> ctypes.CDLL:
    lib = kernels.load()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available")
    return lib


def _panel_width() -> int:
    return int(_library().bowline_quant_panel_width())


def _panels(columns_last: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, N] -> [ceil(N / width), rows, width], zero-padded past N: one panel per `width` columns."""
    rows, n = columns_last.shape
    padded = F.pad(columns_last, (0, -n % width))
    return padded.view(rows, -1, width).permute(1, 0, 2).contiguous()


def pack_int8(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [N, K] and scale [N] -> (panels [P, K, 16] int8, scale padded to P * 16 float32)."""
    width = _panel_width()
    packed = _panels(weight.t(), width)
    scale = F.pad(scale.float(), (0, -scale.numel() % width)).contiguous()
    return packed, scale


def pack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ tensors -> (nibble panels [P, K/8, 16, 4] uint8, scales [P, G, 16] float32, -zero * scale
    [P, G, 16] float32). Word j of block i (4 bytes) is column j's input rows 8i..8i+7: byte b holds row
    8i + b in its low nibble and row 8i + 4 + b in its high one, so one mask gives the bytes of rows 0-3
    and one shift and mask those of rows 4-7, four consecutive rows a column as vpdpbusd multiplies them."""
    width = _panel_width()
    q = _panels(unpack_awq(qweight), width)  # [P, K, 16] values 0..15
    halves = q.view(q.shape[0], -1, 2, 4, width)  # [P, K/8, low/high, byte, column]
    nibbles = (halves[:, :, 0] | (halves[:, :, 1] << 4)).to(torch.uint8).permute(0, 1, 3, 2).contiguous()
    s = scales.float()
    zs = -unpack_awq(qzeros).float() * s
    return nibbles, _panels(s, width), _panels(zs, width)


class Int8KernelLinear(kernels.KernelProduct, nn.Module):
    """Int8Linear through quant_gemm.c: int8 weights per output channel, W8A8 quantizing x per token first."""

    packed_weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, layer: Int8Linear) -> None:
        super().__init__()
        self.in_features, self.out_features, self.act_quant = layer.in_features, layer.out_features, layer.act_quant
        packed, scale = pack_int8(layer.weight, layer.weight_scale)
        self.register_buffer("packed_weight", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float().contiguous().clone())
        self._lib = _library()

    def _weight_pointers(self) -> tuple:
        return self.packed_weight.data_ptr(), self.scale.data_ptr(), kernels.pointer(self.bias)

    def c_linear(self) -> kernels.CLinear:
        weight, scale, bias = self.weight_pointers()
        return kernels.CLinear(kernels.LINEAR_W8A8 if self.act_quant else kernels.LINEAR_INT8, 0, weight, scale, None,
                               bias)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if self.act_quant and m:  # x rounded to int8 per token, in C (quantize_activations' arithmetic)
            rounded = torch.empty(m, self.in_features, dtype=torch.float32)
            self._lib.bowline_quantize_rows_f32(x.data_ptr(), x.stride(0), rounded.data_ptr(), m, self.in_features)
            x = rounded
        n = self.out_features
        out = torch.empty(m, n, dtype=torch.float32)
        if m:
            self._lib.bowline_q8_gemm_f32(
                x.data_ptr(), x.stride(0), *self.weight_pointers(), out.data_ptr(), n, m, n, self.in_features,
                torch.get_num_threads(),
            )
        return out


class AwqKernelLinear(kernels.KernelProduct, nn.Module):
    """AwqLinear through quant_gemm.c: 4-bit weights, one scale and zero per group of input rows."""

    packed_weight: torch.Tensor
    scales: torch.Tensor
    zero_scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, layer: AwqLinear) -> None:
        super().__init__()
        if layer.group_size % ROWS_PER_BLOCK:
            raise ValueError(f"the 4-bit kernel reads input rows in blocks of {ROWS_PER_BLOCK}; "
                             f"group size {layer.group_size} is not a multiple")
        self.in_features, self.out_features, self.group_size = layer.in_features, layer.out_features, layer.group_size
        nibbles, scales, zs = pack_awq(layer.qweight, layer.qzeros, layer.scales)
        self.register_buffer("packed_weight", nibbles)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_scales", zs)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float().contiguous().clone())
        self._lib = _library()

    def _weight_pointers(self) -> tuple:
        return (self.packed_weight.data_ptr(), self.scales.data_ptr(), self.zero_scales.data_ptr(),
                kernels.pointer(self.bias))

    def c_linear(self) -> kernels.CLinear:
        return kernels.CLinear(kernels.LINEAR_AWQ, self.group_size, *self.weight_pointers())

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        m, n = x.shape[0], self.out_features
        out = torch.empty(m, n, dtype=torch.float32)
        if m:
            self._lib.bowline_q4_gemm_f32(
                x.data_ptr(), x.stride(0), *self.weight_pointers(), out.data_ptr(), n, m, n, self.in_features,
                self.group_size, torch.get_num_threads(),
            )
        return out


class HalfKernelLinear(kernels.KernelProduct, nn.Module):
    """HalfLinear through quant_gemm.c: float16 weights widened in registers, float32 products."""

    packed_weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, layer: HalfLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("packed_weight", _panels(layer.weight.t(), _panel_width()))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float().contiguous().clone())
        self._lib = _library()

    def _weight_pointers(self) -> tuple:
        return self.packed_weight.data_ptr(), kernels.pointer(self.bias)

    def c_linear(self) -> kernels.CLinear:
        weight, bias = self.weight_pointers()
        return kernels.CLinear(kernels.LINEAR_F16, 0, weight, None, None, bias)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        m, n = x.shape[0], self.out_features
        out = torch.empty(m, n, dtype=torch.float32)
        if m:
            self._lib.bowline_f16_gemm_f32(x.data_ptr(), x.stride(0), *self.weight_pointers(), out.data_ptr(), n, m,
                                           n, self.in_features, torch.get_num_threads())
        return out


class ActQuantLinear(nn.Module):
    """A float Linear behind per-token int8 activation quantization: W8A8's numbers without its kernel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.inner = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(quantize_activations(x))


def kernel_layer(layer: QuantLinear, dtype: torch.dtype) -> nn.Module:
    """The CPU's layer for one quantized layer (see the module docstring for which)."""
    if dtype == torch.float32 and kernels.load() is not None:
        if isinstance(layer, AwqLinear) and layer.group_size % ROWS_PER_BLOCK == 0:
            return AwqKernelLinear(layer)
        if isinstance(layer, Int8Linear):
            return Int8KernelLinear(layer)
        if isinstance(layer, HalfLinear):
            return HalfKernelLinear(layer)
    linear = layer.to_float_linear(dtype)
    if isinstance(layer, Int8Linear) and layer.act_quant:
        return ActQuantLinear(linear)
    return linear


def swap_quantized(model: nn.Module) -> int:
    """Replace every quantized layer of `model` (row-parallel shards included) by its CPU layer, in place."""
    count, fallback, dtype = 0, False, _model_dtype(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, QuantLinear):
                replacement = kernel_layer(child, dtype)
                fallback = fallback or isinstance(replacement, (nn.Linear, ActQuantLinear))
                setattr(module, child_name, replacement)
                count += 1
    if fallback:
        logger.warning("quantized layers dequantized to float at load: the quantized CPU kernel needs float32 "
                       "and the C kernels (no speed gain from quantization)")
    return count


def _model_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32
