"""The served process keeps its large buffers (the KV cache, weights of 2 MiB and more) on huge pages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP_MODE.exists() or re.search(r"\[(always|madvise)\]", THP_MODE.read_text()) is None,
                    reason="transparent huge pages are off on this kernel: there is nothing to ask for")
def test_the_kv_cache_is_on_huge_pages(api_server):
    rollup = Path(f"/proc/{api_server.proc.pid}/smaps_rollup").read_text()
    huge_kib = int(re.search(r"AnonHugePages:\s+(\d+) kB", rollup).group(1))
    assert huge_kib >= 16 * 1024, rollup
