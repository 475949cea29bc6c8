"""Text assembled by the server (api/detokenize.py) equals the text the engine decodes itself.

The server asks the engine for token ids only (detokenize=False) on requests without stop strings and
decodes them on its side; a user must not be able to tell: same text, same cut of a finishing EOS or
stop token, same bytes at the end of an incomplete character, for every output of n.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from bowline_runtime.api.detokenize import DeltaDetokenizer, decoded_by_server, engine_params, text_token_ids
from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.async_engine import AsyncEngine
from bowline_runtime.engine.errors import RequestRejected
from bowline_runtime.engine.outputs import CompletionOutput, OutputAccumulator
from bowline_runtime.engine.sampling_params import SamplingParams

PROMPTS = ["Hello, world!", "你好，世界", "混合 mixed 文本 text 🚀 ünïcode", "k"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = AsyncEngine(EngineConfig(model=str(tiny_model_dir), device="cpu"))
    yield eng
    asyncio.run(eng.shutdown())


async def final(engine, ids, params, server_side: bool):
    acc = OutputAccumulator()
    decoder = DeltaDetokenizer(engine.tokenizer, params, engine.eos_token_ids) if server_side else None
    async for delta in engine.generate(ids, engine_params(params) if server_side else params):
        if decoder is not None:
            decoder.fill(delta)
        acc.add(delta)
    return acc.latest


def both(engine, prompt, params):
    ids = engine.tokenizer.encode(prompt)

    async def go():
        return await final(engine, ids, params, False), await final(engine, ids, params, True)

    return asyncio.run(go())


def greedy_tokens(engine, prompt, n):
    ids = engine.tokenizer.encode(prompt)
    out = asyncio.run(final(engine, ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), False))
    return out.outputs[0].token_ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_plain_and_sampled_requests_read_the_same_either_side(engine, prompt):
    for params in (
        SamplingParams(temperature=0, max_tokens=24),
        SamplingParams(temperature=0.9, seed=7, max_tokens=24, n=2),
        SamplingParams(temperature=0, max_tokens=24, skip_special_tokens=False, ignore_eos=True),
    ):
        assert decoded_by_server(params)
        engine_side, server_side = both(engine, prompt, params)
        for a, b in zip(engine_side.outputs, server_side.outputs, strict=True):
            assert b.token_ids == a.token_ids
            assert b.text == a.text
            assert a.text  # the comparison is not between two empty strings


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_token_is_cut_or_kept_as_the_engine_does(engine, include):
    tokens = greedy_tokens(engine, PROMPTS[0], 8)
    stop_id = tokens[4]
    params = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id],
                            include_stop_str_in_output=include, skip_special_tokens=False)
    engine_side, server_side = both(engine, PROMPTS[0], params)
    a, b = engine_side.outputs[0], server_side.outputs[0]
    assert a.stop_reason == b.stop_reason == stop_id
    assert b.token_ids == a.token_ids and b.token_ids[-1] == stop_id
    assert b.text == a.text
    shown = b.token_ids if include else b.token_ids[:-1]
    assert b.text == engine.tokenizer.decode(shown, skip_special_tokens=False)


def test_a_finishing_eos_shows_no_text_unless_ignore_eos(engine):
    eos = min(engine.eos_token_ids)
    # EOS pushed to the top, held back by min_tokens: the output ends with it after 3 tokens.
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=3, logit_bias={eos: 100.0}, skip_special_tokens=False)
    engine_side, server_side = both(engine, PROMPTS[2], params)
    a, b = engine_side.outputs[0], server_side.outputs[0]
    assert a.token_ids[-1] == eos and a.finish_reason == "stop"
    assert b.token_ids == a.token_ids and b.text == a.text
    assert engine.tokenizer.decode([eos], skip_special_tokens=False) not in b.text


def test_requests_with_stop_strings_and_beam_search_stay_decoded_in_the_engine():
    assert not decoded_by_server(SamplingParams(stop=["\n"]))
    assert not decoded_by_server(SamplingParams(use_beam_search=True, n=2, temperature=0))
    assert engine_params(SamplingParams(stop=["x"])).detokenize
    assert not engine_params(SamplingParams()).detokenize
    with pytest.raises(RequestRejected, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)


def test_only_the_finishing_token_can_lose_its_text():
    params = SamplingParams(stop_token_ids=[9])
    eos = {2}
    out = CompletionOutput(index=0, new_token_ids=[5, 2, 7, 9], finish_reason="stop", stop_reason=9)
    assert text_token_ids(out, params, eos) == [5, 2, 7]
    assert text_token_ids(dataclasses.replace(out, finish_reason=None, stop_reason=None), params, eos) == [5, 2, 7, 9]
    eos_end = CompletionOutput(index=0, new_token_ids=[5, 2], finish_reason="stop")
    assert text_token_ids(eos_end, params, eos) == [5]
    assert text_token_ids(eos_end, SamplingParams(ignore_eos=True), eos) == [5, 2]
    length_end = CompletionOutput(index=0, new_token_ids=[5, 2], finish_reason="length")
    assert text_token_ids(length_end, params, eos) == [5, 2]
