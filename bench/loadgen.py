"""Closed-loop load generator over the OpenAI API, plus the pure statistics every system shares.

Why our own: the tools we would reach for (guidellm, inference-perf) pull a hub tokenizer or a
dataset at start-up, and nothing outside this machine is reachable. What we need is small:
`concurrency` workers each keep one streaming /v1/completions request in flight, the prompt goes as
token ids (so every system sees exactly the same prompt length, no tokenizer in the loop), and we
time the first streamed token, every later chunk, and the end. Output tokens come from the final
usage chunk (`stream_options.include_usage`), never from counting text, because a byte-level
tokenizer may stream a token as an empty string.

The statistics are pure functions over `RequestRecord`s, so the in-process transformers baselines
(`hf_baseline.py`) are summarised by the same code as the servers.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field

import httpx

# Token ids below this are the tiny tokenizer's special and byte tokens: prompts stay ordinary text.
_FIRST_PLAIN_ID = 300


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a workload: the prompt as token ids and the exact number of tokens to generate."""

    prompt_ids: list[int]
    max_tokens: int


@dataclass(slots=True)
class RequestRecord:
    """What one request measured. Times are seconds, relative to the request's own start."""

    prompt_tokens: int
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)  # gaps between streamed chunks after the first
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first: the decode speed one user sees."""
        if self.error or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# ---------------------------------------------------------------------------------------------
# Workloads


def log_uniform_lengths(rng: random.Random, n: int, low: int, high: int) -> list[int]:
    """`n` integers log-uniform in [low, high]: many short, some long, as chat traffic looks."""
    return [int(round(math.exp(rng.uniform(math.log(low), math.log(high))))) for _ in range(n)]


def make_workload(name: str, requests: int, vocab_size: int, seed: int = 0, scale: float = 1.0) -> list[RequestSpec]:
    """The named workload's requests, identical for every system given the same seed.

    `short`: 128 prompt -> 128 output tokens. `mixed`: prompt and output lengths drawn independently,
    log-uniform in 32..1024. `scale` shrinks lengths for --quick smoke runs.
    """
    rng = random.Random(f"{name}:{seed}")
    if name == "short":
        prompt_lens = [128] * requests
        output_lens = [128] * requests
    elif name == "mixed":
        prompt_lens = log_uniform_lengths(rng, requests, 32, 1024)
        output_lens = log_uniform_lengths(rng, requests, 32, 1024)
    else:
        raise ValueError(f"unknown workload {name!r}: choose short or mixed")
    specs = []
    for p, o in zip(prompt_lens, output_lens, strict=True):
        p, o = max(2, int(p * scale)), max(2, int(o * scale))
        specs.append(RequestSpec([rng.randrange(_FIRST_PLAIN_ID, vocab_size) for _ in range(p)], o))
    return specs


# ---------------------------------------------------------------------------------------------
# Statistics (pure)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: list[RequestRecord], wall_s: float) -> dict:
    """One setup's numbers: throughput over the wall time of the whole point, latencies per request.

    Output tokens/s counts only successful requests' tokens, over the time from the first request's
    start to the last one's end, so queueing and stragglers are in it, as a user of the server sees.
    """
    ok = [r for r in records if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    e2es = [r.e2e for r in ok if r.e2e is not None]
    itls = [g for r in ok for g in r.itls]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "first_error": next((r.error for r in records if r.error), None),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": out_tokens,
        "wall_s": wall_s,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "ttft_mean_s": mean(ttfts),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "tpot_mean_s": mean(tpots),
        "tpot_p50_s": percentile(tpots, 50),
        "tpot_p99_s": percentile(tpots, 99),
        "itl_mean_s": mean(itls),
        "itl_p99_s": percentile(itls, 99),
        "e2e_mean_s": mean(e2es),
        "e2e_p50_s": percentile(e2es, 50),
        "e2e_p99_s": percentile(e2es, 99),
    }


def record_to_dict(record: RequestRecord) -> dict:
    """A record for the JSON file, without the per-chunk gaps (they are summarised already)."""
    d = asdict(record)
    d.pop("itls")
    d["tpot"] = record.tpot
    return d


# ---------------------------------------------------------------------------------------------
# The client


def completion_body(model: str, spec: RequestSpec) -> dict:
    """The /v1/completions body: token-id prompt, exact length (ignore_eos), greedy, streamed with usage."""
    return {
        "model": model,
        "prompt": spec.prompt_ids,
        "max_tokens": spec.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_one(client: httpx.AsyncClient, base_url: str, model: str, spec: RequestSpec) -> RequestRecord:
    """Send one streamed completion and time it. Never raises: failures become `record.error`."""
    rec = RequestRecord(prompt_tokens=len(spec.prompt_ids))
    start = time.perf_counter()
    last: float | None = None
    try:
        async with client.stream("POST", f"{base_url}/completions", json=completion_body(model, spec)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {body[:300]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = f"in-stream error: {json.dumps(chunk['error'])[:300]}"
                    return rec
                now = time.perf_counter()
                if chunk.get("choices"):
                    if rec.ttft is None:
                        rec.ttft = now - start
                    elif last is not None:
                        rec.itls.append(now - last)
                    last = now
                if chunk.get("usage"):
                    rec.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
        rec.e2e = time.perf_counter() - start
        if rec.output_tokens == 0:
            rec.error = "no usage chunk (stream_options.include_usage ignored?)"
        elif rec.output_tokens != spec.max_tokens:
            rec.error = f"asked for {spec.max_tokens} tokens, got {rec.output_tokens} (ignore_eos ignored?)"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    return rec


async def run_point(base_url: str, model: str, specs: list[RequestSpec], concurrency: int) -> tuple[list[RequestRecord], float]:
    """Closed loop: `concurrency` workers each send the next request as soon as theirs finishes.

    Returns the records in request order and the wall time of the whole point.
    """
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(specs)):
        queue.put_nowait(i)
    records: list[RequestRecord | None] = [None] * len(specs)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0, connect=30.0), limits=limits) as client:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                records[i] = await stream_one(client, base_url, model, specs[i])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return [r for r in records if r is not None], wall


def run_point_sync(base_url: str, model: str, specs: list[RequestSpec], concurrency: int) -> tuple[list[RequestRecord], float]:
    """`run_point` from synchronous code (the harness's driver is synchronous)."""
    return asyncio.run(run_point(base_url, model, specs, concurrency))
