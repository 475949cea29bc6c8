"""`python -m bench.roofline`: how close Bowline's batch-1 decode comes to the memory-bandwidth limit.

    python -m bench.roofline                                                        # bench preset, CPU, float32
    python -m bench.roofline --device cuda --dtype bfloat16 --model-preset qwen2.5-0.5b

A batch-1 decode step does little arithmetic per byte: it must read every weight once, so no step can
be faster than (weight bytes read per step) / (memory bandwidth). Three measurements, in process, on
`--device` through the runtime's device layer (its `synchronize()` brackets every timed region, so
queued accelerator work is never mistaken for finished work):

- Copy bandwidth: one large tensor (256 MiB on the CPU, 1 GiB on an accelerator: far past every
  cache) copied `--repeats` times. A copy reads and writes every byte, so bandwidth = 2 x bytes / time,
  the convention of STREAM's Copy. The fastest copy sets the bandwidth: noise from other work on the
  machine only ever slows a copy down, so the fastest is the closest to what the memory can do.
- Decode step time: the real engine (`LLMEngine`, dummy weights of the folder's shapes, the run's
  device and dtype), one request with a short prompt and `--output-tokens` forced tokens
  (`ignore_eos`). Each `engine.step()` is timed whole (scheduling, forward, sampling, detokenising:
  what a user waits for). The figure is the median over the decode steps, after an untimed warm-up
  request and the measured request's first few decode steps.
- The limit: the weight bytes a decode step reads / the copy bandwidth. That is every parameter except
  the input embedding table, of which a step reads one row; a tied LM head is that same table, read
  whole, and counts once. The KV cache and activations are left out (at the default 144-token context
  the KV cache is at most 1.8 % of the weights' bytes for `bench`, 0.2 % for `qwen2.5-0.5b`), so the
  limit is a slight underestimate and the fraction a slight one too.

fraction = limit / measured step time: 1.0 would be decode at the copy bandwidth. The run prints a
small markdown table and writes bench/results/<run id>/roofline.json, with the raw copy and step
times and the load average before and after (on a shared machine, compare runs only when it is low).
Never part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from bowline_runtime.devices import get_device
from bowline_runtime.tools.tiny_model import PRESETS

from bench.run import _git, _versions, ensure_model

RESULTS = Path("bench/results")
CPU_COPY_MIB = 256
ACCELERATOR_COPY_MIB = 1024
FIRST_PLAIN_ID = 300  # below this are the local tokenizers' special and byte tokens


# ---------------------------------------------------------------------------------------------
# The arithmetic (pure)


@dataclass(frozen=True, slots=True)
class WeightCount:
    """A model's parameter bytes (shared tensors once), its input embedding's, and whether the head shares it."""

    total_bytes: int
    input_embedding_bytes: int
    tied: bool


def decode_weight_bytes(count: WeightCount) -> int:
    """Bytes of weights one decode step reads: all but the input embedding, unless the LM head is that table.

    The input lookup reads one row per token, which is nothing against the rest; a tied head multiplies
    by the whole table, which `total_bytes` already holds exactly once.
    """
    return count.total_bytes if count.tied else count.total_bytes - count.input_embedding_bytes


def copy_bandwidth(num_bytes: int, seconds: float) -> float:
    """Bytes per second of a copy of `num_bytes`: it reads them and writes them, hence 2x."""
    return 2 * num_bytes / seconds


def bandwidth_limit_s(weight_bytes: int, bandwidth: float) -> float:
    """The shortest possible step: its weight bytes streamed once at `bandwidth` bytes per second."""
    return weight_bytes / bandwidth


def roofline_fraction(limit_s: float, measured_s: float) -> float:
    """How much of the bandwidth limit a measured step reaches: 1.0 at the limit, 0.5 at twice its time."""
    return limit_s / measured_s


def decode_step_times(step_times: list[float], skip: int) -> list[float]:
    """A request's per-step times without its first step (the prefill) and `skip` decode steps of warm-up."""
    return step_times[1 + skip:]


# ---------------------------------------------------------------------------------------------
# Measurements


def count_weights(model: torch.nn.Module) -> WeightCount:
    """The WeightCount of a transformers causal LM (named_parameters yields a tied tensor once)."""
    total = sum(p.numel() * p.element_size() for _, p in model.named_parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    return WeightCount(total, embedding.numel() * embedding.element_size(), tied)


def model_weight_count(model_dir: str, dtype: torch.dtype) -> WeightCount:
    """Count from the config alone, on the meta device: the checkpoint's layout, before any device packing.

    The CPU device repacks Linear weights for oneDNN (a tied head becomes a packed copy); the bytes a
    step must read are still the model's own.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    return count_weights(model)


def measure_copy(device, num_bytes: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` device-to-device copies of `num_bytes`, after two untimed ones."""
    target = device.torch_device(0)
    src = torch.ones(num_bytes, dtype=torch.uint8, device=target)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        device.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        device.synchronize()
        if i >= 2:  # the first copies fault the destination's pages in
            times.append(time.perf_counter() - t0)
    del src, dst
    return times


def _run_request(engine, request_id: str, prompt: list[int], tokens: int) -> list[float]:
    """Run one request alone to the end; returns each engine step's seconds, device synchronised."""
    from bowline_runtime.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0)
    engine.add_request(request_id, engine.check_request(prompt, params))
    times = []
    while engine.has_unfinished_requests():
        engine.device.synchronize()
        t0 = time.perf_counter()
        engine.step()
        engine.device.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def measure_decode(model_dir: str, device: str, dtype: str, prompt_tokens: int, output_tokens: int,
                   warmup_tokens: int, seed: int, load_format: str = "dummy", quantization: str = "auto",
                   ) -> tuple[list[float], float]:
    """Per-step seconds of one batch-1 request on the real engine, and the engine's start-up seconds.

    `load_format` auto and `quantization` serve a checkpoint's own (possibly quantized) weights
    (bench.quant_bench)."""
    from bowline_runtime.config import EngineConfig
    from bowline_runtime.engine.llm_engine import LLMEngine

    config = EngineConfig(
        model=model_dir, device=device, dtype=dtype, load_format=load_format, max_num_seqs=1,
        max_model_len=prompt_tokens + max(output_tokens, warmup_tokens) + 1, seed=seed, quantization=quantization,
    )
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    startup = time.perf_counter() - t0
    try:
        vocab = engine.sampler.vocab_size
        warm = [FIRST_PLAIN_ID + (7 * i) % (vocab - FIRST_PLAIN_ID) for i in range(prompt_tokens)]
        prompt = [FIRST_PLAIN_ID + (13 * i + 1) % (vocab - FIRST_PLAIN_ID) for i in range(prompt_tokens)]
        _run_request(engine, "warmup", warm, warmup_tokens)
        return _run_request(engine, "measured", prompt, output_tokens), startup
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------------------------------
# The run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or npu (the runtime's device layer)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--model-preset", default="bench", choices=list(PRESETS),
                   help="tiny-model builder preset (qwen2.5-0.5b: real shapes, config-only)")
    p.add_argument("--model-dir", help="the model folder (default models/<preset>; built if missing)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--output-tokens", type=int, default=128, help="forced output tokens of the measured request")
    p.add_argument("--warmup-tokens", type=int, default=16, help="output tokens of the untimed warm-up request")
    p.add_argument("--skip-steps", type=int, default=4, help="decode steps of the measured request left untimed")
    p.add_argument("--copy-mib", type=int, help=f"copy size (default {CPU_COPY_MIB} on cpu, "
                                                f"{ACCELERATOR_COPY_MIB} on accelerators)")
    p.add_argument("--repeats", type=int, default=10, help="timed copies")
    p.add_argument("--seed", type=int, default=0, help="seed of the dummy weights")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="roofline.json goes to <this>/<run id>/")
    args = p.parse_args(argv)
    if args.output_tokens < args.skip_steps + 2:
        p.error(f"--output-tokens must be at least --skip-steps + 2 ({args.skip_steps + 2}) to time any decode step")
    return args


def summarize(weights: WeightCount, copy_bytes: int, copy_times: list[float], steps: list[float]) -> dict:
    """The figures the report needs, from the raw measurements (pure)."""
    weight_bytes = decode_weight_bytes(weights)
    bandwidth = copy_bandwidth(copy_bytes, min(copy_times))
    step = statistics.median(steps)
    limit = bandwidth_limit_s(weight_bytes, bandwidth)
    return {
        "weight_bytes_per_step": weight_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "copy_bandwidth_median_bytes_per_s": copy_bandwidth(copy_bytes, statistics.median(copy_times)),
        "step_time_s": step,
        "step_time_min_s": min(steps),
        "limit_s": limit,
        "fraction": roofline_fraction(limit, step),
        "achieved_weight_bandwidth_bytes_per_s": weight_bytes / step,
        "decode_tokens_per_s": 1.0 / step,
    }


def markdown(result: dict) -> str:
    """A two-column table of the run's figures."""
    s = result["summary"]
    rows = [
        ("device, dtype", f"{result['device']}, {result['dtype']}"),
        ("model", f"`{result['model']}` ({result['model_preset']} preset, dummy weights)"),
        ("weights read per decode step", f"{s['weight_bytes_per_step'] / 1e6:.1f} MB"
                                         f"{' (tied LM head, counted once)' if result['weights']['tied'] else ''}"),
        ("copy bandwidth (2 x bytes / time, fastest copy)", f"{s['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s "
                                                           f"(median copy: {s['copy_bandwidth_median_bytes_per_s'] / 1e9:.1f})"),
        ("bandwidth limit per step", f"{s['limit_s'] * 1e3:.3f} ms"),
        (f"measured decode step (median of {result['decode']['steps_timed']})", f"{s['step_time_s'] * 1e3:.3f} ms "
                                                                                f"(fastest {s['step_time_min_s'] * 1e3:.3f})"),
        ("fraction of the limit reached", f"{s['fraction']:.3f}"),
        ("weight bytes / step time", f"{s['achieved_weight_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s"),
        ("load average, start -> end", f"{result['loadavg_start'][0]:.2f} -> {result['loadavg_end'][0]:.2f}"),
    ]
    lines = [f"## Roofline {result['run_id']}", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = get_device(args.device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    model_dir = args.model_dir or f"models/{args.model_preset}"
    ensure_model(model_dir, args.model_preset)
    run_id = time.strftime("%Y%m%d-%H%M%S")
    loadavg_start = os.getloadavg()

    weights = model_weight_count(model_dir, getattr(torch, args.dtype))
    copy_bytes = (args.copy_mib or (CPU_COPY_MIB if device.type == "cpu" else ACCELERATOR_COPY_MIB)) * 2**20
    print(f"copying {copy_bytes / 2**20:.0f} MiB x {args.repeats} on {device.type} ...", file=sys.stderr, flush=True)
    copy_times = measure_copy(device, copy_bytes, args.repeats)
    print(f"decoding {args.output_tokens} tokens at batch 1 ({model_dir}, {args.dtype}) ...", file=sys.stderr, flush=True)
    step_times, startup = measure_decode(model_dir, args.device, args.dtype, args.prompt_tokens, args.output_tokens,
                                         args.warmup_tokens, args.seed)
    steps = decode_step_times(step_times, args.skip_steps)

    result = {
        "run_id": run_id, "git": _git(), "device": device.type, "dtype": args.dtype, "model": model_dir,
        "model_preset": args.model_preset, "versions": _versions(None),
        "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg(),
        "weights": {**asdict(weights), "decode_bytes": decode_weight_bytes(weights)},
        "copy": {"bytes": copy_bytes, "repeats": args.repeats, "times_s": copy_times},
        "decode": {"prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
                   "skip_steps": args.skip_steps, "steps_timed": len(steps), "engine_startup_s": startup,
                   "step_times_s": step_times},
        "summary": summarize(weights, copy_bytes, copy_times, steps),
    }
    out_dir = args.results_dir / run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "roofline.json").write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"results: {out_dir / 'roofline.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
