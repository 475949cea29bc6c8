"""POST /generate: vLLM's native demo API (vllm/entrypoints/api_server.py), which the Ascend
document's "方式二" calls.

The body is `prompt`, `stream` and the sampling parameters by their vLLM names (max_tokens defaults
to 16, as vLLM's SamplingParams does); the answer is `{"text": [prompt + output, ...]}`, one entry
per returned sequence. Streaming sends the same object, cumulative, once per engine step, each
followed by a newline. Beam search returns every beam it kept (`best_of`, or `n` when larger), best
first by the completions API's ranking, so `best_of: 2` shows both candidates. Unknown fields are a
400 naming them: vLLM's `SamplingParams(**body)` would fail on them too, only with a 500.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ConfigDict, Field
from starlette.responses import StreamingResponse

from bowline_runtime.api import openapi
from bowline_runtime.api.dispatch import run_call
from bowline_runtime.api.errors import to_api_error
from bowline_runtime.api.generation import Generation, select_best
from bowline_runtime.api.protocol import ResponseModel, SamplingFields, random_id
from bowline_runtime.api.sampling import build_sampling_params, check_logprobs, check_stream_compatible
from bowline_runtime.api.state import ServerState, get_state
from bowline_runtime.api.streaming import SSEResponse
from bowline_runtime.engine.outputs import RequestOutput
from bowline_runtime.engine.request_checks import check_prompt, check_request
from bowline_runtime.engine.sampling_params import SamplingParams

router = APIRouter()

# vLLM's SamplingParams default: a /generate body without max_tokens gets 16 tokens, as there.
VLLM_DEFAULT_MAX_TOKENS = 16


class GenerateRequest(SamplingFields):
    """vLLM's /generate body. The sampling fields are the completions API's (same names, same checks)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    prompt: str = Field(..., description="the prompt text; the answer repeats it before each output")
    max_tokens: int | None = Field(VLLM_DEFAULT_MAX_TOKENS, ge=1, description="null: up to the context limit")
    logprobs: int | None = Field(None, ge=0)
    prompt_logprobs: int | None = Field(None, ge=0)


class GenerateResponse(ResponseModel):
    text: list[str]


class NDJSONResponse(SSEResponse):
    """Streams JSON objects one per line (vLLM's /generate framing); an error after the headers is
    one last line `{"error": {...}}`. Cleanup is SSEResponse's: it always runs."""

    def __init__(self, events: AsyncIterator[str], cleanup) -> None:
        self._events = events
        self._cleanup = cleanup
        StreamingResponse.__init__(self, self._body(), media_type="application/x-ndjson")

    async def _body(self) -> AsyncIterator[str]:
        try:
            async for payload in self._events:
                yield payload + "\n"
        except Exception as exc:  # noqa: BLE001 - headers are gone: report in-band
            yield to_api_error(exc).body().model_dump_json() + "\n"


class GenerateCall:
    def __init__(self, state: ServerState, req: GenerateRequest, params: SamplingParams) -> None:
        self.state = state
        self.req = req
        self.params = params
        self.id = random_id("generate")

    def texts(self, snap: RequestOutput) -> list[str]:
        outputs = snap.outputs
        if snap.finished and not self.params.use_beam_search:
            outputs = select_best(outputs, self.params)
        return [self.req.prompt + out.text for out in sorted(outputs, key=lambda o: o.index)]

    def response(self, gen: Generation) -> GenerateResponse:
        snap = gen.latest[0]
        assert snap is not None
        return GenerateResponse(text=self.texts(snap))

    async def events(self, gen: Generation, first: tuple[int, RequestOutput] | None) -> AsyncIterator[str]:
        async for _, snap in gen.starting_with(first):
            if self.params.use_beam_search and not snap.finished:
                continue
            yield json.dumps({"text": self.texts(snap)}, ensure_ascii=False)


def generate_sampling_params(body: GenerateRequest, state: ServerState) -> SamplingParams:
    """The engine's parameters for a /generate body: the completions API's rules, plus vLLM's
    beam-search convention that every kept beam (best_of of them) comes back."""
    limits = state.limits
    assert limits is not None
    check_logprobs(body.logprobs, limits, "logprobs")
    check_logprobs(body.prompt_logprobs, limits, "prompt_logprobs")
    params = build_sampling_params(
        body, limits, max_tokens=body.max_tokens, logprobs=body.logprobs, prompt_logprobs=body.prompt_logprobs
    )
    if params.use_beam_search and params.num_candidates > params.n:
        params.n = params.num_candidates
    check_stream_compatible(body, params)
    return params


@router.post(
    "/generate",
    response_model=None,
    responses={200: {"model": GenerateResponse, "description": "the prompt followed by each output"}, **openapi.GENERATION},
)
async def generate(body: GenerateRequest, raw_request: Request) -> Response:
    state = get_state(raw_request)
    engine = state.require_engine()
    state.check_model(body.model)
    params = generate_sampling_params(body, state)
    assert state.limits is not None
    request_limits = state.limits.request_limits
    ids = await asyncio.to_thread(engine.tokenizer.encode, body.prompt, add_special_tokens=True)
    check_prompt(ids, request_limits, "prompt")
    check_request(ids, params, request_limits, "prompt")
    call = GenerateCall(state, body, params)
    return await run_call(state, raw_request, call, [ids], stream=body.stream, stream_response=NDJSONResponse)
