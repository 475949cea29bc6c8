"""The CPU facts a bench table is read against: model, the flags that choose kernels, the Linear choices.

Why in the header: the same code picks other kernels on an AVX2-only and an AVX-512 machine (oneDNN
packs bfloat16 only with AVX-512; gemm.c builds for either), so figures mean little without them.
"""

from __future__ import annotations

import collections
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


def linear_summary(entries: dict[str, dict]) -> str:
    """'kernel 3, onednn 2, torch 5' from the Linear choice cache (kernels/linear_choice.py)."""
    counts = collections.Counter(entry.get("choice", "?") for entry in entries.values())
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "none measured"


def cpu_facts(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    from bowline_runtime.kernels import cpu as kernels
    from bowline_runtime.kernels import linear_choice

    try:
        model, flags = parse_cpuinfo(cpuinfo.read_text(errors="replace"))
    except OSError:
        model, flags = "unknown CPU", []
    cached = linear_choice.load_cache(kernels.cache_dir() / "linear_choice.json")
    return {"model": model, "flags": flags, "linear": linear_summary(cached)}


def header_line(cpu: dict) -> str:
    return f"CPU {cpu['model']}; kernel flags {' '.join(cpu['flags']) or 'none'}; Linear shapes served by {cpu['linear']}."
