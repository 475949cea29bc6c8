"""Beam search over the async engine, the way vLLM's OpenAI server does it.

Each round asks the engine for one greedy step with the top 2·width alternatives of every live beam,
keeps the `width` best extensions by cumulative log-probability and retires beams that end. Beams of a
request share their prompt, so with --enable-prefix-caching most of each round is served from cache.
Final ranking uses cumulative_logprob / length**length_penalty (HF's convention).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from bowline_runtime.engine.errors import RequestRejected
from bowline_runtime.engine.outputs import CompletionOutput, OutputAccumulator, RequestOutput
from bowline_runtime.engine.sampling_params import SamplingParams

MAX_BEAM_WIDTH = 10


@dataclass(slots=True)
class Beam:
    tokens: list[int] = field(default_factory=list)
    logprob: float = 0.0
    finish_reason: str | None = None

    def score(self, length_penalty: float) -> float:
        return self.logprob / (max(1, len(self.tokens)) ** length_penalty)


def _cut_at_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    hits = [(i, s) for s in stops if s and (i := text.find(s)) != -1]
    if not hits:
        return text, None
    i, stop = min(hits)
    return (text[: i + len(stop)] if include else text[:i]), stop


async def _step(engine, tokens: list[int], params: SamplingParams) -> list[tuple[int, float]]:
    acc = OutputAccumulator()
    async for delta in engine.generate(tokens, params, request_id=uuid.uuid4().hex):
        acc.add(delta)
    assert acc.latest is not None
    lp = acc.latest.outputs[0].logprobs[0]
    return lp.top


async def beam_search(
    engine, prompt_ids: list[int], params: SamplingParams, request_id: str, arrival_time: float
) -> AsyncIterator[RequestOutput]:
    width = max(params.best_of or 0, params.n)
    if width > MAX_BEAM_WIDTH:
        raise RequestRejected(f"beam width (best_of/n) must be at most {MAX_BEAM_WIDTH}, got {width}", "best_of")
    eos = set(engine.eos_token_ids) | set(params.stop_token_ids)
    max_tokens = params.max_tokens or (engine.max_model_len - len(prompt_ids))
    step_params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * width, ignore_eos=True,
                                 lora_name=params.lora_name)
    beams = [Beam()]
    done: list[Beam] = []
    for _ in range(max_tokens):
        tops = await asyncio.gather(*(_step(engine, prompt_ids + b.tokens, step_params) for b in beams))
        candidates = [
            Beam(b.tokens + [tok], b.logprob + lp)
            for b, top in zip(beams, tops, strict=True)
            for tok, lp in top
        ]
        candidates.sort(key=lambda c: c.logprob, reverse=True)
        beams = []
        for cand in candidates:
            if cand.tokens[-1] in eos and not params.ignore_eos and len(cand.tokens) > params.min_tokens:
                cand.finish_reason = "stop"
                done.append(cand)
            elif len(beams) < width:
                beams.append(cand)
            if len(beams) == width and len(done) >= width:
                break
        if not beams:
            break
        # Stop when no live beam can still beat the worst of `width` finished ones.
        if len(done) >= width:
            done.sort(key=lambda b: b.score(params.length_penalty), reverse=True)
            if beams[0].score(params.length_penalty) <= done[width - 1].score(params.length_penalty):
                break
    for b in beams:
        b.finish_reason = b.finish_reason or "length"
    ranked = sorted(done + beams, key=lambda b: b.score(params.length_penalty), reverse=True)[: params.n]
    tokenizer = engine.tokenizer
    outputs = []
    for index, beam in enumerate(ranked):
        ids = [t for t in beam.tokens if not (t in eos and beam.finish_reason == "stop")]
        text = tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
        text, stop = _cut_at_stop(text, params.stop, params.include_stop_str_in_output)
        # generate() yields deltas: the ranked beams are one delta each, from nothing to the answer.
        outputs.append(
            CompletionOutput(
                index=index, new_text=text, new_token_ids=beam.tokens, cumulative_logprob=beam.logprob,
                finish_reason="stop" if stop else beam.finish_reason, stop_reason=stop,
            )
        )
    yield RequestOutput(request_id, list(prompt_ids), outputs, finished=True, arrival_time=arrival_time)
