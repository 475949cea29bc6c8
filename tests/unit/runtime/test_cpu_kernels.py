"""The CPU device's packed linear layers compute what nn.Linear computes."""

from __future__ import annotations

import pytest
import torch
from bowline_runtime.devices.cpu import PACKED_LINEAR_ENV, CpuDevice, OneDnnLinear, _onednn_linear_available

pytestmark = pytest.mark.skipif(not _onednn_linear_available(), reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize("rows", [1, 7, 16, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_nn_linear(rows, bias):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 160, bias=bias)
    x = torch.randn(2, rows, 96)
    with torch.inference_mode():
        torch.testing.assert_close(OneDnnLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


def test_optimize_model_swaps_every_float_linear_and_keeps_outputs(monkeypatch):
    monkeypatch.setenv("BOWLINE_CPU_LINEAR", "onednn")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.SiLU(), torch.nn.Sequential(torch.nn.Linear(64, 8)))
    x = torch.randn(5, 32)
    with torch.inference_mode():
        expected = model(x)
        CpuDevice().optimize_model(model)
        assert not any(type(m) is torch.nn.Linear for m in model.modules())
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_packing_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(PACKED_LINEAR_ENV, "0")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    CpuDevice().optimize_model(model)
    assert type(model[0]) is torch.nn.Linear
