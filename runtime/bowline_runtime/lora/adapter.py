"""Read a PEFT LoRA adapter folder and check it against the base model before it serves anything.

PEFT saves `adapter_config.json` (r, lora_alpha, target_modules, use_rslora, ...) and
`adapter_model.safetensors` whose keys are the base model's module names under `base_model.model.`,
e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]). PEFT adds `B(A(x)) * scaling` to the projection's output, scaling = alpha / r
(alpha / sqrt(r) with rsLoRA); the scaling is folded into B here, so serving adds `(x A^T) B^T`.

Every refusal is a LoRAError naming what is wrong (file, module, rank or shape): the server turns
it into a start-up error or an HTTP 400, and keeps serving.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bowline_runtime.engine.errors import RequestRejected

# The projections a Llama-family decoder layer has, by the block they sit in.
SUPPORTED_MODULES = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)(?:\.[\w-]+)?\.weight$")


class LoRAError(RequestRejected):
    """An adapter that cannot be served; the message says why. A client error when loaded at run time."""

    def __init__(self, message: str, param: str | None = "lora_path") -> None:
        super().__init__(message, param)


@dataclass(frozen=True, slots=True)
class ModelShapes:
    """The base model's projection sizes: (in_features, out_features) of each supported module."""

    num_layers: int
    sizes: dict[str, tuple[int, int]]

    @classmethod
    def from_config(cls, hf_config) -> ModelShapes:
        hidden = hf_config.hidden_size
        heads = hf_config.num_attention_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        head = getattr(hf_config, "head_dim", None) or hidden // heads
        inter = hf_config.intermediate_size
        return cls(hf_config.num_hidden_layers, {
            "q_proj": (hidden, heads * head), "k_proj": (hidden, kv_heads * head), "v_proj": (hidden, kv_heads * head),
            "o_proj": (heads * head, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        })


@dataclass(slots=True)
class LoRAAdapter:
    """One adapter's weights on the CPU: (layer, module) -> (A [r, in], B [out, r] with scaling folded in)."""

    rank: int  # the largest r over its modules
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def modules(self) -> set[str]:
        return {module for _, module in self.weights}


def _model_module_names(shapes: ModelShapes) -> list[str]:
    names = ["model.embed_tokens", "lm_head"]
    for i in range(shapes.num_layers):
        names += [f"model.layers.{i}.{block}.{module}" for module, block in SUPPORTED_MODULES.items()]
    return names


def _targeted(target_modules, shapes: ModelShapes) -> list[str]:
    """The module names PEFT would adapt: a regex matches the whole name, a list matches name suffixes."""
    names = _model_module_names(shapes)
    if target_modules is None:
        return []
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return [n for n in names if n.rsplit(".", 1)[-1] in SUPPORTED_MODULES]
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise LoRAError(f"target_modules {target_modules!r} is not a valid regular expression ({exc})") from None
        return [n for n in names if pattern.fullmatch(n)]
    wanted = [str(t) for t in target_modules]
    unknown = sorted(t for t in wanted if t not in SUPPORTED_MODULES)
    if unknown:
        raise LoRAError(
            f"the adapter targets {unknown}, which this server cannot adapt; supported: {sorted(SUPPORTED_MODULES)}"
        )
    return [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]


def _pattern_value(patterns: dict, module_name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the end of the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module_name):
            return float(value)
    return default


def read_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise LoRAError(f"LoRA adapter folder {str(path)!r} does not exist")
    if not config_path.is_file():
        raise LoRAError(f"{CONFIG_FILE} not found in {str(path)!r}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoRAError(f"cannot read {CONFIG_FILE} in {str(path)!r}: {exc}") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{CONFIG_FILE} in {str(path)!r} is not a JSON object")
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHTS_FILES:
        file = path / name
        if file.is_file():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    return load_file(str(file))
                return torch.load(str(file), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is the adapter's fault
                raise LoRAError(f"cannot read {name} in {str(path)!r}: {exc}") from None
    raise LoRAError(f"{WEIGHTS_FILES[0]} not found in {str(path)!r}")


def _check_config(config: dict) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoRAError(f"the adapter is a {peft_type} adapter; only LoRA adapters are served")
    if config.get("use_dora"):
        raise LoRAError("the adapter uses DoRA (use_dora), which this server does not serve")
    if config.get("modules_to_save"):
        raise LoRAError(f"the adapter saves whole modules (modules_to_save: {config['modules_to_save']}), which this server does not serve")
    if config.get("bias", "none") not in (None, "none"):
        raise LoRAError(f"the adapter trains biases (bias: {config['bias']!r}); only bias \"none\" is served")
    if config.get("fan_in_fan_out"):
        raise LoRAError("fan_in_fan_out adapters (GPT-2 style Conv1D) are not served")


def load_adapter(path: str | Path, shapes: ModelShapes, max_rank: int) -> LoRAAdapter:
    """The adapter at `path`, checked against the base model; LoRAError saying what does not fit."""
    folder = Path(path)
    config = read_config(folder)
    _check_config(config)
    try:
        base_r = int(config.get("r", 8))
        base_alpha = float(config.get("lora_alpha", 8))
    except (TypeError, ValueError):
        raise LoRAError(f"{CONFIG_FILE}: r and lora_alpha must be numbers") from None
    rsl = bool(config.get("use_rslora", False))
    declared = set(_targeted(config.get("target_modules"), shapes))
    tensors = _read_tensors(folder)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise LoRAError(f"the adapter has weights for {key!r}, which this server cannot adapt (only q/k/v/o and gate/up/down projections)")
        layer, block, module, which = int(match.group(1)), match.group(2), match.group(3), match.group(4)
        if module not in SUPPORTED_MODULES or SUPPORTED_MODULES[module] != block:
            raise LoRAError(f"the adapter targets {block}.{module}, which this server cannot adapt; supported: {sorted(SUPPORTED_MODULES)}")
        if layer >= shapes.num_layers:
            raise LoRAError(f"the adapter has weights for layer {layer}, but the base model has {shapes.num_layers} layers")
        pairs.setdefault((layer, module), {})[which] = tensor
    if not pairs:
        raise LoRAError(f"the adapter in {str(path)!r} holds no LoRA weights")
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    for (layer, module), ab in sorted(pairs.items()):
        name = f"model.layers.{layer}.{SUPPORTED_MODULES[module]}.{module}"
        if "A" not in ab or "B" not in ab:
            raise LoRAError(f"{name}: the adapter has lora_{'A' if 'A' not in ab else 'B'} missing")
        if declared and name not in declared:
            raise LoRAError(f"{name} has weights but is not in the adapter's target_modules")
        a, b = ab["A"].float(), ab["B"].float()
        in_features, out_features = shapes.sizes[module]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape != (out_features, r):
            raise LoRAError(
                f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the base model's "
                f"{module} ({in_features} -> {out_features}, so A must be [r, {in_features}] and B [{out_features}, r])"
            )
        if r > max_rank:
            raise LoRAError(f"the adapter's rank {r} ({name}) exceeds --max-lora-rank {max_rank}")
        r_cfg = _pattern_value(config.get("rank_pattern") or {}, name, base_r)
        if int(r_cfg) != r:
            raise LoRAError(f"{name}: lora_A has rank {r}, but {CONFIG_FILE} says r={int(r_cfg)}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, base_alpha)
        scaling = alpha / math.sqrt(r) if rsl else alpha / r
        weights[(layer, module)] = (a.contiguous(), (b * scaling).contiguous())
        rank = max(rank, r)
    return LoRAAdapter(rank, weights)
