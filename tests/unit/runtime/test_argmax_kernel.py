"""Greedy decoding's argmax through the C pass (kernels.cpu.argmax_rows) answers exactly as torch.argmax does,
built for this CPU and for AVX2 + FMA only (the kernel_isa fixture); where it declines, torch answers."""

from __future__ import annotations

import shutil

import pytest
import torch
from bowline_runtime.engine.sampler import greedy_tokens
from bowline_runtime.kernels import cpu as kernels

pytestmark = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler: the engine keeps torch's argmax"
)


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("vocab", [1, 7, 64, 65, 1000, 16000])  # under, at and past one 64-wide test block
def test_argmax_rows_equals_torch_argmax(kernel_isa, rows, vocab):
    torch.manual_seed(rows * 31 + vocab)
    x = torch.randn(rows, vocab)
    got = kernels.argmax_rows(x)
    assert got is not None and got.dtype == torch.int64
    assert got.tolist() == x.argmax(dim=-1).tolist()


def test_ties_masks_and_signed_zeros_pick_the_first_index_as_torch_does(kernel_isa):
    x = torch.randn(6, 300)
    x[0, 17] = x[0, 250] = 50.0  # a tie: the first
    x[1, :] = float("-inf")  # everything masked: index 0
    x[2, :] = float("-inf")
    x[2, 299] = -3.0  # one allowed token, the last
    x[3, :] = -1.0
    x[3, 40], x[3, 41] = -0.0, 0.0  # -0.0 == 0.0: the first of the two
    x[4, :] = float("inf")  # all +inf: index 0
    x[5, 123] = float("inf")
    got = kernels.argmax_rows(x)
    assert got is not None
    assert got.tolist() == x.argmax(dim=-1).tolist() == [17, 0, 299, 40, 0, 123]


def test_strided_rows_are_read_in_place_and_non_unit_strides_are_copied(kernel_isa):
    wide = torch.randn(5, 400)
    rows = wide[:, 100:300]  # rows 400 floats apart
    assert kernels.argmax_rows(rows).tolist() == rows.argmax(dim=-1).tolist()
    every_other = wide[:, ::2]
    assert kernels.argmax_rows(every_other).tolist() == every_other.argmax(dim=-1).tolist()


def test_a_row_with_nan_is_left_to_torch(kernel_isa):
    x = torch.randn(3, 100)
    x[1, 60] = float("nan")
    assert kernels.argmax_rows(x) is None
    assert greedy_tokens(x).tolist() == x.argmax(dim=-1).tolist()  # torch ranks NaN highest: row 1 -> 60


def test_other_dtypes_and_shapes_are_declined():
    assert kernels.argmax_rows(torch.randn(2, 10, dtype=torch.float64)) is None
    assert kernels.argmax_rows(torch.randn(2, 10).half()) is None
    assert kernels.argmax_rows(torch.randn(10)) is None
    x = torch.randn(2, 10, dtype=torch.bfloat16)
    assert greedy_tokens(x).tolist() == x.argmax(dim=-1).tolist()


def test_switched_off_kernels_leave_greedy_to_torch(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "0")
    kernels.load.cache_clear()
    try:
        x = torch.randn(4, 500)
        assert kernels.argmax_rows(x) is None
        assert greedy_tokens(x).tolist() == x.argmax(dim=-1).tolist()
    finally:
        monkeypatch.delenv(kernels.KERNELS_ENV)
        kernels.load.cache_clear()
