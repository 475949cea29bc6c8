"""Load a Hugging Face causal LM (or random weights from its config) onto a device, ready for paged attention."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from bowline_runtime.models import attention, quant_loader
from bowline_runtime.models import quantization as quantization_formats

logger = logging.getLogger("bowline.models")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(requested: str, hf_config, device) -> torch.dtype:
    """`auto`: the checkpoint's dtype when the device supports it (float32 on CPU, where it is fastest)."""
    if requested != "auto":
        dtype = _DTYPES[requested]
    elif device.type == "cpu":
        dtype = torch.float32
    else:
        config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(config_dtype, str):
            config_dtype = _DTYPES.get(config_dtype)
        dtype = config_dtype if config_dtype in _DTYPES.values() else device.default_dtype()
        if dtype == torch.float32:
            dtype = device.default_dtype()
    if dtype not in device.supported_dtypes():
        raise ValueError(f"--dtype {requested} resolves to {dtype}, which the {device.type} device does not support")
    return dtype


def resolve_kv_cache_dtype(requested: str, model_dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype (vLLM's values): auto is the model's dtype; float16 or bfloat16 by name."""
    if requested == "auto":
        return model_dtype
    if requested not in ("float16", "bfloat16"):
        raise ValueError(f"--kv-cache-dtype {requested!r} is not supported; choose auto, float16 or bfloat16")
    return _DTYPES[requested]


def load_config(model_path: str, trust_remote_code: bool):
    from transformers import AutoConfig

    if not Path(model_path).exists() and not model_path.count("/") == 1:
        raise ValueError(f"--model {model_path!r}: no such folder")
    return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def load_model(
    model_path: str, hf_config, dtype: torch.dtype, load_format: str, trust_remote_code: bool, seed: int = 0,
    quantization: str = "auto",
) -> nn.Module:
    """Build the model with `attn_implementation="bowline"`; `dummy` draws random weights from the config.

    `quantization` (models.quantization.resolve): `auto` follows config.json's quantization_config; an
    AWQ or compressed-tensors checkpoint is read by models.quant_loader, `int8` quantizes the float
    model's decoder layers once loaded. A vision-language model (models.vision) loads as a whole;
    paged attention serves its language model."""
    from bowline_runtime.models import vision

    attention.register()
    auto_class, attn_implementation = vision.model_class_and_attention(hf_config, attention.ATTN_IMPLEMENTATION)
    quant = quantization_formats.resolve(quantization, hf_config)
    if quant is not None and quant.method != "int8":
        if load_format == "dummy":
            raise ValueError(f"--load-format dummy cannot draw {quant.method} weights; use --quantization int8 "
                             "or a checkpoint")
        model = quant_loader.load_quantized(model_path, hf_config, dtype, quant, trust_remote_code,
                                            attention.ATTN_IMPLEMENTATION)
        logger.info("quantization %s: %s", quant.method, _describe(quant))
        return model.eval().requires_grad_(False)
    if load_format == "dummy":
        with torch.device("cpu"):
            model = auto_class.from_config(
                hf_config, dtype=dtype, attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        _init_dummy(model, seed=seed)
    elif load_format == "auto":
        model = auto_class.from_pretrained(
            model_path, config=hf_config, dtype=dtype, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    else:
        raise ValueError(f"--load-format {load_format!r}: choose auto or dummy")
    if quant is not None:
        layers = quant_loader.quantize_model_int8(model)
        logger.info("quantization int8: %d decoder Linear layers quantized at load (weight-only, per channel)", layers)
    model.eval().requires_grad_(False)
    return model


def _describe(quant) -> str:
    if quant.method == "awq":
        return f"4-bit AWQ, group size {quant.group_size}"
    return "int8 weights per channel, " + ("int8 activations per token" if quant.act_quant else "float activations")


def _init_dummy(model: nn.Module, seed: int) -> None:
    """Seeded small-normal weights, unit norms: the arithmetic of a real checkpoint without the download."""
    gen = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    for name, param in model.named_parameters():
        if param.dim() == 1 and "norm" in name:
            param.data.fill_(1.0)
        elif param.dim() == 1:
            param.data.zero_()
        else:
            param.data.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def max_position_limit(hf_config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(hf_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_tokenizer(path: str, trust_remote_code: bool, mode: str = "auto"):
    """`mode` "slow" asks for the Python tokenizer (vLLM's --tokenizer-mode slow, which LLaMA-based
    Chinese-Alpaca-2 models need); a model that ships only a fast tokenizer keeps it, with a log line."""
    from transformers import AutoTokenizer

    if mode != "slow":
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, use_fast=False)
    if getattr(tokenizer, "is_fast", False):
        logger.info("--tokenizer-mode slow: %s ships no slow (Python) tokenizer; using its fast one", path)
    else:
        logger.info("--tokenizer-mode slow: using the slow tokenizer %s", type(tokenizer).__name__)
    return tokenizer


def eos_token_ids(model_path: str, hf_config, tokenizer) -> set[int]:
    """Every id that ends generation: generation_config's, the config's and the tokenizer's EOS."""
    ids: set[int] = set()
    for source in (_generation_config_eos(model_path), getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(i for i in source if isinstance(i, int))
    return ids


def _generation_config_eos(model_path: str):
    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return None
