"""Device selection: `auto` prefers an NPU, then a CUDA GPU, then the CPU."""

from __future__ import annotations

from bowline_runtime.devices.base import Device
from bowline_runtime.devices.cpu import CpuDevice
from bowline_runtime.devices.cuda import CudaDevice
from bowline_runtime.devices.npu import NpuDevice

DEVICES: dict[str, type[Device]] = {"npu": NpuDevice, "cuda": CudaDevice, "cpu": CpuDevice}


def get_device(name: str = "auto") -> Device:
    """The Device for `--device NAME`; a clear error when the asked-for kind is absent."""
    if name == "auto":
        for cls in DEVICES.values():
            if cls.is_available():
                return cls()
        return CpuDevice()
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}: choose auto, {', '.join(DEVICES)}")
    cls = DEVICES[name]
    if not cls.is_available():
        raise ValueError(f"--device {name} asked for, but no {name} device is available on this machine")
    return cls()


__all__ = ["Device", "get_device", "CpuDevice", "CudaDevice", "NpuDevice", "DEVICES"]
