"""Multi-step scheduling benchmark (not a test): generation tok/s with --num-scheduler-steps 1, 4
and 8 in one process, on the same loaded engine, rounds interleaved, plus the share of each step
spent in the scheduler (what multi-step can save here at most).

    python -m bench.multi_step_bench                          # bench preset, CPU, 16 prompts x 64 tokens
    python -m bench.multi_step_bench --preset tiny --prompts 4 --max-tokens 8 --rounds 1   # smoke run
    python -m bench.multi_step_bench --device cuda --dtype bfloat16 --preset qwen2.5-0.5b

Prints one JSON object: per step count, median tok/s over the rounds, the ratio to 1 step, and the
scheduler's share of step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

STEPS = (1, 4, 8)


def _timed(fn, totals: dict[str, float], key: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    return wrapper


def run(args: argparse.Namespace) -> dict:
    from bowline_runtime import LLM, SamplingParams
    from bowline_runtime.engine.multi_step import MultiStepWindow
    from bowline_runtime.tools.tiny_model import build_tiny_model

    model = args.model
    if model is None:
        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / args.preset, preset=args.preset))
    load_format = "dummy" if args.preset == "qwen2.5-0.5b" and args.model is None else "auto"
    llm = LLM(model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_seqs=max(args.prompts, 1), load_format=load_format)
    engine = llm.engine
    totals = {"schedule": 0.0, "step": 0.0}
    engine.scheduler.schedule = _timed(engine.scheduler.schedule, totals, "schedule")
    engine.step = _timed(engine.step, totals, "step")
    prompts = [f"request {i}: the model serves tokens on a cluster of nodes" for i in range(args.prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    results: dict[int, dict] = {n: {"tok_s": [], "schedule_share": []} for n in STEPS}
    for _ in range(args.rounds):
        for n in STEPS:
            engine.multi_step = MultiStepWindow(n, stream_outputs=True)
            totals.update(schedule=0.0, step=0.0)
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            results[n]["tok_s"].append(tokens / elapsed)
            results[n]["schedule_share"].append(totals["schedule"] / max(totals["step"], 1e-9))
    llm.shutdown()
    base = statistics.median(results[1]["tok_s"])
    report = {
        "model": args.model or args.preset, "device": args.device, "prompts": args.prompts, "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "steps": {
            str(n): {
                "tok_s": round(statistics.median(r["tok_s"]), 1),
                "vs_1_step": round(statistics.median(r["tok_s"]) / base, 3),
                "scheduler_share_of_step": round(statistics.median(r["schedule_share"]), 4),
            }
            for n, r in results.items()
        },
    }
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model folder (default: build --preset)")
    parser.add_argument("--preset", default="bench", choices=["tiny", "bench", "qwen2.5-0.5b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    print(json.dumps(run(parser.parse_args(argv)), indent=2))


if __name__ == "__main__":
    main()
