"""The transformers baselines, timed in-process: `generate()` one request at a time, and as a static padded batch.

They answer "what does a plain transformers deployment give on this model and machine": the sequential
run is the engine's yardstick (the engine at concurrency 16 must beat it 4x), the static batch shows what
batching without a scheduler buys. Same requests as the servers get (token-id prompts, exact output
lengths: `min_new_tokens == max_new_tokens` keeps EOS from ending a request early), greedy, float32.

Token timing comes from a logits processor, which runs once per decode step right after the forward
pass and before the token is chosen; its timestamps are the token times to within the sampling cost.
A static batch runs until its longest request is done and pads the rest: throughput counts only each
request's own tokens over the whole wall time, so the padding's cost shows there; a request's own
latencies end at its own last token, as a streaming static-batch server would deliver it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bench.loadgen import RequestRecord, RequestSpec


class _StepClock:
    """A logits processor that only records when each step's logits were ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        return scores


@dataclass(slots=True)
class HFModel:
    """A loaded model plus what `generate` needs: kept loaded across points so loading is never timed."""

    model: object
    pad_id: int

    @classmethod
    def load(cls, model_dir: str, threads: int | None = None) -> HFModel:
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.eval()
        pad = model.config.pad_token_id
        return cls(model=model, pad_id=int(pad if pad is not None else 0))

    def _generate(self, prompts: list[list[int]], new_tokens: int) -> list[float]:
        """Left-padded greedy generation of exactly `new_tokens`; returns each step's timestamp."""
        from transformers import LogitsProcessorList

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        clock = _StepClock()
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
                logits_processor=LogitsProcessorList([clock]),
            )
        return clock.times

    def warmup(self) -> None:
        """One small generation, so the first timed request does not pay for lazy initialisation."""
        self._generate([[300 + i for i in range(16)]], 4)


def run_sequential(hf: HFModel, specs: list[RequestSpec]) -> tuple[list[RequestRecord], float]:
    """Each request alone, one after another: a one-request-at-a-time server with no queueing."""
    records = []
    start = time.perf_counter()
    for spec in specs:
        t0 = time.perf_counter()
        times = hf._generate([spec.prompt_ids], spec.max_tokens)
        records.append(_record(spec, t0, times, spec.max_tokens))
    return records, time.perf_counter() - start


def run_static_batch(hf: HFModel, specs: list[RequestSpec], batch_size: int) -> tuple[list[RequestRecord], float]:
    """Requests in arrival order, `batch_size` at a time, each batch padded and run to its longest output.

    That is the closed-loop picture with `batch_size` users: the next batch starts when the last one
    is done, so its requests' TTFT is measured from their batch's start.
    """
    records = []
    start = time.perf_counter()
    for i in range(0, len(specs), batch_size):
        group = specs[i:i + batch_size]
        steps = max(s.max_tokens for s in group)
        t0 = time.perf_counter()
        times = hf._generate([s.prompt_ids for s in group], steps)
        for spec in group:
            records.append(_record(spec, t0, times, spec.max_tokens))
    return records, time.perf_counter() - start


def _record(spec: RequestSpec, t0: float, step_times: list[float], tokens: int) -> RequestRecord:
    """A RequestRecord from step timestamps: token k was ready at step_times[k]."""
    own = step_times[:tokens]
    rec = RequestRecord(prompt_tokens=len(spec.prompt_ids), output_tokens=len(own))
    rec.ttft = own[0] - t0
    rec.itls = [b - a for a, b in zip(own, own[1:], strict=False)]
    rec.e2e = own[-1] - t0
    return rec
