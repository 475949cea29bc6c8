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
    # The fewest of three runs: faults from outside the allocator only ever add (on a shared VM about one
    # run in five of the tuned probe read 1,536-2,048 where the others read 0), never remove.
    tuned = min(_faults("tuned") for _ in range(3))
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


# 300 one-MiB blocks: below the raised mmap threshold, so they come from the heap and stay there
# when freed; prints RSS (MiB) after freeing them and after giving the free pages back.
_RELEASE_PROBE = """
import json, torch
from bowline_runtime.devices import host_memory
from bowline_runtime.devices.cpu import CpuDevice
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
CpuDevice().prepare_process()
base = rss()
blocks = [torch.ones(2**18) for _ in range(300)]
del blocks[::2]  # interleaved frees: the heap's top stays in use, so trimming the top alone frees nothing
kept = rss()
blocks.clear()
freed = rss()
CpuDevice().release_idle_memory()
print(json.dumps([base, kept, freed, rss()]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc_trim")
def test_idle_release_gives_freed_heap_back():
    out = subprocess.run([sys.executable, "-c", _RELEASE_PROBE], capture_output=True, text=True, check=True)
    base, kept, freed, released = json.loads(out.stdout.strip().splitlines()[-1])
    assert kept - base > 100, (base, kept)  # the blocks were really resident
    assert freed - base > 200, "freed blocks stay mapped while serving (the point of keep_freed_memory)"
    assert released - base < 50, (base, kept, freed, released)


def test_idle_release_waits_for_a_quiet_period_and_fires_once():
    now, calls = [0.0], []
    idle = host_memory.IdleRelease(lambda: calls.append(now[0]), after_s=10.0, clock=lambda: now[0])
    assert not idle.tick(busy=False)  # nothing served yet: nothing to give back
    now[0] = 30.0
    assert not idle.tick(busy=False) and calls == []
    idle.tick(busy=True)
    for t in (31.0, 35.0, 40.9):  # a request every few seconds keeps the pages
        now[0] = t
        assert not idle.tick(busy=False)
    idle.tick(busy=True)
    now[0] = 42.0
    idle.tick(busy=False)
    now[0] = 52.5
    assert idle.tick(busy=False) and calls == [52.5]
    now[0] = 80.0
    assert not idle.tick(busy=False) and calls == [52.5]  # once per idle period


def test_engine_loop_releases_memory_once_idle(tiny_model_dir, monkeypatch):
    import asyncio
    import time

    from bowline_runtime.config import EngineConfig
    from bowline_runtime.engine.async_engine import AsyncEngine
    from bowline_runtime.engine.sampling_params import SamplingParams

    calls = []
    monkeypatch.setattr(host_memory, "IDLE_RELEASE_AFTER_S", 0.3)
    monkeypatch.setattr(CpuDevice, "release_idle_memory", lambda self: calls.append(time.monotonic()))

    async def run() -> list[int]:
        engine = AsyncEngine(EngineConfig(model=str(tiny_model_dir)))
        seen = []
        try:
            for _ in range(2):
                async for _ in engine.generate(engine.tokenizer.encode("hello"), SamplingParams(max_tokens=4)):
                    pass
                seen.append(len(calls))
                await asyncio.sleep(1.5)
                seen.append(len(calls))
        finally:
            await engine.shutdown()
        return seen

    assert asyncio.run(run()) == [0, 1, 1, 2]
