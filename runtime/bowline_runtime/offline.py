"""Offline inference in Python: `from bowline_runtime import LLM, SamplingParams`, as vLLM's and
FastDeploy's `LLM(...).generate` are used beside their servers.

`LLM` owns a synchronous engine in this process (no HTTP, no event loop) and puts every prompt of
a call into it at once, so the continuous-batching scheduler packs them exactly as it packs
concurrent server requests: the same prompts give the server's greedy tokens. `.chat` renders
conversations with the same chat template code the server uses. Results are vLLM-shaped
`RequestOutput`s, in the order of the prompts.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bowline_runtime.config import DType, EngineConfig
from bowline_runtime.engine.outputs import OutputAccumulator, TokenLogprob
from bowline_runtime.engine.sampling_params import SamplingParams as EngineSamplingParams

# Batches at least this long show a progress bar unless use_tqdm says otherwise.
PROGRESS_BAR_MIN_PROMPTS = 8


@dataclass(slots=True)
class SamplingParams(EngineSamplingParams):
    """The engine's sampling parameters with vLLM's offline default of 16 new tokens
    (`max_tokens=None`: up to the context limit)."""

    max_tokens: int | None = 16


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence (vLLM's CompletionOutput fields)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: str | int | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """One prompt's result (vLLM's RequestOutput fields)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0


@dataclass(slots=True)
class _Pending:
    prompt: str | None
    prompt_token_ids: list[int]
    params: EngineSamplingParams
    accumulator: OutputAccumulator = field(default_factory=OutputAccumulator)


class _SteppedEngine:
    """Beam search's view of the synchronous engine (engine/beam_search.py drives an async engine):
    `generate` adds its request and steps the engine whenever it has nothing to hand out, so the
    one-token requests of every live beam share each step, as they do on the server."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.eos_token_ids = engine.eos_token_ids
        self.max_model_len = engine.max_model_len
        self._queues: dict[str, collections.deque] = {}

    async def generate(self, prompt_token_ids, params, request_id=None, arrival_time=None):
        import asyncio

        request_id = request_id or uuid.uuid4().hex
        self.engine.add_request(request_id, self.engine.check_request(prompt_token_ids, params))
        queue: collections.deque = collections.deque()
        self._queues[request_id] = queue
        finished = False
        try:
            while not finished:
                await asyncio.sleep(0)  # the other beams add their requests before anyone steps
                if not queue:
                    for delta in self.engine.step():
                        target = self._queues.get(delta.request_id)
                        if target is not None:
                            target.append(delta)
                while queue and not finished:
                    delta = queue.popleft()
                    finished = delta.finished
                    yield delta
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.engine.abort_request(request_id)


def _best(outputs, params: EngineSamplingParams):
    """The n returned sequences: with best_of > n, the n most likely, re-indexed (as the server does)."""
    if len(outputs) <= params.n:
        return sorted(outputs, key=lambda o: o.index)
    return sorted(outputs, key=lambda o: o.cumulative_logprob, reverse=True)[: params.n]


class LLM:
    """A model loaded for offline generation. Any serve flag is a keyword (`max_num_seqs=...`,
    `enable_prefix_caching=True`, ...); the vLLM/FastDeploy names below are the common ones."""

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        dtype: DType = "auto",
        device: str = "auto",
        seed: int = 0,
        trust_remote_code: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        from bowline_runtime.api.prompts import load_chat_template
        from bowline_runtime.engine.llm_engine import LLMEngine

        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(engine_kwargs) - known)
        if unknown:
            raise TypeError(f"LLM() got unknown engine settings {unknown}; see `python -m bowline_runtime serve --help`")
        self.config = EngineConfig(
            model=str(model), tokenizer=tokenizer, tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len, dtype=dtype, device=device, seed=seed, trust_remote_code=trust_remote_code,
            **engine_kwargs,
        )
        self.engine = LLMEngine(self.config)
        self.chat_template = load_chat_template(self.config.chat_template)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    # --- generation ---------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | dict | Sequence[str | dict],
        sampling_params: EngineSamplingParams | Sequence[EngineSamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt is text, or `{"prompt": text}` /
        `{"prompt_token_ids": [...]}`; `sampling_params` is one for all or one per prompt."""
        items = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        tokenizer = self.engine.tokenizer
        resolved: list[tuple[str | None, list[int]]] = []
        for item in items:
            if isinstance(item, str):
                resolved.append((item, tokenizer.encode(item, add_special_tokens=True)))
            elif isinstance(item, dict) and "prompt_token_ids" in item:
                resolved.append((item.get("prompt"), list(item["prompt_token_ids"])))
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                resolved.append((item["prompt"], tokenizer.encode(item["prompt"], add_special_tokens=True)))
            else:
                raise TypeError(f"a prompt is a string or a dict with 'prompt' or 'prompt_token_ids', got {item!r}")
        return self._run(resolved, sampling_params, use_tqdm)

    def chat(
        self,
        messages: Sequence[dict] | Sequence[Sequence[dict]],
        sampling_params: EngineSamplingParams | Sequence[EngineSamplingParams] | None = None,
        *,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of `{"role", "content"}` dicts) or to a list
        of them, templated exactly as /v1/chat/completions templates them."""
        from bowline_runtime.api.errors import APIError
        from bowline_runtime.api.prompts import render_chat
        from bowline_runtime.api.protocol import ChatMessage, ChatTool

        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.engine.tokenizer
        parsed_tools = [ChatTool.model_validate(t) for t in tools] if tools else None
        resolved: list[tuple[str | None, list[int]]] = []
        for conversation in conversations:
            try:
                text = render_chat(
                    tokenizer,
                    [ChatMessage.model_validate(m) for m in conversation],
                    tools=parsed_tools,
                    request_template=chat_template,
                    server_template=self.chat_template,
                    template_kwargs=chat_template_kwargs,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                )
            except APIError as exc:
                raise ValueError(exc.message) from None
            resolved.append((text, tokenizer.encode(text, add_special_tokens=False)))
        return self._run(resolved, sampling_params, use_tqdm)

    def _run(self, prompts: list[tuple[str | None, list[int]]], sampling_params, use_tqdm: bool | None) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        per_prompt = (
            list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        )
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} sampling params for {len(prompts)} prompts")
        engine = self.engine
        pending: dict[str, _Pending] = {}
        beams: dict[str, _Pending] = {}
        order = []
        try:
            for (text, ids), params in zip(prompts, per_prompt, strict=True):
                prepared = engine.check_request(ids, params)  # RequestRejected (a ValueError) names the field
                request_id = str(next(self._ids))
                order.append(request_id)
                if params.use_beam_search:
                    beams[request_id] = _Pending(text, ids, params)
                    continue
                engine.add_request(request_id, prepared)
                pending[request_id] = _Pending(text, ids, params)
            results = self._drain(pending, use_tqdm)
        except BaseException:
            for request_id in order:
                engine.abort_request(request_id)
            raise
        if beams:
            results.update(self._beam_search(beams))
        return [results[request_id] for request_id in order]

    def _beam_search(self, beams: dict[str, _Pending]) -> dict[str, RequestOutput]:
        """Every beam-search prompt at once, by the server's algorithm (engine/beam_search.py)."""
        import asyncio

        from bowline_runtime.engine.beam_search import beam_search

        stepped = _SteppedEngine(self.engine)

        async def one(request_id: str, item: _Pending) -> RequestOutput:
            async for delta in beam_search(stepped, item.prompt_token_ids, item.params, request_id, time.time()):
                item.accumulator.add(delta)
            snap = item.accumulator.latest
            assert snap is not None
            return self._result(request_id, item, snap, ranked=True)

        async def run_all() -> list[RequestOutput]:
            return await asyncio.gather(*(one(rid, item) for rid, item in beams.items()))

        return {out.request_id: out for out in asyncio.run(run_all())}

    def _drain(self, pending: dict[str, _Pending], use_tqdm: bool | None) -> dict[str, RequestOutput]:
        show = use_tqdm if use_tqdm is not None else len(pending) >= PROGRESS_BAR_MIN_PROMPTS
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(total=len(pending), desc="Processed prompts", unit="prompt", file=sys.stderr, dynamic_ncols=True)
        results: dict[str, RequestOutput] = {}
        try:
            while len(results) < len(pending):
                for delta in self.engine.step():
                    item = pending.get(delta.request_id)
                    if item is None:
                        continue
                    snap = item.accumulator.add(delta)
                    if snap.finished:
                        results[delta.request_id] = self._result(delta.request_id, item, snap)
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return results

    @staticmethod
    def _result(request_id: str, item: _Pending, snap, ranked: bool = False) -> RequestOutput:
        """`ranked`: beam search's outputs, already best first and cut to n."""
        chosen = sorted(snap.outputs, key=lambda o: o.index) if ranked else _best(snap.outputs, item.params)
        outputs = [
            CompletionOutput(
                index=i, text=out.text, token_ids=list(out.token_ids),
                cumulative_logprob=out.cumulative_logprob if (out.logprobs is not None or ranked) else None,
                logprobs=out.logprobs, finish_reason=out.finish_reason, stop_reason=out.stop_reason,
            )
            for i, out in enumerate(chosen)
        ]
        return RequestOutput(
            request_id=request_id, prompt=item.prompt, prompt_token_ids=list(item.prompt_token_ids), outputs=outputs,
            finished=True, prompt_logprobs=snap.prompt_logprobs, num_cached_tokens=snap.num_cached_tokens,
        )

    def shutdown(self) -> None:
        """Stop tensor-parallel workers and free the model (also on leaving a `with LLM(...)` block)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
