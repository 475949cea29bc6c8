"""The multi-step window on its own: when it admits, and what it holds back without streaming."""

from __future__ import annotations

from bowline_runtime.engine.block_manager import BlockManager
from bowline_runtime.engine.multi_step import MultiStepWindow
from bowline_runtime.engine.outputs import CompletionOutput, RequestOutput
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.engine.scheduler import Scheduler
from bowline_runtime.engine.sequence import Sequence


def delta(request_id: str, token: int, finished: bool = False) -> RequestOutput:
    out = CompletionOutput(index=0, new_token_ids=[token], new_text=f"<{token}>", finish_reason="length" if finished else None)
    return RequestOutput(request_id, [], [out], finished=finished)


def test_a_window_admits_once_every_n_steps():
    window = MultiStepWindow(3)
    pattern = []
    for _ in range(7):
        admit = window.admits
        pattern.append(admit)
        window.advance(admit)
    assert pattern == [True, False, False, True, False, False, True]
    window.end()
    assert window.admits


def test_streaming_hands_every_delta_out_at_once():
    window = MultiStepWindow(4, stream_outputs=True)
    window.advance(True)
    outs = [delta("a", 1)]
    assert window.deliver(outs) == outs


def test_without_streaming_deltas_merge_until_the_window_ends_and_finished_ones_go_at_once():
    window = MultiStepWindow(3, stream_outputs=False)
    window.advance(True)
    assert window.deliver([delta("a", 1), delta("b", 1)]) == []
    window.advance(False)
    finished = window.deliver([delta("a", 2), delta("b", 2, finished=True)])
    assert [(o.request_id, o.outputs[0].new_token_ids, o.outputs[0].new_text) for o in finished] == [("b", [1, 2], "<1><2>")]
    window.advance(False)
    end = window.deliver([delta("a", 3)])
    assert [(o.request_id, o.outputs[0].new_token_ids) for o in end] == [("a", [1, 2, 3])]
    window.advance(True)
    window.deliver([delta("c", 1)])
    window.drop("c")
    assert window.flush() == []


def test_one_step_always_streams():
    assert MultiStepWindow(1, stream_outputs=False).stream_outputs


def test_the_scheduler_admits_nothing_when_told_not_to():
    scheduler = Scheduler(BlockManager(64, 4, False), max_num_seqs=8, max_num_batched_tokens=64)
    params = SamplingParams()
    seq = Sequence(seq_id=0, request_id="r", index=0, token_ids=[1, 2, 3], num_prompt_tokens=3, params=params, arrival_time=0.0)
    scheduler.add(seq)
    assert scheduler.schedule(admit=False).is_empty and len(scheduler.waiting) == 1
    assert scheduler.schedule().seqs == [seq]
