"""Bowline's CPU Linear kernel computes what torch's Linear computes, for every size the engine sends it."""

from __future__ import annotations

import pytest
import torch
from bowline_runtime.devices import cpu as cpu_device
from bowline_runtime.devices.cpu import CpuDevice, KernelLinear, OneDnnLinear, onednn_packs
from bowline_runtime.kernels import cpu as kernels
from bowline_runtime.kernels import linear_choice

needs_kernel = pytest.mark.skipif(
    not kernels.gemm_available(), reason="the Linear kernel needs a C compiler and an AVX-512 or AVX2 + FMA CPU; oneDNN serves here"
)


@needs_kernel
# one row block (3 on AVX2, 6 on AVX-512), several of unequal sizes, past one chunk (96 / 144 rows)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 15, 16, 17, 20, 48, 49, 97, 145, 300])
# one column, a partial last vector and panel (63, 200), whole panels only (64, 1152); an odd K (33) leaves
# the one-row loop, which takes k in pairs, one k over; K = 1100 is three slices of AVX2's packed prefill
# path (512, 512, 76), partial sums carried between them
@pytest.mark.parametrize(("out_features", "in_features"), [(1, 8), (63, 33), (64, 64), (200, 512), (1152, 896), (40, 1100)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_torch_linear(kernel_isa, rows, out_features, in_features, bias):
    assert kernels.gemm_available(), f"the {kernel_isa} build has the Linear kernel"
    torch.manual_seed(rows * 7 + out_features + in_features)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(rows, in_features)
    packed = kernels.pack_linear_weight(layer.weight.detach())
    got = kernels.linear(x, packed, None if layer.bias is None else layer.bias.detach(), out_features)
    with torch.inference_mode():
        torch.testing.assert_close(got, layer(x), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_kernel_reads_strided_rows_and_zero_rows(kernel_isa):
    assert kernels.gemm_available(), f"the {kernel_isa} build has the Linear kernel"
    layer = torch.nn.Linear(64, 130)
    packed = kernels.pack_linear_weight(layer.weight.detach())
    wide = torch.randn(9, 100)
    x = wide[:, 20:84]  # rows 100 floats apart
    with torch.inference_mode():
        torch.testing.assert_close(kernels.linear(x, packed, layer.bias.detach(), 130), layer(x), rtol=1e-4, atol=1e-4)
    assert kernels.linear(torch.empty(0, 64), packed, None, 130).shape == (0, 130)


@needs_kernel
def test_cpu_device_swaps_float32_linears_for_the_kernel_and_keeps_their_output(monkeypatch):
    monkeypatch.setenv(linear_choice.LINEAR_ENV, "kernel")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.Linear(96, 16, bias=False))
    x = torch.randn(2, 5, 32)  # transformers' [batch, tokens, hidden]
    with torch.inference_mode():
        expected = model(x)
        CpuDevice().optimize_model(model)
        assert all(isinstance(m, KernelLinear) for m in model)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


needs_onednn_bf16 = pytest.mark.skipif(
    not onednn_packs(torch.bfloat16),
    reason="oneDNN packs bfloat16 only with avx_ne_convert or AVX-512 (bw, vl, dq); this CPU has neither",
)


def test_bfloat16_and_switched_off_kernels_keep_onednn(monkeypatch):
    monkeypatch.setenv(linear_choice.LINEAR_ENV, "onednn")
    # Where oneDNN packs bfloat16 (AVX-512 or avx_ne_convert) the Linear is packed; elsewhere it stays plain.
    bf16 = torch.nn.Sequential(torch.nn.Linear(32, 32).to(torch.bfloat16))
    CpuDevice().optimize_model(bf16)
    assert type(bf16[0]) is (OneDnnLinear if onednn_packs(torch.bfloat16) else torch.nn.Linear)
    monkeypatch.setenv(kernels.KERNELS_ENV, "0")
    kernels.load.cache_clear()
    try:
        plain = torch.nn.Sequential(torch.nn.Linear(32, 32))
        CpuDevice().optimize_model(plain)
        assert isinstance(plain[0], OneDnnLinear)
    finally:
        kernels.load.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_linears_stay_plain_where_onednn_cannot_pack_them_and_still_compute(monkeypatch, dtype):
    # Forces the AVX2-only outcome everywhere: the probe says no, so the Linear must stay torch's own.
    monkeypatch.setattr(cpu_device, "onednn_packs", lambda _dtype: False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48).to(dtype))
    x = torch.randn(3, 32, dtype=dtype)
    with torch.inference_mode():
        expected = model(x)
        CpuDevice().optimize_model(model)
        assert type(model[0]) is torch.nn.Linear
        torch.testing.assert_close(model(x), expected)


@needs_onednn_bf16
def test_bfloat16_is_packed_for_onednn_where_the_cpu_supports_it(monkeypatch):
    monkeypatch.setenv(linear_choice.LINEAR_ENV, "onednn")
    bf16 = torch.nn.Sequential(torch.nn.Linear(32, 32).to(torch.bfloat16))
    CpuDevice().optimize_model(bf16)
    assert isinstance(bf16[0], OneDnnLinear)


def test_onednn_probe_answers_for_every_dtype_without_raising():
    assert onednn_packs(torch.float32) == cpu_device._onednn_linear_available()
    for dtype in (torch.bfloat16, torch.float16):
        assert isinstance(onednn_packs(dtype), bool)
    if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16") and cpu_device._onednn_linear_available():
        assert onednn_packs(torch.bfloat16)


def test_bfloat16_linears_keep_their_output_through_optimize_model():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 40).to(torch.bfloat16))
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = model(x).float()
        CpuDevice().optimize_model(model)
        torch.testing.assert_close(model(x).float(), expected, rtol=2e-2, atol=2e-2)


def test_kernel_layer_gives_the_same_rows_through_the_direct_and_the_reshaping_path():
    """2-D float32 rows skip the reshape; 3-D or strided inputs take it; both give nn.Linear's output,
    and a layer whose buffers move (`_apply`, as .to() does) reads its weight pointers again."""
    if not kernels.gemm_available():
        pytest.skip("the CPU Linear kernel does not build on this CPU (needs AVX-512 or AVX2 + FMA)")

    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 130)
    layer = KernelLinear(plain)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer(x.view(1, 5, 64)), plain(x).view(1, 5, 130), rtol=1e-4, atol=1e-4)
    wide = torch.randn(5, 128)[:, ::2]  # rows with stride 2 along the row: copied before the C call
    torch.testing.assert_close(layer(wide), plain(wide), rtol=1e-4, atol=1e-4)
    assert layer.weight_pointers() is layer.weight_pointers()  # read once, then kept
    layer.float()  # goes through _apply, which may move the buffers
    assert layer._bound is None
    assert layer.weight_pointers() == (layer.packed_weight.data_ptr(), layer.bias.data_ptr())
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-4, atol=1e-4)
