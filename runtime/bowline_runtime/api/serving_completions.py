"""POST /v1/completions: prompt(s) → engine → text choices (or a stream of text chunks).

A batch of prompts runs as one engine request per prompt; choice `index` is prompt_index * n + i,
as in OpenAI's API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from bowline_runtime.api import openapi
from bowline_runtime.api.dispatch import run_call
from bowline_runtime.api.errors import bad_request
from bowline_runtime.api.generation import Generation, select_best
from bowline_runtime.api.logprobs import completion_logprobs, merge_completion_logprobs
from bowline_runtime.api.prompts import Prompt, completion_prompts
from bowline_runtime.api.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    random_id,
    stream_usage,
)
from bowline_runtime.api.sampling import build_sampling_params, check_logprobs, check_stream_compatible
from bowline_runtime.api.state import ServerState, get_state
from bowline_runtime.engine.outputs import CompletionOutput, RequestOutput
from bowline_runtime.engine.request_checks import check_request
from bowline_runtime.engine.sampling_params import SamplingParams

router = APIRouter()


class CompletionCall:
    def __init__(self, state: ServerState, req: CompletionRequest, prompts: list[Prompt], params: SamplingParams) -> None:
        self.state = state
        self.req = req
        self.prompts = prompts
        self.params = params
        self.id = random_id("cmpl")
        self.created = int(time.time())

    def _prompt_logprobs(self, snap: RequestOutput, prompt: Prompt) -> CompletionLogprobs | None:
        if self.params.logprobs is None or not self.req.echo:
            return None
        entries = snap.prompt_logprobs or [None] * len(prompt.token_ids)
        return completion_logprobs(entries, prompt.token_ids, self.params.logprobs, self.state.token_texts)

    def _output_logprobs(self, out: CompletionOutput, start: int, offset: int) -> CompletionLogprobs | None:
        if self.params.logprobs is None or out.logprobs is None:
            return None
        entries = out.logprobs[start:]
        ids = out.token_ids[start : start + len(entries)]
        return completion_logprobs(entries, ids, self.params.logprobs, self.state.token_texts, offset)

    def usage(self, snaps: list[RequestOutput | None], chosen: list[list[CompletionOutput]] | None = None) -> UsageInfo:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        outs = chosen if chosen is not None else [s.outputs if s else [] for s in snaps]
        completion = sum(len(o.token_ids) for group in outs for o in group)
        return UsageInfo.of(prompt_tokens, completion)

    def response(self, gen: Generation) -> CompletionResponse:
        choices: list[CompletionChoice] = []
        chosen_all: list[list[CompletionOutput]] = []
        finished_at = time.time() - gen.arrival_time
        for p_index, (prompt, snap) in enumerate(zip(self.prompts, gen.latest, strict=True)):
            assert snap is not None
            chosen = select_best(snap.outputs, self.params)
            chosen_all.append(chosen)
            for out in chosen:
                prefix = prompt.text if self.req.echo else ""
                logprobs = self._output_logprobs(out, 0, len(prefix))
                echoed = self._prompt_logprobs(snap, prompt)
                if echoed is not None and logprobs is not None:
                    logprobs = merge_completion_logprobs(echoed, logprobs)
                choices.append(
                    CompletionChoice(
                        index=p_index * self.params.n + out.index,
                        text=prefix + out.text,
                        logprobs=logprobs,
                        finish_reason=out.finish_reason,
                        stop_reason=out.stop_reason,
                        prompt_token_ids=prompt.token_ids if self.req.return_token_ids else None,
                        completion_token_ids=list(out.token_ids) if self.req.return_token_ids else None,
                        arrival_time=finished_at,
                    )
                )
        return CompletionResponse(
            id=self.id, created=self.created, model=self.params.lora_name or self.state.model_name, choices=choices, usage=self.usage(gen.latest, chosen_all)
        )

    def _chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.params.lora_name or self.state.model_name, choices=choices, usage=usage
        ).model_dump_json()

    async def events(self, gen: Generation, first: tuple[int, RequestOutput] | None) -> AsyncIterator[str]:
        n = self.params.n
        include_usage, continuous = stream_usage(self.req.stream_options)
        keys = [(p, i) for p in range(len(self.prompts)) for i in range(n)]
        sent_text = dict.fromkeys(keys, 0)
        sent_ids = dict.fromkeys(keys, 0)
        offset = dict.fromkeys(keys, 0)
        started = dict.fromkeys(keys, False)
        done = dict.fromkeys(keys, False)
        async for p_index, snap in gen.starting_with(first):
            if self.params.use_beam_search and not snap.finished:
                continue  # beams are re-ranked until the end: only the final ones are a stable answer
            prompt = self.prompts[p_index]
            outputs = select_best(snap.outputs, self.params) if snap.finished else snap.outputs
            for out in outputs:
                key = (p_index, out.index)
                if done[key]:
                    continue
                text = ""
                logprobs = None
                prompt_ids = None
                if not started[key]:
                    started[key] = True
                    prompt_ids = prompt.token_ids if self.req.return_token_ids else None
                    if self.req.echo:
                        text = prompt.text
                        logprobs = self._prompt_logprobs(snap, prompt)
                        offset[key] = len(prompt.text)
                new_text = out.text[sent_text[key] :]
                finished = out.finish_reason is not None
                if not new_text and not finished and not text:
                    continue  # nothing visible yet (partial character or a stop string being matched)
                new_lps = self._output_logprobs(out, sent_ids[key], offset[key])
                if new_lps is not None:
                    logprobs = new_lps if logprobs is None else merge_completion_logprobs(logprobs, new_lps)
                    offset[key] += sum(len(t) for t in new_lps.tokens)
                new_ids = out.token_ids[sent_ids[key] :]
                sent_ids[key] = len(out.token_ids)
                sent_text[key] = len(out.text)
                done[key] = finished
                choice = CompletionChoice(
                    index=p_index * n + out.index,
                    text=text + new_text,
                    logprobs=logprobs,
                    finish_reason=out.finish_reason if finished else None,
                    stop_reason=out.stop_reason if finished else None,
                    prompt_token_ids=prompt_ids,
                    completion_token_ids=new_ids if self.req.return_token_ids else None,
                    arrival_time=time.time() - gen.arrival_time,
                )
                yield self._chunk([choice], self.usage(gen.latest) if continuous else None)
        if include_usage:
            yield self._chunk([], self.usage(gen.latest))


@router.post(
    "/v1/completions",
    response_model=None,
    responses={**openapi.stream_or_json(CompletionResponse), **openapi.GENERATION},
)
async def create_completion(body: CompletionRequest, raw_request: Request) -> Response:
    state = get_state(raw_request)
    engine = state.require_engine()
    lora_name = state.check_model(body.model)
    limits = state.limits
    assert limits is not None
    if body.suffix:
        raise bad_request("suffix (fill-in-the-middle) is not supported by this server", "suffix")
    check_logprobs(body.logprobs, limits, "logprobs")
    param = "prompt" if body.prompt_token_ids is None else "prompt_token_ids"
    # Tokenising a long prompt takes seconds: off the event loop, so /health and streams keep going.
    prompts = await asyncio.to_thread(completion_prompts, body, engine.tokenizer, limits.request_limits, param)
    prompt_logprobs = body.logprobs if (body.echo and body.logprobs is not None) else None
    params = build_sampling_params(
        body, limits, max_tokens=body.max_tokens, logprobs=body.logprobs, prompt_logprobs=prompt_logprobs
    )
    params.lora_name = lora_name
    check_stream_compatible(body, params)
    for prompt in prompts:  # the engine's rule, applied here so a refusal is a 400 before any header
        check_request(prompt.token_ids, params, limits.request_limits, param)
    call = CompletionCall(state, body, prompts, params)
    return await run_call(state, raw_request, call, [p.token_ids for p in prompts], stream=body.stream)
