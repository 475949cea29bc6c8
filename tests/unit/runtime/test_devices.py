"""Device selection (devices/get_device)."""

from __future__ import annotations

import pytest
import torch
from bowline_runtime.devices import DEVICES, CpuDevice, CudaDevice, NpuDevice, get_device


def test_cpu_always_works():
    dev = get_device("cpu")
    assert isinstance(dev, CpuDevice)
    assert dev.type == "cpu" and dev.device_count() == 1
    assert dev.torch_device(3) == torch.device("cpu")
    assert dev.default_dtype() == torch.float32


def test_auto_prefers_npu_then_cuda_then_cpu():
    expected = next((cls for cls in DEVICES.values() if cls.is_available()), CpuDevice)
    assert type(get_device("auto")) is expected
    assert type(get_device()) is expected
    assert list(DEVICES) == ["npu", "cuda", "cpu"]


def test_auto_falls_back_to_cpu_when_no_accelerator(monkeypatch):
    monkeypatch.setattr(CudaDevice, "is_available", classmethod(lambda cls: False))
    monkeypatch.setattr(NpuDevice, "is_available", classmethod(lambda cls: False))
    assert isinstance(get_device("auto"), CpuDevice)


def test_auto_picks_an_available_accelerator(monkeypatch):
    monkeypatch.setattr(CudaDevice, "is_available", classmethod(lambda cls: True))
    monkeypatch.setattr(NpuDevice, "is_available", classmethod(lambda cls: False))
    assert isinstance(get_device("auto"), CudaDevice)


@pytest.mark.parametrize("name", ["cuda", "npu"])
def test_absent_accelerator_raises_a_clear_error(monkeypatch, name):
    monkeypatch.setattr(DEVICES[name], "is_available", classmethod(lambda cls: False))
    with pytest.raises(ValueError, match=rf"--device {name} asked for, but no {name} device is available"):
        get_device(name)


def test_unknown_device_raises_listing_choices():
    with pytest.raises(ValueError, match=r"unknown device 'tpu': choose auto, npu, cuda, cpu"):
        get_device("tpu")


def test_npu_is_absent_without_torch_npu():
    # torch_npu is not installed in this environment; asking must not crash on import.
    import importlib.util

    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu installed")
    assert NpuDevice.is_available() is False
