"""The CPU: always present, gloo for tensor parallelism, float32 by default (fastest on most CPUs)."""

from __future__ import annotations

import os

import torch

from bowline_runtime.devices.base import Device


class CpuDevice(Device):
    type = "cpu"
    dist_backend = "gloo"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def memory_info(self, rank: int = 0) -> tuple[int, int]:
        try:
            pages, free_pages, page = (os.sysconf(n) for n in ("SC_PHYS_PAGES", "SC_AVPHYS_PAGES", "SC_PAGE_SIZE"))
            return free_pages * page, pages * page
        except (ValueError, OSError):  # not POSIX: claim nothing is known
            return 0, 0

    def default_dtype(self) -> torch.dtype:
        return torch.float32
