"""An engine double with the AsyncEngine interface: scripted tokens, no model, instant.

It lets the HTTP layer's behaviour (validation, formatting, streaming, cleanup) be tested in
milliseconds; the real engine is exercised by tests/integration/api.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

from bowline_runtime.engine.errors import RequestRejected
from bowline_runtime.engine.outputs import CompletionOutput, EngineStats, RequestOutput, TokenLogprob
from bowline_runtime.engine.sampling_params import SamplingParams

MODEL = "tiny"


def wait_ready(client, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.01)
    raise AssertionError("app never became ready")


class FakeEngine:
    def __init__(self, tokenizer: Any, max_model_len: int = 256, delay: float = 0.0, script: str = " hello world the model serves") -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = len(tokenizer)
        self.eos_token_ids = {tokenizer.eos_token_id} - {None}
        self.delay = delay
        self.script = tokenizer.encode(script, add_special_tokens=False)
        self.calls: list[tuple[list[int], SamplingParams]] = []
        self.aborted: list[str] = []
        self.running = 0
        self.is_alive = True
        self.shut_down = False

    def stats(self) -> EngineStats:
        return EngineStats(num_running=self.running, num_waiting=0, num_free_blocks=10 - self.running, num_total_blocks=10)

    def has_unfinished_requests(self) -> bool:
        return self.running > 0

    async def shutdown(self) -> None:
        self.shut_down = True

    def _logprob(self, token_id: int, k: int) -> TokenLogprob:
        top = [(token_id, -0.25)] + [((token_id + j) % self.vocab_size, -0.25 - j) for j in range(1, k)]
        return TokenLogprob(token_id=token_id, logprob=-0.25, rank=1, top=top[:k])

    async def generate(self, prompt_token_ids, params: SamplingParams, request_id=None, arrival_time=None):
        self.calls.append((list(prompt_token_ids), params))
        if params.guided is not None and params.guided.regex == "(":
            raise RequestRejected("guided_regex does not compile: missing )", "guided_regex")
        limit = params.max_tokens or 6
        outs = [CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None) for i in range(params.num_candidates)]
        finished = False
        sent_ids, sent_text = 0, [0] * len(outs)
        self.running += 1
        try:
            for step in range(limit):
                if self.delay:
                    await asyncio.sleep(self.delay)
                for out in outs:
                    token_id = self.script[(step + out.index) % len(self.script)]
                    out.token_ids.append(token_id)
                    out.text = self.tokenizer.decode(out.token_ids)
                    out.cumulative_logprob -= 0.1 * (out.index + 1)
                    if out.logprobs is not None:
                        out.logprobs.append(self._logprob(token_id, max(params.logprobs or 0, 1)))
                finished = step == limit - 1
                if finished:
                    for out in outs:
                        out.finish_reason = "length"
                prompt_lps = None
                if params.prompt_logprobs is not None:
                    prompt_lps = [None] + [self._logprob(t, params.prompt_logprobs or 1) for t in prompt_token_ids[1:]]
                # Like the engine: each step carries only what it added; prompt data with the first.
                deltas = [
                    dataclasses.replace(
                        o, text="", token_ids=[], logprobs=None,
                        new_token_ids=o.token_ids[sent_ids:],
                        # detokenize=False (the server decodes), as the engine: token ids only.
                        new_text=o.text[sent_text[o.index] :] if params.detokenize else "",
                        new_logprobs=None if o.logprobs is None else o.logprobs[sent_ids:],
                    )
                    for o in outs
                ]
                sent_ids = step + 1
                sent_text = [len(o.text) for o in outs]
                yield RequestOutput(
                    request_id=request_id or "r",
                    prompt_token_ids=list(prompt_token_ids) if step == 0 else [],
                    outputs=deltas,
                    finished=finished,
                    prompt_logprobs=prompt_lps if step == 0 else None,
                )
        finally:
            self.running -= 1
            if not finished:
                self.aborted.append(request_id)


class BlockingFactory:
    """An engine factory that waits for `release` — the 'model is still loading' state."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.release = threading.Event()

    def __call__(self, config):
        self.release.wait(10)
        return self.engine
