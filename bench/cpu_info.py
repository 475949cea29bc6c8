"""The CPU facts a bench table is read against: model, the flags that choose kernels, the Linear choices.

Why in the header: the same code picks other kernels on an AVX2-only and an AVX-512 machine (oneDNN
packs bfloat16 only with AVX-512; gemm.c builds for either), so figures mean little without them.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """(model name, the KERNEL_FLAGS present) from /proc/cpuinfo's text."""
    model, flags = "unknown CPU", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, [f for f in KERNEL_FLAGS if f in flags]


def linear_shapes(config: dict) -> set[tuple[int, int]]:
    """(out_features, in_features) of every Linear a Llama/Qwen-style decoder of this config.json runs:
    q/k/v and gate/up fused (as the packed decoder runs them) and apart, o, down and the LM head."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    return {(q + 2 * kv, hidden), (q, hidden), (kv, hidden), (hidden, q), (2 * inter, hidden), (inter, hidden),
            (hidden, inter), (config["vocab_size"], hidden)}


def _shape(key: str) -> tuple[int, int] | None:
    """(out, in) from a cache key's 'OUTxIN' field (kernels/linear_choice.cache_key)."""
    for field in key.split("|"):
        out, x, inp = field.partition("x")
        if x and out.isdigit() and inp.isdigit():
            return int(out), int(inp)
    return None


def linear_summary(entries: dict[str, dict], shapes: set[tuple[int, int]] | None = None, prefix: str = "") -> str:
    """'kernel 3, onednn 2' from the Linear choice cache (kernels/linear_choice.py): the entries whose key
    starts with `prefix` (this CPU, kernel build and torch) and, given `shapes`, only those shapes. The
    cache holds every shape any model measured on this machine (the tests' tiny ones too): counting
    them all would describe other models' choices, not the benchmarked one's."""
    chosen: dict[str, list[str]] = collections.defaultdict(list)
    for key, entry in entries.items():
        shape = _shape(key)
        if key.startswith(prefix) and (shapes is None or shape in shapes):
            chosen[entry.get("choice", "?")].append("x".join(map(str, shape)) if shape else "?")
    if shapes is None:
        return ", ".join(f"{name} {len(v)}" for name, v in sorted(chosen.items())) or "none measured"
    return ", ".join(f"{name} {len(v)} ({' '.join(sorted(v))})" for name, v in sorted(chosen.items())) or "none measured"


def cpu_facts(cpuinfo: Path = Path("/proc/cpuinfo"), model_dir: str | None = None, dtype: str = "float32") -> dict:
    """The header's facts. With `model_dir`, the Linear summary counts that model's shapes as measured
    on this CPU and kernel build in `dtype`: call it after the Bowline server has started (and measured)."""
    import torch
    from bowline_runtime.kernels import cpu as kernels
    from bowline_runtime.kernels import linear_choice

    try:
        model, flags = parse_cpuinfo(cpuinfo.read_text(errors="replace"))
    except OSError:
        model, flags = "unknown CPU", []
    cached = linear_choice.load_cache(kernels.cache_dir() / "linear_choice.json")
    shapes, prefix = None, ""
    if model_dir is not None:
        try:
            shapes = linear_shapes(json.loads((Path(model_dir) / "config.json").read_text()))
        except (OSError, ValueError, KeyError):
            shapes = None
        prefix = linear_choice.cache_prefix(kernels.speed_signature(), getattr(torch, dtype))
    # The decoder layers' products take our kernel by rule, unmeasured, wherever it builds (devices.cpu's
    # LinearChooser: the one-call layer loop needs them), so the cache has no entries for them.
    layer_rule = kernels.gemm_available() and linear_choice.forced_choice(["kernel", "onednn", "torch"]) is None
    return {"model": model, "flags": flags, "linear": linear_summary(cached, shapes, prefix),
            "layer_products": "kernel" if layer_rule else None}


def header_line(cpu: dict) -> str:
    layers = f"; the layers' products: {cpu['layer_products']} (by rule)" if cpu.get("layer_products") else ""
    return (f"CPU {cpu['model']}; kernel flags {' '.join(cpu['flags']) or 'none'}; "
            f"Linear shapes served by {cpu['linear']}{layers}.")
