"""The CPU device keeps freed activations mapped, so a step's large tensors stop page-faulting."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from bowline_runtime.config import switch_on
from bowline_runtime.devices import host_memory
from bowline_runtime.devices.cpu import CpuDevice

# One MLP's worth of a 512-token prefill's activations, allocated, written and freed per "layer";
# prints the minor page faults of 10 layers after 5 to settle. glibc's starting mmap threshold
# (128 KiB) is pinned through its environment variable, which also stops glibc adapting it, so the
# untuned run behaves the same every time: the tuning must override it.
_PROBE = """
import json, resource, sys, torch
from bowline_runtime.devices.cpu import CpuDevice
if sys.argv[1] == "tuned":
    CpuDevice().prepare_process()
x = torch.randn(512, 1536)
def layer():
    y = torch.nn.functional.silu(x)
    z = y * x
    w = torch.empty(512, 4096).fill_(1.0)
for _ in range(5):
    layer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    layer()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""

PAGES_PER_LAYER = (2 * 512 * 1536 + 512 * 4096) * 4 // 4096


def _faults(mode: str, env_value: str = "1") -> int:
    env = {"PATH": "", "MALLOC_MMAP_THRESHOLD_": str(128 * 2**10), host_memory.HOST_MEMORY_ENV: env_value}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env=env, timeout=120
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator is what is tuned")
def test_tuned_process_reuses_freed_activations_without_page_faults():
    default = _faults("default")
    tuned = _faults("tuned")
    assert default >= 9 * PAGES_PER_LAYER  # glibc maps and unmaps every one: a fault per page, each layer
    assert tuned < PAGES_PER_LAYER // 4  # the memory of the first layers is reused by the rest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator is what is tuned")
def test_tuning_can_be_switched_off():
    assert _faults("tuned", env_value="0") >= 9 * PAGES_PER_LAYER


def test_switch_reads_the_usual_false_words():
    assert switch_on(host_memory.HOST_MEMORY_ENV, {})
    assert switch_on(host_memory.HOST_MEMORY_ENV, {host_memory.HOST_MEMORY_ENV: "1"})
    for off in ("0", "false", "No", " off "):
        assert not switch_on(host_memory.HOST_MEMORY_ENV, {host_memory.HOST_MEMORY_ENV: off})


def test_cpu_device_prepares_the_process(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    CpuDevice().prepare_process()
    assert calls == [1]
