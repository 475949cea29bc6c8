"""Build a model whose Linear layers hold quantized weights: from an AWQ or compressed-tensors int8
checkpoint read as it is, or by quantizing a float model's layers to int8 at load time.

transformers would hand an AWQ checkpoint to the autoawq package (CUDA kernels, not installed here),
so the model is built from its config with float layers, the checkpoint's tensors are read with
safetensors, and each quantized Linear is replaced by its models.quant_linear layer. Every tensor is
checked against the layer it belongs to before anything runs: a bad checkpoint is refused at start-up
with the tensor's name, never served with garbage.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from bowline_runtime.models.quant_linear import AwqLinear, HalfLinear, Int8Linear
from bowline_runtime.models.quantization import PACK, QuantConfig, QuantizationError


def _float_config(hf_config):
    """A copy of the config without quantization_config, so transformers builds plain float layers."""
    config = copy.deepcopy(hf_config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def read_checkpoint(model_path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (sharded or not)."""
    from safetensors.torch import load_file

    folder = Path(model_path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise QuantizationError(f"--model {model_path}: no .safetensors files to read quantized weights from")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


def _take(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype | None = None,
          shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if name not in tensors:
        raise QuantizationError(f"the checkpoint has no tensor {name}")
    t = tensors.pop(name)
    if dtype is not None and t.dtype != dtype:
        raise QuantizationError(f"{name} is {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise QuantizationError(f"{name} has shape {list(t.shape)}, expected {list(shape)}")
    return t


def awq_layer(tensors: dict[str, torch.Tensor], name: str, linear: nn.Linear, group_size: int) -> AwqLinear:
    """The checked AWQ layer for `linear` (named `name`) from the checkpoint's tensors (popped)."""
    in_f, out_f = linear.in_features, linear.out_features
    group = in_f if group_size == -1 else group_size
    if in_f % group:
        raise QuantizationError(f"{name}.qweight: in_features {in_f} is not a multiple of the AWQ group_size "
                                f"{group}")
    if out_f % PACK:
        raise QuantizationError(f"{name}.qweight: out_features {out_f} do not pack 8 to an int32")
    qweight = _take(tensors, f"{name}.qweight", torch.int32, (in_f, out_f // PACK))
    qzeros = _take(tensors, f"{name}.qzeros", torch.int32, (in_f // group, out_f // PACK))
    scales = _take(tensors, f"{name}.scales", None, (in_f // group, out_f))
    if not scales.is_floating_point():
        raise QuantizationError(f"{name}.scales is {scales.dtype}, expected a float dtype")
    bias = tensors.pop(f"{name}.bias", None)
    return AwqLinear(qweight, qzeros, scales, group, bias)


def int8_layer(tensors: dict[str, torch.Tensor], name: str, linear: nn.Linear, act_quant: bool) -> Int8Linear:
    """The checked compressed-tensors int8 layer for `linear` from the checkpoint's tensors (popped)."""
    in_f, out_f = linear.in_features, linear.out_features
    weight = _take(tensors, f"{name}.weight", torch.int8, (out_f, in_f))
    scale = _take(tensors, f"{name}.weight_scale")
    if scale.numel() not in (1, out_f):
        raise QuantizationError(f"{name}.weight_scale has shape {list(scale.shape)}, expected [{out_f}, 1] or [1]")
    if f"{name}.input_scale" in tensors:
        raise QuantizationError(f"{name}.input_scale: static activation scales are not supported (only dynamic "
                                "per-token)")
    tensors.pop(f"{name}.weight_zero_point", None)  # symmetric: all zeros
    bias = tensors.pop(f"{name}.bias", None)
    return Int8Linear(weight, scale.float(), bias, act_quant=act_quant)


def _is_quantized(tensors: dict[str, torch.Tensor], name: str, method: str) -> bool:
    if method == "awq":
        return any(f"{name}.{part}" in tensors for part in ("qweight", "qzeros", "scales"))
    weight = tensors.get(f"{name}.weight")
    return f"{name}.weight_scale" in tensors or (weight is not None and weight.dtype == torch.int8)


def load_quantized(model_path: str, hf_config, dtype: torch.dtype, quant: QuantConfig, trust_remote_code: bool,
                   attn_implementation: str) -> nn.Module:
    """The model of a quantized checkpoint, its quantized Linear layers replaced, the rest in `dtype`."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    tensors = read_checkpoint(model_path)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(
            _float_config(hf_config), dtype=dtype, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or not _is_quantized(tensors, full, quant.method):
                continue
            layer: nn.Module
            if quant.method == "awq":
                layer = awq_layer(tensors, full, child, quant.group_size)
            else:
                layer = int8_layer(tensors, full, child, quant.act_quant)
            setattr(module, child_name, layer)
            replaced.append(full + ".")
    if not replaced:
        raise QuantizationError(f"--quantization {quant.method}: no quantized Linear weights in {model_path}")
    result = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                                   strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    quantized = tuple(replaced)  # their tensors were taken (and checked) above
    missing = [k for k in result.missing_keys if k not in tied and not k.startswith(quantized)]
    if missing:
        raise QuantizationError(f"the checkpoint has no tensor {missing[0]}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if result.unexpected_keys:
        raise QuantizationError(f"the checkpoint's tensor {result.unexpected_keys[0]} belongs to no layer of the "
                                "model (a quantized layer missing its qweight or weight_scale?)")
    if tied:
        model.tie_weights()
    else:
        _keep_half_lm_head(model, tensors, dtype)
    for module in model.modules():  # the checkpoint's biases, in the model's dtype
        if isinstance(module, (AwqLinear, Int8Linear)) and module.bias is not None:
            module.bias = module.bias.to(dtype)
    return model


def _keep_half_lm_head(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """A float16 LM head under a float32 model stays float16 (HalfLinear): the same numbers, half the bytes."""
    head, weight = getattr(model, "lm_head", None), tensors.get("lm_head.weight")
    if (dtype == torch.float32 and type(head) is nn.Linear and head.bias is None and weight is not None
            and weight.dtype == torch.float16 and tuple(weight.shape) == tuple(head.weight.shape)):
        model.lm_head = HalfLinear(weight)


def quantize_model_int8(model: nn.Module) -> int:
    """Replace every decoder-layer nn.Linear by its weight-only int8 version, in place; the LM head and the
    embeddings stay float (as AWQ and llm-compressor leave them). Returns how many layers changed."""
    get_decoder = getattr(model, "get_decoder", None)
    base = get_decoder() if callable(get_decoder) else model.get_submodule("model")
    count = 0
    for module in list(base.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, Int8Linear.from_linear(child))
                count += 1
    return count
