"""A bound on requests in flight: beyond it the server answers 429 at once instead of queueing
without limit (memory grows with every waiting request; clients and load balancers retry)."""

from __future__ import annotations

from bowline_runtime.api.errors import APIError


class Ticket:
    """Held while a request is in flight; `release` is idempotent so every exit path may call it."""

    __slots__ = ("_admission", "_released")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._in_flight -= 1


class Admission:
    """Admit up to `max_running + max_queue_len` requests: the engine's batch plus a bounded queue."""

    def __init__(self, max_running: int, max_queue_len: int, retry_after_s: int = 1) -> None:
        self.limit = max_running + max_queue_len
        self.max_queue_len = max_queue_len
        self.retry_after_s = retry_after_s
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def enter(self) -> Ticket:
        """A ticket, or APIError 429 with Retry-After when the queue is full."""
        if self._in_flight >= self.limit:
            raise APIError(
                f"the server is at capacity ({self._in_flight} requests in flight, queue bound "
                f"--max-queue-len {self.max_queue_len}); retry after {self.retry_after_s}s",
                429,
                code="queue_full",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self._in_flight += 1
        return Ticket(self)
