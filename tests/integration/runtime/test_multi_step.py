"""Multi-step scheduling gives the single-step engine's greedy tokens, stops where it stops (stop
strings and max_tokens that fall inside a window), and with streaming off sends a window's tokens
at once. One model load: the window is swapped on the same engine."""

from __future__ import annotations

import pytest
from bowline_runtime import LLM, SamplingParams
from bowline_runtime.engine.multi_step import MultiStepWindow

PROMPTS = [
    "hello world", "the model serves tokens", "你好，世界", "json schema object", "k", "write a short story about a boat",
    "one two three four five six seven eight nine ten", "kubernetes operator deployment service pod replica",
]
MAX_TOKENS = [3, 5, 6, 7, 9, 10, 11, 13]  # most end mid-window for 4 steps


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with LLM(str(tiny_model_dir), device="cpu", max_model_len=256, max_num_seqs=4, kv_cache_memory=16 * 2**20) as model:
        yield model


def run(llm: LLM, steps: int, stream: bool, params):
    llm.engine.multi_step = MultiStepWindow(steps, stream)
    try:
        return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in llm.generate(PROMPTS, params)]
    finally:
        llm.engine.multi_step = MultiStepWindow(1)


def test_four_steps_give_the_single_step_greedy_tokens_with_stops_and_max_tokens_inside_a_window(llm):
    greedy = [SamplingParams(temperature=0, max_tokens=n) for n in MAX_TOKENS]
    one = run(llm, 1, True, greedy)
    # A stop string from the middle of each single-step answer: it is met inside a multi-step window.
    stops = []
    for _ids, text, _ in one:
        stop = text[len(text) // 2 : len(text) // 2 + 2].strip()
        stops.append([stop] if stop else [])
    with_stops = [SamplingParams(temperature=0, max_tokens=n, stop=s) for n, s in zip(MAX_TOKENS, stops, strict=True)]
    one_stopped = run(llm, 1, True, with_stops)
    assert any(reason == "stop" for _, _, reason in one_stopped)
    for steps, stream in ((4, True), (4, False)):
        assert run(llm, steps, stream, greedy) == one, (steps, stream)
        assert run(llm, steps, stream, with_stops) == one_stopped, (steps, stream)
    for (ids, _, reason), n in zip(one, MAX_TOKENS, strict=True):
        assert len(ids) <= n and (reason != "length" or len(ids) == n)


def test_without_streaming_a_window_of_four_sends_its_tokens_at_once(llm):
    engine = llm.engine
    engine.multi_step = MultiStepWindow(4, stream_outputs=False)
    try:
        prepared = engine.check_request(engine.tokenizer.encode("hello world"), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
        engine.add_request("window", prepared)
        sizes = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                sizes.append(len(out.outputs[0].new_token_ids))
        assert sizes == [4, 4, 2]
    finally:
        engine.multi_step = MultiStepWindow(1)


def test_no_request_is_admitted_inside_a_window(llm):
    engine = llm.engine
    engine.multi_step = MultiStepWindow(4)
    try:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        engine.add_request("first", engine.check_request(engine.tokenizer.encode("hello"), params))
        engine.step()  # opens the window: "first" is admitted
        engine.add_request("second", engine.check_request(engine.tokenizer.encode("world"), params))
        for _ in range(3):  # the window's other three steps
            engine.step()
            assert len(engine.scheduler.waiting) == 1
        engine.step()  # a new window admits it
        assert not engine.scheduler.waiting
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.multi_step = MultiStepWindow(1)
