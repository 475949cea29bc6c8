"""Guided-decoding benchmark (not a test): generation tokens/s with and without a JSON Schema
constraint at a fixed concurrency, against a real server.

Both runs send the same number of requests with the same max_tokens; the guided schema (an
unbounded array of nested objects) does not complete before max_tokens, and the free requests use
ignore_eos, so both produce the same token counts and the difference is the mask's cost.

    python bench/guided_bench.py                        # builds the `bench` preset, starts a server
    python bench/guided_bench.py --preset tiny
    python bench/guided_bench.py --url http://127.0.0.1:8000/v1 --model-name tiny
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "kind", "age", "tags"],
}
# minItems keeps the grammar open past max_tokens, so guided requests are exactly as long as free ones.
SCHEMA = {"type": "object", "properties": {"pets": {"type": "array", "items": ITEM, "minItems": 100}}, "required": ["pets"]}
MESSAGES = [{"role": "user", "content": "List some pets as JSON."}]


async def _run(client: openai.AsyncOpenAI, model: str, requests: int, concurrency: int, max_tokens: int, guided: bool) -> dict:
    gate = asyncio.Semaphore(concurrency)
    extra = {"guided_json": SCHEMA} if guided else {"ignore_eos": True}

    async def one(seed: int) -> int:
        async with gate:
            r = await client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=1.0, seed=seed, extra_body=extra
            )
            return r.usage.completion_tokens

    start = time.perf_counter()
    tokens = await asyncio.gather(*[one(s) for s in range(requests)])
    elapsed = time.perf_counter() - start
    return {"requests": requests, "tokens": sum(tokens), "seconds": round(elapsed, 3), "tokens_per_s": round(sum(tokens) / elapsed, 1)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model_dir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "bowline_runtime", "serve", "--model", str(model_dir), "--served-model-name", "bench",
           "--device", "cpu", "--port", str(port), "--max-num-seqs", "16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become healthy")


async def bench(url: str, model: str, args: argparse.Namespace) -> dict:
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    await _run(client, model, args.concurrency, args.concurrency, 16, True)  # warm-up, grammar compile
    await _run(client, model, args.concurrency, args.concurrency, 16, False)
    # Alternate the two kinds and keep each one's best round: other load on the host then biases neither.
    rounds = [[], []]
    for _ in range(args.rounds):
        for guided_run in (False, True):
            rounds[guided_run].append(await _run(client, model, args.requests, args.concurrency, args.max_tokens, guided_run))
    free, guided = (max(r, key=lambda x: x["tokens_per_s"]) for r in rounds)
    overhead = 1 - guided["tokens_per_s"] / free["tokens_per_s"]
    return {"concurrency": args.concurrency, "max_tokens": args.max_tokens, "unguided": free, "guided": guided,
            "overhead_pct": round(100 * overhead, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server's /v1 URL (else one is started)")
    parser.add_argument("--model-name", default="bench")
    parser.add_argument("--preset", default="bench", choices=["tiny", "bench"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.url:
        print(json.dumps(asyncio.run(bench(args.url, args.model_name, args)), indent=2))
        return
    from bowline_runtime.tools.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / args.preset, preset=args.preset)
        proc, url = _start_server(model_dir)
        try:
            result = asyncio.run(bench(url, "bench", args))
        finally:
            proc.terminate()
            proc.wait(30)
    result["preset"] = args.preset
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
