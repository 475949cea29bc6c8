"""Vision benchmark (not a test): chat requests with one image each against the same requests without,
on one llava server, in the same run.

Each image request carries a different random picture at the vision tower's resolution (336 x 336
for the `bench` preset, as llava-1.5; 32 x 32 for `tiny`), so neither the prefix cache nor the
feature cache can help; both sets stream `--max-tokens` output tokens (ignore_eos) at
`--concurrency`. Reported per set: requests (= images) per second, TTFT mean and p50, output
tokens/s; then the image set's ratios against the text set.

    python bench/vision_bench.py                          # builds a llava around the `bench` preset
    python bench/vision_bench.py --preset tiny --requests 8   # smoke run
    python bench/vision_bench.py --url http://127.0.0.1:8000/v1 --model-name llava --image-size 336
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

TEXT = "Describe this picture in detail."


def random_png(seed: int, size: int) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _run(client: openai.AsyncOpenAI, model: str, images: list[str | None], concurrency: int, max_tokens: int) -> dict:
    """Stream every request; TTFT from send to the first content chunk."""
    gate = asyncio.Semaphore(concurrency)

    async def one(url: str | None) -> tuple[float, int]:
        content: list[dict] = [{"type": "text", "text": TEXT}]
        if url is not None:
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        async with gate:
            start = time.perf_counter()
            ttft = None
            tokens = 0
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )
            async for chunk in stream:
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.perf_counter() - start
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return ttft if ttft is not None else time.perf_counter() - start, tokens

    start = time.perf_counter()
    results = await asyncio.gather(*[one(url) for url in images])
    wall = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "requests": len(images),
        "seconds": round(wall, 3),
        "requests_per_s": round(len(images) / wall, 3),
        "ttft_mean_s": round(statistics.fmean(ttfts), 4),
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "output_tokens_per_s": round(tokens / wall, 1),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model_dir: Path, device: str, max_num_seqs: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "bowline_runtime", "serve", "--model", str(model_dir), "--served-model-name", "bench",
           "--device", device, "--port", str(port), "--max-num-seqs", str(max_num_seqs), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1500):
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become healthy")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an already running llava server's /v1 URL (default: build and start one)")
    p.add_argument("--model-name", default="bench")
    p.add_argument("--preset", default="bench", help="tiny-model preset of the language model (tiny: smoke)")
    p.add_argument("--image-size", type=int, help="picture side in pixels (default: the built model's tower size)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    proc = None
    size = args.image_size
    if args.url is None:
        from bowline_runtime.tools.tiny_llava import VISION_SHAPES, build_tiny_llava

        model_dir = Path(tempfile.mkdtemp(prefix="bowline-vision-bench-")) / f"llava-{args.preset}"
        build_tiny_llava(model_dir, preset=args.preset)
        size = size or VISION_SHAPES.get(args.preset, VISION_SHAPES["bench"]).image_size
        proc, url = _start_server(model_dir, args.device, max(args.concurrency, 8))
    else:
        url = args.url
        size = size or 336
    try:
        images = [random_png(1000 + i, size) for i in range(args.requests)]

        async def both() -> tuple[dict, dict]:
            client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
            await _run(client, args.model_name, [random_png(999, size), None], 2, 4)  # first-call costs off the clock
            text = await _run(client, args.model_name, [None] * args.requests, args.concurrency, args.max_tokens)
            vision = await _run(client, args.model_name, images, args.concurrency, args.max_tokens)
            return text, vision

        text, vision = asyncio.run(both())
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    result = {
        "concurrency": args.concurrency, "max_tokens": args.max_tokens, "image_size": size,
        "text": text, "images": vision,
        "images_per_s": vision["requests_per_s"],
        "ttft_ratio": round(vision["ttft_mean_s"] / text["ttft_mean_s"], 3),
        "tokens_per_s_ratio": round(vision["output_tokens_per_s"] / text["output_tokens_per_s"], 3),
    }
    print(f"c={args.concurrency}, {args.requests} requests, one {size}x{size} image each, {args.max_tokens} output tokens")
    print("| set | req/s | TTFT mean (s) | TTFT p50 (s) | output tok/s |")
    print("|---|---|---|---|---|")
    for name, row in (("text only", text), ("one image", vision)):
        print(f"| {name} | {row['requests_per_s']} | {row['ttft_mean_s']} | {row['ttft_p50_s']} | {row['output_tokens_per_s']} |")
    print(f"images/s {result['images_per_s']}; TTFT x{result['ttft_ratio']}, output tok/s x{result['tokens_per_s_ratio']} "
          "(images against text only)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
