"""Quantized weight formats: which method a model is served with, and the arithmetic of each format.

Three methods, by vLLM's names:

- `awq`: AutoAWQ / Hugging Face AWQ checkpoints as they are written (`quant_method: awq`, `bits: 4`,
  `version: gemm`). Per Linear `qweight` int32 [in, out/8], `qzeros` int32 [in/group, out/8] and
  `scales` float16 [in/group, out]; eight 4-bit values per int32, column 8c+j of a word in nibble
  AWQ_REVERSE_ORDER[j] (AutoAWQ packs columns 0, 2, 4, 6, 1, 3, 5, 7 into nibbles 0..7). The weight
  is (q - z) * s.
- `w8a8` (also `smoothquant`, `compressed-tensors`): the compressed-tensors int8 layout llm-compressor
  writes (`quant_method: compressed-tensors`, `format: int-quantized`): `weight` int8 [out, in] and
  `weight_scale` [out, 1] (per output channel); activations quantized per token at run time
  (symmetric int8, scale max|x| / 127).
- `int8`: weight-only int8 made at load time from a float checkpoint (per output channel, symmetric,
  no calibration).

The pure functions here (pack, unpack, quantize, validate) are shared by the loader, the tiny-model
builder and the tests' expectations; the layers that compute with them are in models.quant_linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_PACK_ORDER[i] of its 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of a word is in nibble AWQ_REVERSE_ORDER[j]
PACK = 8  # 4-bit values per int32

METHODS = ("auto", "awq", "w8a8", "smoothquant", "compressed-tensors", "int8", "none")
_ALIASES = {"smoothquant": "w8a8", "compressed-tensors": "w8a8"}


class QuantizationError(ValueError):
    """A checkpoint or flag that cannot be served as asked; the message names the tensor or field."""


@dataclass(frozen=True, slots=True)
class QuantConfig:
    """How the model's Linear layers are stored and computed."""

    method: str  # awq | w8a8 | int8
    group_size: int = 0  # awq: input rows per scale/zero group (-1 in the config: the whole row)
    act_quant: bool = False  # w8a8: quantize activations per token at run time


def _checkpoint_config(hf_config) -> dict[str, Any] | None:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    return qc


def _awq_config(qc: dict[str, Any]) -> QuantConfig:
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise QuantizationError(f"awq checkpoint: quantization_config.bits is {bits}; only 4-bit AWQ is supported")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise QuantizationError(f"awq checkpoint: quantization_config.version {version!r}; only the gemm layout "
                                "is supported")
    if not qc.get("zero_point", True):
        raise QuantizationError("awq checkpoint: quantization_config.zero_point false is not supported")
    group_size = qc.get("group_size", qc.get("q_group_size", 128))
    if not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise QuantizationError(f"awq checkpoint: quantization_config.group_size {group_size!r} is not valid")
    return QuantConfig("awq", group_size=group_size)


def _compressed_tensors_config(qc: dict[str, Any]) -> QuantConfig:
    fmt = qc.get("format")
    if fmt not in ("int-quantized", "naive-quantized"):
        raise QuantizationError(f"compressed-tensors checkpoint: format {fmt!r}; only int-quantized (int8 "
                                "weights) is supported")
    groups = qc.get("config_groups") or {}
    act_quant = False
    for name, group in groups.items():
        weights = group.get("weights") or {}
        if weights.get("num_bits") != 8 or weights.get("type", "int") != "int":
            raise QuantizationError(f"compressed-tensors checkpoint: config_groups.{name}.weights is "
                                    f"{weights.get('num_bits')}-bit {weights.get('type')}; only int8 is supported")
        if weights.get("strategy", "channel") not in ("channel", "tensor") or not weights.get("symmetric", True):
            raise QuantizationError(f"compressed-tensors checkpoint: config_groups.{name}.weights must be symmetric "
                                    "per channel or per tensor")
        acts = group.get("input_activations")
        if acts:
            if acts.get("num_bits") != 8 or not acts.get("dynamic", False) or not acts.get("symmetric", True):
                raise QuantizationError(f"compressed-tensors checkpoint: config_groups.{name}.input_activations "
                                        "must be dynamic symmetric int8 (per token)")
            act_quant = True
    return QuantConfig("w8a8", act_quant=act_quant)


def checkpoint_method(hf_config) -> QuantConfig | None:
    """What the checkpoint's config.json says its weights are (None: float weights)."""
    qc = _checkpoint_config(hf_config)
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        return _awq_config(qc)
    if method == "compressed-tensors":
        return _compressed_tensors_config(qc)
    raise QuantizationError(f"the checkpoint's quantization_config.quant_method {method!r} is not supported "
                            "(supported: awq, compressed-tensors int8)")


def resolve(requested: str, hf_config) -> QuantConfig | None:
    """The method to serve with: `auto` follows config.json; an explicit method must match the checkpoint."""
    if requested not in METHODS:
        raise QuantizationError(f"--quantization {requested!r}: choose one of {list(METHODS)}")
    method = _ALIASES.get(requested, requested)
    found = checkpoint_method(hf_config)
    if method == "auto":
        return found
    if method == "none":
        if found is not None:
            raise QuantizationError(f"--quantization none: the checkpoint is quantized ({found.method})")
        return None
    if method == "int8":
        if found is not None:
            raise QuantizationError(f"--quantization int8 quantizes a float checkpoint at load time; this one is "
                                    f"already {found.method}")
        return QuantConfig("int8")
    if found is None or found.method != method:
        what = "float weights" if found is None else f"a {found.method} checkpoint"
        raise QuantizationError(f"--quantization {requested} needs a {method} checkpoint (config.json "
                                f"quantization_config), but the model has {what}")
    return found


# ---------------------------------------------------------------- AWQ packing


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """int values 0..15 [rows, cols] -> int32 [rows, cols/8] in AWQ's interleaved order."""
    rows, cols = values.shape
    if cols % PACK:
        raise ValueError(f"{cols} columns do not pack 8 to an int32")
    v = values.to(torch.int64).view(rows, cols // PACK, PACK)
    packed = torch.zeros(rows, cols // PACK, dtype=torch.int64)
    for nibble, column in enumerate(AWQ_PACK_ORDER):
        packed |= (v[:, :, column] & 0xF) << (4 * nibble)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] -> int values 0..15 [rows, cols] (uint8), undoing AWQ's interleave."""
    shifts = torch.tensor([4 * n for n in AWQ_REVERSE_ORDER], dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # [rows, cols/8, 8], column order
    return nibbles.reshape(packed.shape[0], -1).to(torch.uint8)


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [out, in] (a Linear's orientation) of one AWQ layer: (q - z) * s."""
    q = unpack_awq(qweight).to(dtype)  # [in, out]
    z = unpack_awq(qzeros).to(dtype).repeat_interleave(group_size, dim=0)
    s = scales.to(dtype).repeat_interleave(group_size, dim=0)
    return ((q - z) * s).t().contiguous()


def quantize_awq(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per-group round-to-nearest of a float weight [out, in], as AutoAWQ stores it:
    (qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales float16 [in/g, out])."""
    out_features, in_features = weight.shape
    w = weight.detach().float().t().reshape(in_features // group_size, group_size, out_features)
    lo, hi = w.amin(dim=1), w.amax(dim=1)  # [groups, out]
    scales = ((hi - lo).clamp(min=1e-8) / 15).half()
    s = scales.float()
    zeros = (-lo / s).round().clamp(0, 15)
    q = (w / s.unsqueeze(1) + zeros.unsqueeze(1)).round().clamp(0, 15).reshape(in_features, out_features)
    return pack_awq(q.to(torch.int32)), pack_awq(zeros.to(torch.int32)), scales


# ---------------------------------------------------------------- int8


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of a float weight [out, in]: (int8 [out, in], float32 scale [out])."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = (w / scale.unsqueeze(1)).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic symmetric int8, returned dequantized (x_q * s_x, same dtype): what W8A8's integer
    product sees, so y = (x_q @ w_q^T) * s_x * s_w equals F.linear(this, w_q) * s_w."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-12)
    return (x / scale).round().clamp(-128, 127) * scale
