"""Huawei Ascend NPUs through torch_npu (imported only when installed), hccl for tensor parallelism."""

from __future__ import annotations

import importlib.util

import torch

from bowline_runtime.devices.base import Device


def _torch_npu():
    import torch_npu  # noqa: F401 - registers torch.npu

    return torch.npu  # type: ignore[attr-defined]


class NpuDevice(Device):
    type = "npu"
    dist_backend = "hccl"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"

    @classmethod
    def is_available(cls) -> bool:
        if importlib.util.find_spec("torch_npu") is None:
            return False
        try:
            return bool(_torch_npu().is_available())
        except Exception:  # a broken CANN install means "no NPU here", not a crash
            return False

    def device_count(self) -> int:
        return _torch_npu().device_count()

    def memory_info(self, rank: int = 0) -> tuple[int, int]:
        return _torch_npu().mem_get_info(rank)

    def synchronize(self) -> None:
        _torch_npu().synchronize()

    def set_device(self, rank: int) -> None:
        _torch_npu().set_device(rank)
