"""POST /v1/chat/completions: messages → chat template → engine → message (or a stream of deltas)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from bowline_runtime.api import openapi
from bowline_runtime.api.chat_output import ChatOutputProcessor, make_output_processor, prepare_params
from bowline_runtime.api.dispatch import run_call
from bowline_runtime.api.generation import Generation, select_best
from bowline_runtime.api.logprobs import chat_logprobs
from bowline_runtime.api.prompts import chat_prompt_ids
from bowline_runtime.api.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatMessage,
    ChatResponseMessage,
    DeltaMessage,
    PromptTokensDetails,
    UsageInfo,
    random_id,
    stream_usage,
)
from bowline_runtime.api.sampling import build_sampling_params, check_logprobs, check_stream_compatible
from bowline_runtime.api.state import ServerState, get_state
from bowline_runtime.api.vision_prompts import image_chat_inputs, request_image_urls
from bowline_runtime.engine.outputs import RequestOutput
from bowline_runtime.engine.request_checks import check_request
from bowline_runtime.engine.sampling_params import SamplingParams

router = APIRouter()


def _echo_text(req: ChatCompletionRequest) -> str:
    """vLLM's chat `echo`: the reply starts with the last message when that message is the assistant's."""
    if not req.echo or not req.messages or isinstance(req.messages[0], int):
        return ""
    last = req.messages[-1]
    assert isinstance(last, ChatMessage)
    return (last.text() or "") if last.role == "assistant" else ""


class ChatCall:
    """Everything one chat request needs after validation, shared by the streaming and plain paths."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest, prompt_ids: list[int], params: SamplingParams) -> None:
        self.state = state
        self.req = req
        self.prompt_ids = prompt_ids
        self.params = params
        self.top_logprobs = params.logprobs
        self.echo = _echo_text(req)
        self.id = random_id("chatcmpl")
        self.created = int(time.time())
        self.processors: list[ChatOutputProcessor] = [
            make_output_processor(req, state.engine.tokenizer, state.config, prompt_ids) for _ in range(params.n)
        ]

    def _logprobs(self, entries):
        if self.top_logprobs is None or entries is None:
            return None
        return chat_logprobs(entries, self.top_logprobs, self.state.token_texts)

    def response(self, gen: Generation) -> ChatCompletionResponse:
        final = gen.latest[0]
        assert final is not None
        choices = []
        chosen = select_best(final.outputs, self.params)
        for out in chosen:
            proc = self.processors[out.index]
            parts = proc.final(out.text, out.token_ids)
            content = parts.content if not self.echo else self.echo + (parts.content or "")
            message = ChatResponseMessage(
                content=content,
                reasoning_content=parts.reasoning_content,
                tool_calls=parts.tool_calls,
                prompt_token_ids=self.prompt_ids if self.req.return_token_ids else None,
                completion_token_ids=list(out.token_ids) if self.req.return_token_ids else None,
            )
            choices.append(
                ChatCompletionChoice(
                    index=out.index,
                    message=message,
                    logprobs=self._logprobs(out.logprobs),
                    finish_reason=proc.finish_reason(out.finish_reason),
                    stop_reason=out.stop_reason,
                )
            )
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.params.lora_name or self.state.model_name, choices=choices,
            usage=self.usage(chosen, final.num_cached_tokens),
        )

    def usage(self, outputs, cached_tokens: int = 0) -> UsageInfo:
        completion = sum(len(o.token_ids) for o in outputs)
        usage = UsageInfo.of(len(self.prompt_ids), completion)
        if self.state.config.enable_prompt_tokens_details:
            usage.prompt_tokens_details = PromptTokensDetails(cached_tokens=cached_tokens)
        return usage

    def _chunk(self, choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.params.lora_name or self.state.model_name, choices=choices, usage=usage
        ).model_dump_json()

    async def events(self, gen: Generation, first: tuple[int, RequestOutput] | None) -> AsyncIterator[str]:
        """The chunks: a role chunk per choice, then text deltas, a finish per choice, then usage if asked."""
        n = self.params.n
        include_usage, continuous = stream_usage(self.req.stream_options)
        since = gen.arrival_time
        for i in range(n):
            delta = DeltaMessage(
                role="assistant",
                content=self.echo,
                prompt_token_ids=self.prompt_ids if self.req.return_token_ids else None,
            )
            yield self._chunk([ChatCompletionStreamChoice(index=i, delta=delta, arrival_time=time.time() - since)])
        prev_text = [""] * n
        sent_ids = [0] * n
        sent_lps = [0] * n
        done = [False] * n
        outputs = []
        cached = 0
        async for _, snap in gen.starting_with(first):
            cached = snap.num_cached_tokens
            if self.params.use_beam_search and not snap.finished:
                continue  # beams are re-ranked until the end: only the final ones are a stable answer
            outputs = select_best(snap.outputs, self.params) if snap.finished else snap.outputs
            for out in outputs:
                i = out.index
                if done[i]:
                    continue
                proc = self.processors[i]
                finished = out.finish_reason is not None
                parts = proc.delta(prev_text[i], out.text, out.token_ids[sent_ids[i] :], finished=finished)
                prev_text[i] = out.text
                if parts.is_empty() and not finished:
                    continue  # nothing visible yet (partial character or a stop string being matched)
                new_ids = out.token_ids[sent_ids[i] :]
                sent_ids[i] = len(out.token_ids)
                lps = None
                if out.logprobs is not None:
                    lps = self._logprobs(out.logprobs[sent_lps[i] :])
                    sent_lps[i] = len(out.logprobs)
                choice = ChatCompletionStreamChoice(
                    index=i,
                    delta=DeltaMessage(
                        content=parts.content,
                        reasoning_content=parts.reasoning_content,
                        tool_calls=parts.tool_calls,
                        completion_token_ids=new_ids if self.req.return_token_ids else None,
                    ),
                    logprobs=lps,
                    finish_reason=proc.finish_reason(out.finish_reason) if finished else None,
                    stop_reason=out.stop_reason if finished else None,
                    arrival_time=time.time() - since,
                )
                done[i] = finished
                yield self._chunk([choice], self.usage(outputs, cached) if continuous else None)
        if include_usage:
            yield self._chunk([], self.usage(outputs, cached))


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={**openapi.stream_or_json(ChatCompletionResponse), **openapi.GENERATION},
)
async def create_chat_completion(body: ChatCompletionRequest, raw_request: Request) -> Response:
    state = get_state(raw_request)
    engine = state.require_engine()
    lora_name = state.check_model(body.model)
    limits = state.limits
    assert limits is not None
    logprobs = None
    if body.logprobs:
        logprobs = body.top_logprobs or 0
        check_logprobs(logprobs, limits, "top_logprobs" if body.top_logprobs else "logprobs")
    images = None
    if request_image_urls(body):  # fetched, decoded and expanded by the model's processor (api/vision_prompts.py)
        prompt_ids, images = await image_chat_inputs(state, body, engine.tokenizer)
    else:  # rendering and tokenising a long conversation takes seconds: off the event loop
        prompt_ids = await asyncio.to_thread(chat_prompt_ids, body, engine.tokenizer, state.chat_template)
    params = build_sampling_params(body, limits, max_tokens=body.output_limit, logprobs=logprobs)
    params = prepare_params(body, params, prompt_ids, engine.tokenizer, state.config)
    params.lora_name = lora_name
    check_stream_compatible(body, params)
    # The engine's rule, applied here so a refusal is a 400 before any header is sent.
    check_request(
        prompt_ids,
        params,
        limits.request_limits,
        "prompt_token_ids" if body.prompt_token_ids is not None else "messages",
        "top_logprobs" if body.top_logprobs else "logprobs",
    )
    call = ChatCall(state, body, prompt_ids, params)
    return await run_call(state, raw_request, call, [prompt_ids], stream=body.stream, images=images)
