"""The harness waits for the machine to go quiet before each timed point (bench/quiet.py)."""

from __future__ import annotations

import pytest

from bench import quiet


def stat(busy: int, idle: int) -> str:
    """/proc/stat text with `busy` user jiffies and `idle` idle jiffies in all."""
    return f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 {busy} 0 0 {idle} 0 0 0 0 0 0\n"


def test_busy_share_counts_iowait_as_idle_and_guest_once():
    before = quiet.cpu_times("cpu  100 0 50 800 50 0 0 0 7 0\n")
    after = quiet.cpu_times("cpu  160 0 70 900 70 0 0 0 9 0\n")
    assert before == (150, 1000) and after == (230, 1200)
    assert quiet.busy_share(before, after) == pytest.approx(80 / 200)
    assert quiet.busy_share(after, after) == 0.0


def test_waits_while_another_server_is_busy_then_goes_on():
    # 40 % busy, then 20 %, then 1 %: quiet after the third window
    samples = iter([stat(0, 0), stat(40, 60), stat(60, 140), stat(61, 239)])
    slept: list[float] = []
    waited = quiet.wait_until_quiet(lambda: next(samples), slept.append)
    assert waited == pytest.approx(3 * quiet.WINDOW_S) and len(slept) == 3


def test_a_machine_that_never_quiets_is_waited_for_at_most_the_bound():
    busy = [0]

    def read() -> str:
        busy[0] += 50
        return stat(busy[0], busy[0])

    waited = quiet.wait_until_quiet(read, lambda s: None, max_wait_s=5.0)
    assert waited == pytest.approx(5.0)


def test_without_proc_stat_it_does_not_wait():
    def unreadable() -> str:
        raise OSError("no /proc here")

    assert quiet.wait_until_quiet(unreadable, lambda s: pytest.fail("slept")) == 0.0
