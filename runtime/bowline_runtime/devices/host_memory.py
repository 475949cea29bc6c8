"""Keep freed host memory in the process instead of handing it back to the kernel after every step.

glibc serves every allocation above its mmap threshold (128 KiB at start, adapted upwards to at most
32 MiB as large blocks are freed) with a fresh `mmap`, and gives it back with `munmap` on `free`. A
CPU forward allocates activations of megabytes (a 512-token chunk's MLP input is 512 x 1536 floats,
3 MiB) dozens of times per layer, so each one arrived as untouched pages and its first write took a
page fault per 4 KiB: in a 512-token prefill of the bench model, `silu` spent 1.6 ms on a tensor it
computes in 0.2 ms, and the whole step took 110 ms where 80 ms was the work. vLLM's CPU backend avoids
this by preloading tcmalloc; fixing glibc's two thresholds does the same without a second allocator.

The price is that freed memory stays in the process: under bursts of requests of many sizes the
heaps (one per thread that allocates: the engine, the tokenizer workers) fragment and RSS creeps up
(bench model through the server: 1.83 -> 2.08 GB over 17 bursts of 200 requests, the Python heap
flat; the in-process engine alone levels off after 4 bursts). So once the engine has been idle for
a while, `IdleRelease` hands every free page back (`malloc_trim`): RSS returns to what is in use,
and a busy server pays nothing, since it never goes idle long enough.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

from bowline_runtime.config import switch_on

logger = logging.getLogger("bowline.devices")

# Set to 0 to leave glibc's defaults (for before/after benchmarks).
HOST_MEMORY_ENV = "BOWLINE_CPU_KEEP_FREED_MEMORY"

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's ceiling for the mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks below it come
# from the heap; larger ones (the KV cache, weights) are allocated once and may keep their own mapping.
MMAP_THRESHOLD = 32 * 2**20
# Free heap above this at the top is returned to the kernel: rare, so a step's activations stay mapped.
TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where there is no glibc (or it is off)."""
    if not switch_on(HOST_MEMORY_ENV):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        logger.warning("could not raise glibc's mmap/trim thresholds; large activations will page-fault every step")
    return ok


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Give free heap pages of every malloc arena back to the kernel; False where there is no glibc."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:  # musl and others: nothing kept, nothing to give back
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    trim(0)
    return True


# Idle this long before the freed memory goes back: long enough that a server answering a request
# every few seconds keeps its pages (a 512-token prefill page-faults 110 instead of 80 ms without),
# short enough that a quiet pod's RSS settles before anyone looks.
IDLE_RELEASE_AFTER_S = 10.0


class IdleRelease:
    """Calls `release` once per idle period, when the engine has been idle for `after_s` seconds.

    The engine loop calls `tick(busy)` every time round; the clock is injectable for tests.
    """

    def __init__(self, release: Callable[[], object], after_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.release, self.clock = release, clock
        self.after_s = IDLE_RELEASE_AFTER_S if after_s is None else after_s
        self._idle_since: float | None = None
        self._released = True  # nothing to give back before the first request

    def tick(self, busy: bool) -> bool:
        """Note the engine's state; True when this call released memory."""
        if busy:
            self._idle_since, self._released = None, False
            return False
        now = self.clock()
        if self._idle_since is None:
            self._idle_since = now
        if self._released or now - self._idle_since < self.after_s:
            return False
        self._released = True
        self.release()
        return True
