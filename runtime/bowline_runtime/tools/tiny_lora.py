"""Write a random LoRA adapter in PEFT's format for a model folder (tests and benchmarks).

PEFT starts B at zero, so a freshly initialised adapter changes nothing; here both A and B are
seeded random, large enough that greedy output visibly differs from the base model's. The files are
what `PeftModel.save_pretrained` writes: `adapter_config.json` and `adapter_model.safetensors` with
keys `base_model.model.<module>.lora_A.weight` / `lora_B.weight`.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_lora_adapter(
    model_dir: str | Path, out_dir: str | Path, rank: int = 8, alpha: float = 16.0,
    targets: tuple[str, ...] | list[str] | str = DEFAULT_TARGETS, seed: int = 0, use_rslora: bool = False,
    std: float = 0.2,
) -> Path:
    """Write the adapter to `out_dir` and return it. `targets`: module names, or a PEFT regex string."""
    import re

    import torch
    from safetensors.torch import save_file

    from bowline_runtime.lora.adapter import ModelShapes
    from bowline_runtime.models.loader import load_config

    shapes = ModelShapes.from_config(load_config(str(model_dir), False))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(shapes.num_layers):
        for module, block in _BLOCK.items():
            name = f"model.layers.{layer}.{block}.{module}"
            chosen = re.fullmatch(targets, name) if isinstance(targets, str) else module in targets
            if not chosen:
                continue
            in_features, out_features = shapes.sizes[module]
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * std
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
