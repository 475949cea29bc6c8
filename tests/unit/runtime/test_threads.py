"""The compute-thread count follows the cores the process may use, not the machine's core count."""

from __future__ import annotations

import os

import pytest
from bowline_runtime.devices.threads import cores_from_limits, usable_cores


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "quota", "period", "expected"),
    [
        (8, None, None, None, 8),  # no cgroup files: the affinity mask decides
        (8, "max 100000\n", None, None, 8),  # v2 without a limit
        (8, "200000 100000\n", None, None, 2),  # v2, 2 CPUs
        (8, "150000 100000\n", None, None, 1),  # v2, 1.5 CPUs: floor
        (8, "50000 100000\n", None, None, 1),  # v2, half a CPU: at least 1
        (2, "400000 100000\n", None, None, 2),  # the mask is smaller than the quota
        (8, None, "-1\n", "100000\n", 8),  # v1 without a limit
        (8, None, "300000\n", "100000\n", 3),  # v1, 3 CPUs
        (0, None, None, None, 1),  # never 0
        (8, "garbage", None, None, 8),  # an unreadable file is no limit
    ],
)
def test_cores_from_limits(affinity, cpu_max, quota, period, expected):
    assert cores_from_limits(affinity, cpu_max, quota, period) == expected


def test_usable_cores_reads_a_cgroup_v2_folder(tmp_path):
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert usable_cores(str(tmp_path)) == 1


def test_usable_cores_reads_a_cgroup_v1_folder(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(str(tmp_path)) == 1


def test_usable_cores_without_cgroup_files_is_the_affinity_mask(tmp_path):
    assert usable_cores(str(tmp_path)) == len(os.sched_getaffinity(0))
