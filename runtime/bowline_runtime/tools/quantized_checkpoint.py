"""Rewrite a float model folder as a quantized checkpoint, in the layouts AutoAWQ and llm-compressor write.

So tests and benchmarks need no hub: the tiny-model builder quantizes its own random weights
(round-to-nearest, no calibration: the arithmetic of the format is what is under test, not the
quality of the quantization). Every decoder-layer projection is quantized; embeddings, norms and the
LM head stay float, as both tools leave them by default.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from bowline_runtime.models.quantization import quantize_awq, quantize_int8

_PROJECTION = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def awq_config(group_size: int) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None}


def w8a8_config() -> dict:
    """compressed-tensors' int8 W8A8 scheme: per-channel int8 weights, dynamic per-token int8 inputs."""
    return {
        "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                  "dynamic": True},
        }},
        "ignore": ["lm_head"],
    }


def default_group_size(hidden_size: int, intermediate_size: int) -> int:
    """128 (AutoAWQ's default) where every projection's input splits into two ranks of whole groups."""
    return 128 if hidden_size % 256 == 0 and intermediate_size % 256 == 0 else 32


def quantize_checkpoint(folder: str | Path, method: str, group_size: int | None = None) -> None:
    """Quantize the folder's model.safetensors in place and record quantization_config in config.json."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    weights_path = folder / "model.safetensors"
    tensors = load_file(str(weights_path))
    out: dict[str, torch.Tensor] = {}
    group = group_size or default_group_size(config["hidden_size"], config["intermediate_size"])
    if method == "awq":
        config["quantization_config"] = awq_config(group)
    elif method == "w8a8":
        config["quantization_config"] = w8a8_config()
    else:
        raise ValueError(f"unknown quantization {method!r}: choose awq or w8a8")
    for name, tensor in tensors.items():
        if not _PROJECTION.match(name):
            # AutoAWQ saves the layers it leaves unquantized (embeddings, norms, LM head) in float16
            out[name] = tensor.half() if method == "awq" and tensor.is_floating_point() else tensor
            continue
        prefix = name.removesuffix(".weight")
        if method == "awq":
            qweight, qzeros, scales = quantize_awq(tensor, group)
            out.update({f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros, f"{prefix}.scales": scales})
        else:
            q, scale = quantize_int8(tensor)
            out.update({f"{prefix}.weight": q, f"{prefix}.weight_scale": scale.unsqueeze(1)})
    save_file({k: v.contiguous() for k, v in out.items()}, str(weights_path), metadata={"format": "pt"})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
