"""Keep freed host memory in the process instead of handing it back to the kernel after every step.

glibc serves every allocation above its mmap threshold (128 KiB at start, adapted upwards to at most
32 MiB as large blocks are freed) with a fresh `mmap`, and gives it back with `munmap` on `free`. A
CPU forward allocates activations of megabytes (a 512-token chunk's MLP input is 512 x 1536 floats,
3 MiB) dozens of times per layer, so each one arrived as untouched pages and its first write took a
page fault per 4 KiB: in a 512-token prefill of the bench model, `silu` spent 1.6 ms on a tensor it
computes in 0.2 ms, and the whole step took 110 ms where 80 ms was the work. vLLM's CPU backend avoids
this by preloading tcmalloc; fixing glibc's two thresholds does the same without a second allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

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
