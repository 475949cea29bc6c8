"""`python -m bench.spec_decode_bench`: speculative decoding against no speculation, same engine, same run.

    python -m bench.spec_decode_bench                 # bench preset, c=1 and c=8, k=4
    python -m bench.spec_decode_bench --quick         # smoke run: tiny preset, 2 requests, 16 tokens
    python -m bench.spec_decode_bench --tensor-parallel-size 2   # adds the drafts sharded over both ranks

Rows, on the preset's random weights and the `short` workload: no speculation, a copy-of-target draft
(accepts everything, but its k - 1 proposal forwards cost as much as the target's), a 2-layer draft (the
target's first two layers) and an oracle draft (free and always right: the recorded greedy
continuation), whose ratio is what one verify forward of k + 1 positions costs against k + 1 plain
steps, the check that verification is cheap. Then, on the `repetitive` workload (prompts whose
continuation repeats their text), a model of the same shapes built to copy its prompt
(tools.copying_model; random weights never repeat text, so n-gram lookup would find nothing to
accept): no speculation, n-gram prompt lookup, and a 2-layer draft (its first two layers, which hold
its whole copying circuit). Each row reports output tok/s, its ratio to the no-speculation row of the
same workload and concurrency, and the acceptance rate (accepted / drafted).
Greedy decoding, in process (LLMEngine), so the figures are the engine's, not HTTP's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.llm_engine import LLMEngine
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.tools import copying_model
from bowline_runtime.tools.copying_model import build_copying_model
from bowline_runtime.tools.tiny_model import PRESETS, build_draft_model, build_tiny_model

_REPEAT = "the model serves tokens on a cluster of nodes and every request streams text back to the client "
_SHORT = ["write a short story about a boat", "hello world how are you today", "one two three four five",
          "kubernetes operator deployment service pod", "json schema object array string number"]


def workload(kind: str, n: int) -> list[str]:
    if kind == "repetitive":  # text the continuation can copy: what n-gram lookup is for
        return [(_REPEAT * 3) + " ".join(_REPEAT.split()[: 3 + i % 5]) for i in range(n)]
    return [_SHORT[i % len(_SHORT)] for i in range(n)]


def measure(engine: LLMEngine, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[float, float | None]:
    """Output tok/s over all prompts, `concurrency` in flight; and the acceptance rate of this run."""
    before = engine.stats().spec_decode
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    pending = [engine.tokenizer.encode(p) for p in prompts]
    next_id, tokens = 0, 0
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        while pending and len(engine.requests) < concurrency:
            engine.add_request(str(next_id), engine.check_request(pending.pop(0), params))
            next_id += 1
        for out in engine.step():
            tokens += sum(len(c.new_token_ids) for c in out.outputs)
    elapsed = time.perf_counter() - t0
    after = engine.stats().spec_decode
    rate = None
    if after is not None:
        drafted = after.num_draft_tokens - (before.num_draft_tokens if before else 0)
        accepted = after.num_accepted_tokens - (before.num_accepted_tokens if before else 0)
        rate = accepted / drafted if drafted else 0.0
    return tokens / elapsed, rate


def install_oracle(engine: LLMEngine, expected: dict[tuple[int, ...], list[int]]) -> None:
    """Replace the engine's proposer by a free, always-right one (the greedy continuation recorded
    without speculation): the ratio it reaches is (k + 1) tokens per verify forward, i.e. the measure of
    how cheap scoring k + 1 positions is; a copy-of-target draft adds k - 1 target-sized forwards."""

    def propose(batch, ks):
        drafts = []
        for seq, k in zip(batch.seqs[: batch.num_decodes], ks, strict=True):
            full = expected.get(tuple(seq.token_ids[: seq.num_prompt_tokens]), [])
            done = seq.num_output_tokens
            drafts.append(full[done : done + k])
        return drafts, [[None] * len(d) for d in drafts]

    engine.speculator._propose = propose


def greedy_outputs(engine: LLMEngine, prompts: list[str], max_tokens: int) -> dict[tuple[int, ...], list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = {str(i): engine.tokenizer.encode(p) for i, p in enumerate(prompts)}
    out: dict[str, list[int]] = {k: [] for k in ids}
    for k, v in ids.items():
        engine.add_request(k, engine.check_request(v, params))
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] += o.outputs[0].new_token_ids
    return {tuple(ids[k]): out[k] for k in ids}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.spec_decode_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--models", default="models", help="folder of the model folders (built if missing)")
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="every row at this size; above 1 adds the drafts sharded over the same ranks")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny preset, 2 requests, 16 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.requests, args.max_tokens, args.concurrency = "tiny", 2, 16, "1,2"
    root = Path(args.models)
    target = root / args.preset
    if not (target / "config.json").exists():
        build_tiny_model(target, preset=args.preset)
    copy, two = root / f"{args.preset}-draft-copy", root / f"{args.preset}-draft-2layer"
    if not (copy / "config.json").exists():
        build_draft_model(target, copy, num_layers=None)
    if not (two / "config.json").exists():
        build_draft_model(target, two, num_layers=min(2, _layers(target)))
    # The repetitive rows run on a model that copies its prompt (random weights never repeat text, so
    # n-gram lookup would have nothing to match): the preset's shapes where they fit the construction.
    copying_preset = args.preset if _fits_copying(args.preset) else "small"
    copying = root / f"{copying_preset}-copying"
    if not (copying / "config.json").exists():
        build_copying_model(copying, preset=copying_preset)
    copying_two = root / f"{copying_preset}-copying-draft-2layer"
    if not (copying_two / "config.json").exists():
        build_draft_model(copying, copying_two, num_layers=2)
    k = args.num_speculative_tokens
    spec = {"num_speculative_tokens": k}
    rows = [
        ("no speculation", "short", target, {}),
        ("copy-of-target draft", "short", target, {"speculative_model": str(copy), **spec}),
        ("2-layer draft", "short", target, {"speculative_model": str(two), **spec}),
        ("oracle draft (free, always right)", "short", target, {"speculative_model": "[ngram]", **spec}),
        ("no speculation", "repetitive", copying, {}),
        ("n-gram", "repetitive", copying, {"speculative_model": "[ngram]", **spec}),
        ("2-layer draft (the copying layers)", "repetitive", copying, {"speculative_model": str(copying_two), **spec}),
    ]
    tp = args.tensor_parallel_size
    if tp > 1:  # the drafts again, sharded over the target's ranks instead of whole beside rank 0
        sharded = {"speculative_draft_tensor_parallel_size": tp}
        rows[3:3] = [(f"copy-of-target draft, sharded x{tp}", "short", target, {**rows[1][3], **sharded}),
                     (f"2-layer draft, sharded x{tp}", "short", target, {**rows[2][3], **sharded})]
    levels = [int(c) for c in args.concurrency.split(",")]
    baseline: dict[tuple[str, int], float] = {}
    print(f"| method | workload | c | output tok/s | x no speculation | acceptance |  (k={k}, {args.preset}, tp={tp})")
    print("|---|---|---|---|---|---|")
    for name, kind, model, kw in rows:
        expected = None
        if name.startswith("oracle"):  # recorded first: one tensor-parallel group per process at a time
            prompts = set(workload(kind, args.requests)) | set(workload(kind, 1))
            plain = LLMEngine(EngineConfig(model=str(model), device=args.device, tensor_parallel_size=tp))
            try:
                expected = greedy_outputs(plain, sorted(prompts), args.max_tokens)
            finally:
                plain.shutdown()
        engine = LLMEngine(EngineConfig(model=str(model), device=args.device, tensor_parallel_size=tp, **kw))
        try:
            if expected is not None:
                install_oracle(engine, expected)
            measure(engine, workload(kind, 1), 1, 8)  # warm-up
            for c in levels:
                tps, rate = measure(engine, workload(kind, args.requests), c, args.max_tokens)
                if not kw:
                    baseline[(kind, c)] = tps
                ratio = tps / baseline[(kind, c)] if (kind, c) in baseline else float("nan")
                acc = "-" if rate is None else f"{rate:.0%}"
                print(f"| {name} | {kind} | {c} | {tps:.1f} | {ratio:.2f} | {acc} |", flush=True)
        finally:
            engine.shutdown()


def _fits_copying(preset: str) -> bool:
    shape = PRESETS[preset]
    return copying_model.fits(shape.hidden_size, shape.head_dim, shape.num_layers)


def _layers(model_dir: Path) -> int:
    import json

    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


if __name__ == "__main__":
    main()
