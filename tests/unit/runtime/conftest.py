"""Fixtures for the runtime's unit tests: the C kernels built for this CPU and for AVX2 + FMA only."""

from __future__ import annotations

import platform
from collections.abc import Iterator

import pytest
from bowline_runtime.kernels import cpu as kernels


def _cpu_runs_avx2() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return {"avx2", "fma"} <= set(flags)


@pytest.fixture(params=["native", "avx2"])
def kernel_isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The kernels as this CPU builds them, then as a CPU without AVX-512 does (BOWLINE_CPU_KERNEL_ISA=avx2):
    the same suite checks both code paths of gemm.c and the compiler-vectorised loops on one machine."""
    if request.param == "avx2" and not _cpu_runs_avx2():
        pytest.skip("an AVX2 + FMA build needs an x86-64 CPU with AVX2 and FMA")
    monkeypatch.setenv(kernels.ISA_ENV, request.param)
    kernels.load.cache_clear()
    yield request.param
    monkeypatch.delenv(kernels.ISA_ENV)
    kernels.load.cache_clear()
