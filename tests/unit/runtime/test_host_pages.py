"""Large torch buffers on huge pages: on by default for the runtime, the user's setting kept, and
never claimed where torch was loaded first (it reads the setting once)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

PROBE = """
import os, sys
{before}
from bowline_runtime.host_pages import prefer_huge_pages
on = prefer_huge_pages()
import torch
weights = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")][0].split()[1]
print(on, os.environ.get("THP_MEM_ALLOC_ENABLE"), huge)
"""


def _probe(before: str = "", **env: str) -> tuple[str, str, int]:
    environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    out = subprocess.run([sys.executable, "-c", PROBE.format(before=before)], env=environ, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    return out[0], out[1], int(out[2])


def _thp_allowed() -> bool:
    return THP_MODE.exists() and re.search(r"\[(always|madvise)\]", THP_MODE.read_text()) is not None


def test_on_by_default_and_the_weights_land_on_huge_pages():
    on, value, huge_kib = _probe()
    assert (on, value) == ("True", "1")
    if not _thp_allowed():
        pytest.skip(f"transparent huge pages are off on this kernel ({THP_MODE}): the setting changes nothing")
    assert huge_kib >= 32 * 1024, "a 64 MiB buffer should be mostly on 2 MiB pages"


def test_the_users_choice_is_kept():
    on, value, huge_kib = _probe(THP_MEM_ALLOC_ENABLE="0")
    assert (on, value) == ("False", "0")
    if THP_MODE.exists() and "[always]" not in THP_MODE.read_text():
        assert huge_kib < 8 * 1024  # madvise mode: nothing asked for huge pages


def test_nothing_is_claimed_once_torch_is_loaded():
    on, value, _ = _probe(before="import torch")
    assert (on, value) == ("False", "None")


def test_the_offline_api_asks_for_huge_pages_too():
    on, value, _ = _probe(before="from bowline_runtime import LLM")
    assert (on, value) == ("True", "1")
