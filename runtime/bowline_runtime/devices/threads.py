"""How many compute threads this process may use: the cores it may run on, capped by its CPU quota.

`os.cpu_count()` counts the machine's cores, not ours: in a pod limited to 2 CPUs on a 64-core node
it says 64, and 64 OpenMP threads sharing 2 CPUs of quota spin-wait for each other and the event loop
(a 2-thread server next to one busy process ran 3-4x slower here, see the CPU performance notes).
The count is the smaller of the affinity mask (taskset, cpuset) and floor(quota / period) from the
cgroup (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), and at least 1.
"""

from __future__ import annotations

import os
from pathlib import Path


def cores_from_limits(
    affinity: int,
    cpu_max: str | None = None,
    cfs_quota_us: str | None = None,
    cfs_period_us: str | None = None,
) -> int:
    """The usable core count from the affinity mask size and the cgroup files' texts (None when absent).

    Pure, so every quota shape is tested without a pod: v2 `cpu.max` is "max 100000" (no limit) or
    "150000 100000" (1.5 CPUs -> 1); v1 gives a quota of "-1" for no limit.
    """
    cores = max(1, affinity)
    quota = period = None
    if cpu_max is not None:
        fields = cpu_max.split()
        if len(fields) == 2 and fields[0] != "max":
            quota, period = _number(fields[0]), _number(fields[1])
    elif cfs_quota_us is not None and cfs_period_us is not None:
        quota, period = _number(cfs_quota_us), _number(cfs_period_us)
    if quota is not None and period and quota > 0:
        cores = min(cores, max(1, int(quota // period)))
    return cores


def _number(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def usable_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use, read from its affinity mask and its cgroup (v2, else v1)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    root = Path(cgroup_root)
    return cores_from_limits(
        affinity,
        cpu_max=_read(root / "cpu.max"),
        cfs_quota_us=_read(root / "cpu" / "cpu.cfs_quota_us") or _read(root / "cpu.cfs_quota_us"),
        cfs_period_us=_read(root / "cpu" / "cpu.cfs_period_us") or _read(root / "cpu.cfs_period_us"),
    )


__all__ = ["cores_from_limits", "usable_cores"]
