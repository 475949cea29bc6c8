"""NVIDIA (and ROCm, which torch also exposes as `cuda`) GPUs, nccl for tensor parallelism."""

from __future__ import annotations

import torch

from bowline_runtime.devices.base import Device


class CudaDevice(Device):
    type = "cuda"
    dist_backend = "nccl"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def memory_info(self, rank: int = 0) -> tuple[int, int]:
        return torch.cuda.mem_get_info(rank)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def set_device(self, rank: int) -> None:
        torch.cuda.set_device(rank)

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        if torch.cuda.is_bf16_supported():
            return (torch.float32, torch.bfloat16, torch.float16)
        return (torch.float32, torch.float16)
