"""Which implementation serves each Linear shape on this CPU: chosen by a short measurement, not assumed.

Why measure: on an AVX2-only EPYC Zen 3 (1 thread, µs per call, torch F.linear / oneDNN-packed /
gemm.c as it was then) 3072x512 at 1 row was 225 / 268 / 177 but at 16 rows 1340 / 1051 / 2212, and
the head 16000x512 at 1 row 3359 / 3333 / 2726 but at 8 rows 9290 / 4857 / 5993: no one implementation
won every shape and row count, and the order differs again on AVX-512 machines and between versions of
each. gemm.c's AVX2 path has since been rebuilt (3 rows x 4 vectors, see gemm.c); an AVX2-only build
on an EPYC Zen 4 with oneDNN held to AVX2 (the proxy for Zen 3, same run, medians) now reads 3072x512
at 1 row 677 / 567 / 224 and at 16 rows 1847 / 1384 / 993, the head at 8 rows 7278 / 4586 / 2571 and
at 16 rows 9252 / 5411 / 4567. `choose` is the pure decision (timings in, name out); `measure` and the
JSON cache (keyed by CPU and kernel build, so a changed gemm.c is measured again) are the thin edge
around it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

LINEAR_ENV = "BOWLINE_CPU_LINEAR"
CHOICES = ("kernel", "onednn", "torch")
# A step's products have 1-16 rows while decoding; each row count's call time weighs the same. Weighting
# 1 row 4x (as first tried) picked gemm.c for the small shapes on an AVX2 EPYC, where it was then 1.7x
# faster than oneDNN at 1 row but 1.5x slower at 16: same run, bench model, 128 -> 128, that cost 10 % of
# output tok/s at c=16 (355 vs 395 with oneDNN forced) for 3 % at c=1 (73.2 vs 71.1).
ROW_WEIGHTS: Mapping[int, float] = {1: 1.0, 8: 1.0, 16: 1.0}
_REPEATS = 7
_TIME_BOX_S = 0.25  # per candidate and shape: bounded start-up on big models


def choose(timings: Mapping[str, Mapping[int, float]], row_weights: Mapping[int, float] = ROW_WEIGHTS) -> str:
    """The candidate with the least row-weighted time; ties go to the earlier name in CHOICES."""
    if not timings:
        raise ValueError("no candidate to choose from")

    def cost(name: str) -> float:
        return sum(weight * timings[name].get(rows, float("inf")) for rows, weight in row_weights.items())

    return min(sorted(timings, key=CHOICES.index), key=cost)


def forced_choice(available: list[str]) -> str | None:
    """BOWLINE_CPU_LINEAR=kernel|onednn|torch forces that implementation (where available); auto measures."""
    forced = os.environ.get(LINEAR_ENV, "auto").strip().lower()
    if forced in ("", "auto"):
        return None
    if forced not in CHOICES:
        raise ValueError(f"{LINEAR_ENV} must be auto, kernel, onednn or torch, not {forced!r}")
    return forced if forced in available else "torch"


def measure(fn: Callable[[torch.Tensor], torch.Tensor], in_features: int, dtype: torch.dtype) -> dict[int, float]:
    """Fastest µs per call of fn at each row count of ROW_WEIGHTS (a warm-up call first, time-boxed).

    The fastest, not the median: on a shared 2-core machine a 2-thread OpenMP call that loses a core
    waits a whole scheduler slice (medians of 5 read ~8,000 µs for a 100 µs product there), and other
    work only ever slows a call down, so the fastest call is the closest to the product's own cost.
    """
    result = {}
    with torch.inference_mode():
        for rows in ROW_WEIGHTS:
            x = torch.randn(rows, in_features).to(dtype)
            fn(x)
            samples: list[float] = []
            start = time.perf_counter()
            while len(samples) < _REPEATS and time.perf_counter() - start < _TIME_BOX_S:
                t0 = time.perf_counter()
                fn(x)
                samples.append((time.perf_counter() - t0) * 1e6)
            result[rows] = min(samples)
    return result


# Other processes may take at most this share of the machine's CPU time while a shape is measured. Beyond
# it the timings are the scheduler's, not the products': on a 2-core EPYC with a test run beside it every
# candidate of every shape read 6,000-8,000 µs (a lost time slice), the choice went by noise (plain torch
# for 3072x512), and, cached, it outlived the load: the decode step stayed 11.0 ms against 8.6 ms with
# the right choice.
BUSY_SHARE = 0.25


@dataclass(frozen=True, slots=True)
class CpuTicks:
    """Clock ticks from /proc: the whole machine's busy and total time, and this process's own."""

    busy: int
    total: int
    own: int


def cpu_ticks() -> CpuTicks | None:
    """Now's counters (None where /proc is not Linux's)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own_fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal ...: busy is everything but idle and iowait.
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    own = int(own_fields[11]) + int(own_fields[12])  # utime + stime, all threads
    return CpuTicks(busy=total - idle, total=total, own=own)


def others_share(start: CpuTicks | None, end: CpuTicks | None) -> float:
    """The share of the machine's CPU time that other processes (or a hypervisor's steal) took
    between two readings; 0.0 where it cannot be known."""
    if start is None or end is None or end.total <= start.total:
        return 0.0
    others = (end.busy - start.busy) - (end.own - start.own)
    return max(0.0, others / (end.total - start.total))


def fallback_choice(available: list[str]) -> str:
    """The choice when the machine is too busy to measure: the rule measured on quiet AVX-512 and AVX2
    machines at decode shapes (our kernel, where it builds, then oneDNN), never plain torch."""
    for name in CHOICES:
        if name in available:
            return name
    return "torch"


CACHE_VERSION = 2  # 2: entries measured under load are no longer written; older files may hold some


def cache_prefix(cpu_signature: str, dtype: torch.dtype) -> str:
    """What every key of one cache format, CPU (model and flags) and kernel build, torch version and
    dtype starts with (the bench header selects this machine's entries by it)."""
    cpu = hashlib.sha256(cpu_signature.encode()).hexdigest()[:12]
    return f"v{CACHE_VERSION}|{cpu}|torch {torch.__version__}|{dtype}|"


def cache_key(cpu_signature: str, dtype: torch.dtype, out_features: int, in_features: int, bias: bool) -> str:
    """One entry per cache format, CPU (model and flags) and kernel build, torch version, dtype and shape."""
    return f"{cache_prefix(cpu_signature, dtype)}{out_features}x{in_features}|bias={bias}"


def load_cache(path: Path) -> dict[str, dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_cache(path: Path, entries: dict[str, dict]) -> None:
    """Write beside and rename: concurrent starts never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
    os.replace(tmp, path)
