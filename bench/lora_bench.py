"""Multi-LoRA benchmark (not a test): output tokens/s of base requests mixed with 4 rank-16 adapters
against the base model alone, on one server, in the same run.

One server serves the model with `--enable-lora` and the adapters (random PEFT adapters written by
the tiny-model builder, on every projection); the base-only point and the mixed point (requests
cycle base, adapter 1, ..., adapter N) alternate, twice each, so noise from other processes lands on
both. The figure is mixed / base output tok/s (target >= 0.85).

    python -m bench.lora_bench                          # bench preset, c=8, 32 requests per point
    python -m bench.lora_bench --quick                  # smoke run: tiny sizes
    python -m bench.lora_bench --device cuda --dtype bfloat16 --model-preset qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

from bench import loadgen, servers
from bench.run import RESULTS, ensure_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.lora_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", default="bench")
    p.add_argument("--model-dir", help="default models/<preset> (built if missing)")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=32, help="requests per point")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-gib", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 8 requests, lengths / 8")
    return p.parse_args(argv)


async def _closed_loop(base_url: str, jobs: list[tuple[str, loadgen.RequestSpec]], concurrency: int):
    """Like loadgen.run_point, but each request names its own model (base or an adapter)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(jobs)):
        queue.put_nowait(i)
    records: list[loadgen.RequestRecord | None] = [None] * len(jobs)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0, connect=30.0)) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                records[i] = await loadgen.stream_one(client, base_url, jobs[i][0], jobs[i][1])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return [r for r in records if r is not None], wall


def mixed_models(names: list[str], n: int) -> list[str]:
    """Request i's model: base, adapter 1, ..., adapter N, base, ... (base is 1 in N+1)."""
    cycle = [servers.SERVED_NAME, *names]
    return [cycle[i % len(cycle)] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bowline_runtime.tools.tiny_lora import write_lora_adapter

    model_dir = args.model_dir or f"models/{args.model_preset}"
    vocab = ensure_model(model_dir, args.model_preset)
    requests = 8 if args.quick else args.requests
    specs = loadgen.make_workload("short", requests, vocab, seed=0, scale=1 / 8 if args.quick else 1.0)
    run_dir = RESULTS / f"lora-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory(prefix="bowline-lora-bench-") as tmp:
        names = [f"lora{i + 1}" for i in range(args.adapters)]
        paths = [write_lora_adapter(model_dir, Path(tmp) / n, rank=args.rank, alpha=2 * args.rank, seed=i + 1)
                 for i, n in enumerate(names)]
        port = servers.free_port()
        spec = servers.bowline_spec(model_dir, port, args.kv_gib << 30, 64, args.device, args.dtype)
        spec.argv += ["--enable-lora", "--lora-modules", *(f"{n}={p}" for n, p in zip(names, paths, strict=True)),
                      "--max-lora-rank", str(max(16, args.rank)), "--max-loras", str(args.adapters)]
        server = servers.start(spec, port, run_dir / "server.log")
        try:
            points = {"base": [servers.SERVED_NAME] * requests, "mixed": mixed_models(names, requests)}
            warm = list(zip(mixed_models(names, len(names) + 1), specs, strict=False))
            asyncio.run(_closed_loop(server.base_url, warm, args.concurrency))
            results: dict[str, list[dict]] = {"base": [], "mixed": []}
            for name in ("base", "mixed", "mixed", "base"):
                records, wall = asyncio.run(_closed_loop(server.base_url, list(zip(points[name], specs, strict=True)),
                                                         args.concurrency))
                results[name].append(loadgen.summarize(records, wall))
        finally:
            server.stop()
    tps = {k: sum(r["output_tokens_per_s"] for r in v) / len(v) for k, v in results.items()}
    errors = sum(r["errors"] for v in results.values() for r in v)
    ratio = tps["mixed"] / tps["base"] if tps["base"] else 0.0
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(
        {"args": vars(args), "points": results, "tok_s": tps, "ratio": ratio}, indent=2) + "\n")
    print(f"| c={args.concurrency} | base tok/s | {args.adapters} x rank-{args.rank} adapters + base tok/s | ratio |")
    print("|---|---|---|---|")
    print(f"| LoRA | {tps['base']:.1f} | {tps['mixed']:.1f} | {ratio:.2f}x (target >= 0.85x) |")
    print(f"results in {run_dir}" + (f"; {errors} requests failed" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
