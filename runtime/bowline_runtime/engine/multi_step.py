"""Multi-step scheduling (vLLM's --num-scheduler-steps N): one scheduling decision, then up to N steps.

The step that opens a window admits waiting requests as usual; the next N-1 steps run the batch
that is already running (decodes, and the prompt chunks of sequences already admitted) with no
admission. A sequence that finishes mid-window stops at once (its blocks are freed and its output
sent); a window whose sequences have all finished ends early. With `multi_step_stream_outputs`
off, the window's per-step deltas are merged and sent when the window ends (or when the request
finishes), so a client sees up to N tokens at a time.

What it buys here: vLLM's gain comes from keeping the GPU busy across steps without a CPU round
trip; this engine's per-step CPU work (schedule, plan, sample, detokenise) is the same either way,
so only the admission pass is saved — see docs/multi-step.md for the measurement.
"""

from __future__ import annotations

from bowline_runtime.engine.outputs import RequestOutput, merge_delta


class MultiStepWindow:
    def __init__(self, num_steps: int, stream_outputs: bool = True) -> None:
        self.num_steps = max(1, num_steps)
        self.stream_outputs = stream_outputs or self.num_steps == 1
        self._left = 0
        self._held: dict[str, RequestOutput] = {}

    @property
    def admits(self) -> bool:
        """Whether the next step may admit waiting requests (it opens a new window)."""
        return self._left == 0

    def advance(self, admitted: bool) -> None:
        """A step was scheduled: it opened a window (admitted) or ran one of the window's steps."""
        self._left = self.num_steps - 1 if admitted else self._left - 1

    def end(self) -> None:
        """Nothing left to run in this window: the next step schedules (and admits) again."""
        self._left = 0

    def deliver(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """The outputs to hand out after this step: all of them when streaming; otherwise the
        finished ones now and everything else merged at the window's end."""
        if self.stream_outputs:
            return outputs
        ready = []
        for out in outputs:
            held = self._held.pop(out.request_id, None)
            merged = out if held is None else merge_delta(held, out)
            if merged.finished:
                ready.append(merged)
            else:
                self._held[out.request_id] = merged
        if self._left == 0:
            ready.extend(self.flush())
        return ready

    def flush(self) -> list[RequestOutput]:
        held, self._held = list(self._held.values()), {}
        return held

    def drop(self, request_id: str) -> None:
        """An aborted request's held deltas go nowhere."""
        self._held.pop(request_id, None)
