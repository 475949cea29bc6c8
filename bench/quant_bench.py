"""`python -m bench.quant_bench`: the bench model served in float32, int8 weight-only and AWQ int4, same run.

    python -m bench.quant_bench                    # bench preset, CPU, c=1 and c=8, 32 requests a point
    python -m bench.quant_bench --quick            # smoke run: tiny preset, 4 requests, short lengths
    make bench-quant BENCH_QUANT_ARGS="--concurrency 1,8,16"

Three servers on the same seeded random weights: the float32 folder as it is, the same folder with
`--quantization int8` (weight-only, made at load), and the AWQ folder the tiny-model builder writes by
quantizing those weights (`--quantization auto` reads its config). They start once, are warmed up, and
the points run with the variants in a rotating order (as bench.run does), so noise from the machine's
other users does not land on one variant only. Reported as ratios against float32 at the same
concurrency.

Then, in process, the batch-1 decode step of each variant against its own bandwidth limit (as
bench.roofline measures it): the weight bytes a step reads shrink with the format (int8: 1 byte a
weight plus a float scale per output channel; AWQ: half a byte plus a float16 scale and a 4-bit
zero per group and output column), so the limit does too. Targets on the CPU: int8 >= 1.5x and
AWQ >= 2x float32's output tok/s at c=1. Results go to bench/results/<run id>/quant.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from bowline_runtime.devices import get_device

from bench import loadgen, roofline, servers
from bench.run import _git, _versions, ensure_model

RESULTS = Path("bench/results")
VARIANTS = ("float32", "int8", "awq")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quant_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", default=None, help="tiny-model builder preset (default bench; tiny with --quick)")
    p.add_argument("--concurrency", default="1,8", help="comma list of concurrency levels")
    p.add_argument("--requests", type=int, default=None, help="requests per point (default 32; 4 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny preset, 4 requests, lengths / 4, c=1,2")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--kv-gib", type=int, default=2)
    p.add_argument("--output-tokens", type=int, default=128, help="forced tokens of the in-process batch-1 request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.model_preset = args.model_preset or ("tiny" if args.quick else "bench")
    if args.quick:
        args.concurrency, args.output_tokens = "1,2", min(args.output_tokens, 16)
    args.requests = args.requests or (4 if args.quick else 32)
    return args


# ---------------------------------------------------------------------------------------------
# The arithmetic (pure)


def quantized_decode_bytes(float_bytes: int, linear_shapes: list[tuple[int, int]], variant: str,
                           group_size: int, half_head: int = 0) -> int:
    """Weight bytes a decode step reads when the decoder's Linear layers [(out, in), ...] are stored as
    `variant`; `float_bytes` is the float32 model's (bench.roofline.decode_weight_bytes). `half_head`:
    the LM head's weight count, which an AWQ checkpoint keeps in float16 (2 bytes each, not 4)."""
    weights = sum(o * i for o, i in linear_shapes)
    rest = float_bytes - 4 * weights
    if variant == "float32":
        return float_bytes
    if variant == "int8":
        return rest + weights + 4 * sum(o for o, _ in linear_shapes)
    if variant == "awq":
        group_entries = sum(o * (i // group_size) for o, i in linear_shapes)
        # float16 scale + 4-bit zero per group; the float16 LM head reads half its float32 bytes
        return rest - 2 * half_head + weights // 2 + group_entries * 2 + group_entries // 2
    raise ValueError(f"unknown variant {variant!r}")


def ratios(points: list[dict]) -> list[dict]:
    """Each point with `vs_float32`: its output tok/s over float32's at the same concurrency."""
    base = {p["concurrency"]: p["output_tokens_per_s"] for p in points if p["variant"] == "float32"}
    out = []
    for p in points:
        ref = base.get(p["concurrency"])
        out.append({**p, "vs_float32": p["output_tokens_per_s"] / ref if ref else None})
    return out


def schedule(variants: list[str], concs: list[int]) -> list[tuple[str, int]]:
    """(variant, concurrency) in run order, the variant order rotating from one level to the next."""
    out = []
    for turn, c in enumerate(concs):
        k = turn % len(variants)
        out += [(v, c) for v in variants[k:] + variants[:k]]
    return out


# ---------------------------------------------------------------------------------------------
# The run


def _linear_shapes(model_dir: str) -> list[tuple[int, int]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return [(m.out_features, m.in_features) for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]


def _model_dirs(preset: str) -> dict[str, str]:
    from bowline_runtime.tools.tiny_model import build_tiny_model

    float_dir, awq_dir = f"models/{preset}", f"models/{preset}-awq"
    ensure_model(float_dir, preset)
    if not Path(awq_dir, "config.json").exists():
        build_tiny_model(awq_dir, preset=preset, quantization="awq")
    return {"float32": float_dir, "int8": float_dir, "awq": awq_dir}


def _quantization_flag(variant: str) -> str:
    return "int8" if variant == "int8" else "auto"


def _server_spec(variant: str, model_dir: str, port: int, kv_bytes: int) -> servers.ServerSpec:
    argv = [sys.executable, "-m", "bowline_runtime", "serve", "--model", model_dir, "--served-model-name",
            servers.SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
            "--quantization", _quantization_flag(variant), "--kv-cache-memory", str(kv_bytes), "--log-level", "warning"]
    return servers.ServerSpec(f"bowline-{variant}", argv, {}, start_timeout_s=300)


def serve_points(args, dirs: dict[str, str], variants: list[str], out_dir: Path) -> list[dict]:
    vocab = ensure_model(dirs["float32"], args.model_preset)
    specs = loadgen.make_workload("short", args.requests, vocab, seed=args.seed, scale=0.25 if args.quick else 1.0)
    concs = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    running: dict[str, servers.Server] = {}
    points = []
    try:
        for v in variants:
            port = servers.free_port()
            running[v] = servers.start(_server_spec(v, dirs[v], port, args.kv_gib * 2**30), port, out_dir / f"{v}.log")
        for server in running.values():  # warm-up: every server runs a few requests at the top concurrency
            warm = [loadgen.RequestSpec(s.prompt_ids, min(s.max_tokens, 16)) for s in specs[: max(concs)]]
            loadgen.run_point_sync(server.base_url, servers.SERVED_NAME, warm, max(concs))
        for v, c in schedule(variants, concs):
            print(f"  {v} c={c} ...", file=sys.stderr, flush=True)
            records, wall = loadgen.run_point_sync(running[v].base_url, servers.SERVED_NAME, specs, c)
            points.append({"variant": v, "concurrency": c, **loadgen.summarize(records, wall)})
    finally:
        for server in running.values():
            server.stop()
    return ratios(points)


def step_rows(args, dirs: dict[str, str], variants: list[str]) -> list[dict]:
    device = get_device("cpu")
    copy_bytes = roofline.CPU_COPY_MIB * 2**20
    bandwidth = roofline.copy_bandwidth(copy_bytes, min(roofline.measure_copy(device, copy_bytes, 10)))
    float_bytes = roofline.decode_weight_bytes(roofline.model_weight_count(dirs["float32"], torch.float32))
    shapes = _linear_shapes(dirs["float32"])
    awq_config = json.loads(Path(dirs["awq"], "config.json").read_text())
    group = awq_config["quantization_config"]["group_size"]
    head = 0 if awq_config.get("tie_word_embeddings") else awq_config["vocab_size"] * awq_config["hidden_size"]
    rows = []
    for v in variants:
        times, _ = roofline.measure_decode(dirs[v], "cpu", "float32", 16, args.output_tokens, 8, args.seed,
                                           load_format="auto", quantization=_quantization_flag(v))
        step = statistics.median(roofline.decode_step_times(times, min(4, len(times) - 3)))
        weight_bytes = quantized_decode_bytes(float_bytes, shapes, v, group, head)
        limit = roofline.bandwidth_limit_s(weight_bytes, bandwidth)
        rows.append({"variant": v, "weight_bytes_per_step": weight_bytes, "step_time_s": step, "limit_s": limit,
                     "fraction": roofline.roofline_fraction(limit, step), "copy_bandwidth_bytes_per_s": bandwidth})
    return rows


def markdown(result: dict) -> str:
    lines = [f"## Quantized weights {result['run_id']} ({result['model_preset']} preset, CPU, float32 activations)",
             "", "| variant | c | output tok/s | vs float32 | TPOT p50 ms | errors |", "|---|---|---|---|---|---|"]
    for p in result["points"]:
        vs = f"{p['vs_float32']:.2f}x" if p["vs_float32"] is not None else "-"
        tpot = f"{p['tpot_p50_s'] * 1e3:.1f}" if p["tpot_p50_s"] is not None else "-"
        lines.append(f"| {p['variant']} | {p['concurrency']} | {p['output_tokens_per_s']:.1f} | {vs} | {tpot} | "
                     f"{p['errors']} |")
    lines += ["", "| variant | weights read per step | bandwidth limit | batch-1 step (median) | fraction |",
              "|---|---|---|---|---|"]
    for r in result["steps"]:
        lines.append(f"| {r['variant']} | {r['weight_bytes_per_step'] / 1e6:.1f} MB | {r['limit_s'] * 1e3:.3f} ms | "
                     f"{r['step_time_s'] * 1e3:.3f} ms | {r['fraction']:.3f} |")
    la0, la1 = result["loadavg_start"][0], result["loadavg_end"][0]
    return "\n".join(lines) + f"\n\nload average {la0:.2f} -> {la1:.2f}\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = [v for v in VARIANTS if v in {s.strip() for s in args.variants.split(",")}]
    if "float32" not in variants:
        variants.insert(0, "float32")  # the baseline every ratio needs
    dirs = _model_dirs(args.model_preset)
    run_id = time.strftime("%Y%m%d-%H%M%S")
    out_dir = args.results_dir / run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    loadavg_start = os.getloadavg()
    points = serve_points(args, dirs, variants, out_dir)
    steps = step_rows(args, dirs, variants)
    result = {"run_id": run_id, "git": _git(), "model_preset": args.model_preset, "versions": _versions(None),
              "requests": args.requests, "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg(),
              "points": points, "steps": steps}
    (out_dir / "quant.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out_dir / "quant.md").write_text(text)
    print(text)
    print(f"results: {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
