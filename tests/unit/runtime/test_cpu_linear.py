"""Bowline's CPU Linear kernel computes what torch's Linear computes, for every size the engine sends it."""

from __future__ import annotations

import pytest
import torch
from bowline_runtime.devices.cpu import CpuDevice, KernelLinear, OneDnnLinear
from bowline_runtime.kernels import cpu as kernels

needs_kernel = pytest.mark.skipif(
    not kernels.gemm_available(), reason="the Linear kernel needs a C compiler and an AVX-512 CPU; oneDNN serves here"
)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 16, 48, 49, 97, 300])  # one row block, several, past one chunk
@pytest.mark.parametrize(("out_features", "in_features"), [(1, 8), (63, 33), (64, 64), (200, 512), (1152, 896)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_torch_linear(rows, out_features, in_features, bias):
    torch.manual_seed(rows * 7 + out_features + in_features)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(rows, in_features)
    packed = kernels.pack_linear_weight(layer.weight.detach())
    got = kernels.linear(x, packed, None if layer.bias is None else layer.bias.detach(), out_features)
    with torch.inference_mode():
        torch.testing.assert_close(got, layer(x), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_kernel_reads_strided_rows_and_zero_rows():
    layer = torch.nn.Linear(64, 130)
    packed = kernels.pack_linear_weight(layer.weight.detach())
    wide = torch.randn(9, 100)
    x = wide[:, 20:84]  # rows 100 floats apart
    with torch.inference_mode():
        torch.testing.assert_close(kernels.linear(x, packed, layer.bias.detach(), 130), layer(x), rtol=1e-4, atol=1e-4)
    assert kernels.linear(torch.empty(0, 64), packed, None, 130).shape == (0, 130)


@needs_kernel
def test_cpu_device_swaps_float32_linears_for_the_kernel_and_keeps_their_output():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.Linear(96, 16, bias=False))
    x = torch.randn(2, 5, 32)  # transformers' [batch, tokens, hidden]
    with torch.inference_mode():
        expected = model(x)
        CpuDevice().optimize_model(model)
        assert all(isinstance(m, KernelLinear) for m in model)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_and_switched_off_kernels_keep_onednn(monkeypatch):
    bf16 = torch.nn.Sequential(torch.nn.Linear(32, 32).to(torch.bfloat16))
    CpuDevice().optimize_model(bf16)
    assert isinstance(bf16[0], OneDnnLinear)
    monkeypatch.setenv(kernels.KERNELS_ENV, "0")
    kernels.load.cache_clear()
    try:
        plain = torch.nn.Sequential(torch.nn.Linear(32, 32))
        CpuDevice().optimize_model(plain)
        assert isinstance(plain[0], OneDnnLinear)
    finally:
        kernels.load.cache_clear()
