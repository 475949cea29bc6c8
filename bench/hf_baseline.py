"""The transformers baselines, timed in-process: `generate()` one request at a time, and as a static padded batch.

They answer "what does a plain transformers deployment give on this model and machine": the sequential
run is the engine's yardstick (the engine at concurrency 16 must beat it 4x), the static batch shows what
batching without a scheduler buys. Same requests as the servers get (token-id prompts, exact output
lengths: `min_new_tokens == max_new_tokens` keeps EOS from ending a request early), greedy, on the
run's device and dtype. A config-only model folder (no weights: the real-size presets) gets weights
from transformers' own seeded random init of config.json, as the servers get dummy weights: output
lengths are forced, so the weights' values do not change the work.

Token timing comes from a logits processor, which runs once per decode step right after the forward
pass and before the token is chosen; its timestamps are the token times to within the sampling cost.
On an accelerator the processor first waits for the device (the device layer's `synchronize()`),
so a timestamp marks logits that exist, not a forward pass that was only queued.
A static batch runs until its longest request is done and pads the rest: throughput counts only each
request's own tokens over the whole wall time, so the padding's cost shows there; a request's own
latencies end at its own last token, as a streaming static-batch server would deliver it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.loadgen import RequestRecord, RequestSpec


class _StepClock:
    """A logits processor that only records when each step's logits were ready."""

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self.times: list[float] = []
        self._synchronize = synchronize

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._synchronize is not None:
            self._synchronize()
        self.times.append(time.perf_counter())
        return scores


def has_weights(model_dir: str | Path) -> bool:
    """Whether the folder holds a checkpoint (safetensors or PyTorch bin), not just config and tokenizer."""
    folder = Path(model_dir)
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


@dataclass(slots=True)
class HFModel:
    """A loaded model plus what `generate` needs: kept loaded across points so loading is never timed."""

    model: object
    pad_id: int
    device: torch.device
    synchronize: Callable[[], None] | None = None  # None on the CPU, which has no queue to wait for

    @classmethod
    def load(cls, model_dir: str, threads: int | None = None, device: str = "cpu", dtype: str = "float32",
             seed: int = 0) -> HFModel:
        """The folder's checkpoint, or seeded random weights when it is config-only, on `device` in `dtype`."""
        from bowline_runtime.devices import get_device
        from transformers import AutoConfig, AutoModelForCausalLM

        dev = get_device(device)
        torch_dtype = getattr(torch, dtype)
        if threads:
            torch.set_num_threads(threads)
        if has_weights(model_dir):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
        else:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch_dtype)
        target = dev.torch_device(0)
        model.to(target)
        model.eval()
        pad = model.config.pad_token_id
        sync = None if dev.type == "cpu" else dev.synchronize
        return cls(model=model, pad_id=int(pad if pad is not None else 0), device=target, synchronize=sync)

    def _generate(self, prompts: list[list[int]], new_tokens: int) -> list[float]:
        """Left-padded greedy generation of exactly `new_tokens`; returns each step's timestamp."""
        from transformers import LogitsProcessorList

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        clock = _StepClock(self.synchronize)
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
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
