"""Loading the C kernels must not change how the rest of the process computes.

A shared library linked with -ffast-math carries gcc's crtfastmath.o, whose constructor turns on
flush-to-zero for the whole process when the library loads: every subnormal float in torch, numpy or
Python then becomes 0 (the protocol fuzz test's float strategy noticed first).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from bowline_runtime.kernels import cpu as kernels

_PROBE = """
import numpy as np, torch
from bowline_runtime.kernels import cpu
assert cpu.load() is not None, "kernels did not build"
x = np.array([1e-40], dtype=np.float32)
t = torch.tensor([1e-40], dtype=torch.float32)
print(float((x * np.float32(1.0))[0]) > 0.0, float((t * 1.0)[0]) > 0.0, 5e-324 * 1.0 > 0.0)
"""


@pytest.mark.skipif(kernels.load() is None, reason="the CPU kernels do not build here (no C compiler, or switched off)")
def test_loading_the_kernels_keeps_subnormal_floats(tmp_path) -> None:
    # A fresh process and a fresh cache: the library this build makes is the one that loads.
    env = {**os.environ, kernels.CACHE_ENV: str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"], out.stdout + out.stderr
