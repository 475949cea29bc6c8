"""Start-up time of the runtime: random weights (`--load-format dummy`) vs the same model read from disk.

    python -m bench.model_cache_bench                       # qwen2.5-0.5b shapes, float32 (about 2 GB)
    python -m bench.model_cache_bench --preset tiny         # a smoke run in seconds

A model cache (spec.model.cache) turns a pod's start into "read the weights from a mounted folder"
instead of "download them, then read them". This measures the two ends a pod can see without the
network: the dummy start (no weight I/O at all, the floor) and the start from a real folder on disk
(what a pod on a filled cache does). Both are the real server process, timed from launch until
/health answers 200 and /v1/models lists the model; the runtime's own "loading took" figure is read
from its log. A download adds size / bandwidth on top of the folder start, on every start, without
a cache. Runs alternate (dummy, folder, dummy, folder...) so a noisy machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

from bench.servers import SERVED_NAME, Server, ServerSpec, free_port

_LOADING_TOOK = re.compile(r"loading took ([0-9.]+) s")


def _spec(model_dir: Path, port: int, load_format: str, dtype: str) -> ServerSpec:
    argv = [sys.executable, "-m", "bowline_runtime", "serve", "--model", str(model_dir), "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", dtype,
            "--load-format", load_format, "--max-num-seqs", "4", "--max-model-len", "512", "--log-level", "info"]
    return ServerSpec(f"bowline-{load_format}", argv, {}, start_timeout_s=900)


def _start_once(model_dir: Path, load_format: str, dtype: str, log_path: Path) -> dict[str, float | None]:
    port = free_port()
    server = Server(_spec(model_dir, port, load_format, dtype), port, log_path)
    try:
        wall = server.wait_ready()
    finally:
        server.stop()
    match = _LOADING_TOOK.search(log_path.read_text(errors="replace"))
    return {"ready_s": wall, "loading_took_s": float(match.group(1)) if match else None}


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(preset: str, dtype: str, repeats: int, workdir: Path) -> dict[str, object]:
    from bowline_runtime.tools.tiny_model import build_tiny_model

    config_only = build_tiny_model(workdir / "config-only", preset=preset, config_only=True)
    with_weights = build_tiny_model(workdir / "weights", preset=preset, config_only=False)
    runs: dict[str, list[dict[str, float | None]]] = {"dummy": [], "folder": []}
    for i in range(repeats):
        runs["dummy"].append(_start_once(config_only, "dummy", dtype, workdir / f"dummy-{i}.log"))
        runs["folder"].append(_start_once(with_weights, "auto", dtype, workdir / f"folder-{i}.log"))
    median = {k: statistics.median(r["ready_s"] for r in v) for k, v in runs.items()}  # type: ignore[misc]
    return {"preset": preset, "dtype": dtype, "repeats": repeats, "weights_bytes": _folder_bytes(with_weights),
            "runs": runs, "median_ready_s": median, "folder_over_dummy": median["folder"] / median["dummy"]}


def report(result: dict[str, object]) -> str:
    median = result["median_ready_s"]
    assert isinstance(median, dict)
    lines = [f"Start-up, preset {result['preset']} ({result['dtype']}, weights {int(result['weights_bytes']) / 2**30:.2f} GiB), "
             f"median of {result['repeats']}:",
             "| start | ready after (s) |", "| --- | --- |",
             f"| `--load-format dummy` (no weight I/O) | {median['dummy']:.1f} |",
             f"| weights from a folder on disk (a filled cache) | {median['folder']:.1f} |",
             f"folder / dummy: {result['folder_over_dummy']:.2f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen2.5-0.5b", help="tiny-model builder preset (default: a 0.5B model, ~2 GB in float32)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bowline-cache-bench-") as tmp:
        result = run(args.preset, args.dtype, args.repeats, Path(tmp))
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
