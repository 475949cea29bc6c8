"""The engine reports deltas: each step carries only what it added, and merged or accumulated deltas
lose nothing (a slow consumer still gets every token)."""

from __future__ import annotations

import asyncio

import pytest
from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.outputs import (
    CompletionOutput,
    OutputAccumulator,
    RequestOutput,
    TokenLogprob,
    merge_delta,
)
from bowline_runtime.engine.sampling_params import SamplingParams


def _lp(token_id: int) -> TokenLogprob:
    return TokenLogprob(token_id=token_id, logprob=-0.5, rank=1)


def _delta(ids: list[int], text: str, finish: str | None = None, first: bool = False) -> RequestOutput:
    out = CompletionOutput(
        index=0, new_token_ids=list(ids), new_text=text, new_logprobs=[_lp(t) for t in ids],
        cumulative_logprob=-0.5 * len(ids), finish_reason=finish,
    )
    return RequestOutput(
        "r", [1, 2, 3] if first else [], [out], finished=finish is not None,
        prompt_logprobs=[None, _lp(2), _lp(3)] if first else None,
    )


def test_accumulator_appends_deltas_and_keeps_the_prompt_from_the_first():
    acc = OutputAccumulator()
    snap = acc.add(_delta([5], "a", first=True))
    assert snap.outputs[0].token_ids == [5] and snap.outputs[0].text == "a"
    again = acc.add(_delta([6, 7], "bc"))
    assert again is snap  # one object, updated in place
    again = acc.add(_delta([8], "d", finish="stop"))
    out = again.outputs[0]
    assert out.token_ids == [5, 6, 7, 8] and out.text == "abcd"
    assert [lp.token_id for lp in out.logprobs] == [5, 6, 7, 8]
    assert out.new_token_ids == [8] and out.new_text == "d" and out.finish_reason == "stop"
    assert again.finished and again.prompt_token_ids == [1, 2, 3] and len(again.prompt_logprobs) == 3


def test_merged_deltas_hold_every_token():
    merged = merge_delta(_delta([5], "a", first=True), _delta([6], "b"))
    merged = merge_delta(merged, _delta([7, 8], "cd", finish="length"))
    out = merged.outputs[0]
    assert out.new_token_ids == [5, 6, 7, 8] and out.new_text == "abcd"
    assert [lp.token_id for lp in out.new_logprobs] == [5, 6, 7, 8]
    assert merged.finished and out.finish_reason == "length" and merged.prompt_token_ids == [1, 2, 3]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from bowline_runtime.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), device="cpu"))
    yield engine
    engine.shutdown()


def test_each_step_carries_only_its_new_tokens(llm):
    prompt = [300 + i for i in range(12)]
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=1, prompt_logprobs=0, n=2)
    llm.add_request("d", llm.check_request(prompt, params))
    steps: list[RequestOutput] = []
    while llm.has_unfinished_requests():
        steps.extend(o for o in llm.step() if o.request_id == "d")
    assert len(steps) == 9 and steps[-1].finished and not any(s.finished for s in steps[:-1])
    assert steps[0].prompt_token_ids == prompt and len(steps[0].prompt_logprobs) == len(prompt)
    assert all(s.prompt_token_ids == [] and s.prompt_logprobs is None for s in steps[1:])
    for index in range(2):
        outs = [next(o for o in s.outputs if o.index == index) for s in steps]
        assert all(len(o.new_token_ids) == 1 and len(o.new_logprobs) == 1 for o in outs)
        assert all(o.token_ids == [] and o.text == "" for o in outs)  # no cumulative copies
        ids = [t for o in outs for t in o.new_token_ids]
        text = "".join(o.new_text for o in outs)
        assert text == llm.tokenizer.decode(ids, skip_special_tokens=True)
        assert outs[-1].finish_reason == "length"


@pytest.mark.parametrize("in_process", [True, False], ids=["thread", "core-process"])
def test_a_slow_consumer_gets_every_token_in_merged_deltas(tiny_model_dir, in_process):
    if in_process:
        from bowline_runtime.engine.async_engine import AsyncEngine as Engine
    else:
        from bowline_runtime.engine.core_client import EngineCoreClient as Engine

    engine = Engine(EngineConfig(model=str(tiny_model_dir), device="cpu"))
    prompt = [400 + i for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    async def collect(pause_s: float) -> tuple[int, list[int], str]:
        messages, ids, text = 0, [], ""
        async for out in engine.generate(prompt, params):
            if messages == 0:
                await asyncio.sleep(pause_s)  # the engine runs on while this consumer dawdles
            messages += 1
            ids.extend(out.outputs[0].new_token_ids)
            text += out.outputs[0].new_text
        return messages, ids, text

    try:
        _, fast_ids, fast_text = asyncio.run(collect(0.0))
        slow_messages, slow_ids, slow_text = asyncio.run(collect(1.5))
    finally:
        asyncio.run(engine.shutdown())
    assert len(fast_ids) == 24
    assert slow_ids == fast_ids and slow_text == fast_text
    assert slow_messages < 24  # the queued steps were merged, not dropped
