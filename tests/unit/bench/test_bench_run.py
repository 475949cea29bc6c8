"""bench.run's device, dtype and model-preset plumbing: the same harness on CPU or an accelerator."""

from __future__ import annotations

import json

from bench import hf_baseline, report, run, servers


def test_defaults_are_the_cpu_float32_bench_model():
    args = run.parse_args([])
    assert (args.device, args.dtype, args.model_preset) == ("cpu", "float32", "bench")
    assert run.model_dir_for(args) == "models/bench"


def test_gpu_flags_pick_the_qwen_folder():
    args = run.parse_args(["--device", "cuda", "--dtype", "bfloat16", "--model-preset", "qwen2.5-0.5b"])
    assert (args.device, args.dtype) == ("cuda", "bfloat16")
    assert run.model_dir_for(args) == "models/qwen2.5-0.5b"
    assert run.model_dir_for(run.parse_args(["--model-dir", "elsewhere"])) == "elsewhere"


def test_bowline_server_gets_the_runs_device_and_dtype():
    argv = servers.bowline_spec("m", 8000, 2**30, 64, device="cuda", dtype="bfloat16").argv
    assert argv[argv.index("--device") + 1] == "cuda"
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert argv[argv.index("--load-format") + 1] == "dummy"


def test_prompts_draw_from_the_tokenizer_when_the_config_is_wider(tmp_path):
    from bowline_runtime.tools.tiny_model import build_tiny_model

    folder = build_tiny_model(tmp_path / "m", preset="tiny", config_only=True)
    config = json.loads((folder / "config.json").read_text())
    assert run.ensure_model(str(folder)) == config["vocab_size"] == 2048
    config["vocab_size"] = 151936
    (folder / "config.json").write_text(json.dumps(config))
    assert run.tokenizer_size(folder / "tokenizer.json") == 2048
    assert run.ensure_model(str(folder)) == 2048
    assert not hf_baseline.has_weights(folder)


def test_hf_baseline_sees_a_checkpoint(tiny_model_dir):
    assert hf_baseline.has_weights(tiny_model_dir)


def test_report_header_states_device_and_dtype():
    meta = {"run_id": "r", "model": "models/qwen2.5-0.5b", "model_preset": "qwen2.5-0.5b", "device": "cuda",
            "dtype": "bfloat16", "cpu_count": 16, "requests": 32, "git": "abc", "versions": {"torch": "x"}}
    header = report.render_markdown(meta, [], []).splitlines()[2]
    assert "(qwen2.5-0.5b preset, bfloat16, cuda, 16 CPU cores)" in header
    assert "float32" not in header and "CPU," not in header


def test_the_engine_core_process_is_its_own_system_with_its_own_ratio_row():
    core = servers.bowline_spec("m", 8000, 2**30, 64, engine_process=True)
    thread = servers.bowline_spec("m", 8000, 2**30, 64)
    assert (core.name, core.env["BOWLINE_ENGINE_PROCESS"]) == ("bowline-core", "1")
    assert (thread.name, thread.env["BOWLINE_ENGINE_PROCESS"]) == ("bowline", "0")
    systems, *_ = run.resolve_plan(run.parse_args(["--systems", "bowline-core,vllm,bowline"]))
    assert systems == ["vllm", "bowline", "bowline-core"]

    def point(system, tok_s):
        return {"system": system, "workload": "short", "concurrency": 8, "output_tokens_per_s": tok_s, "errors": 0}

    rows = report.ratios([point("vllm", 100.0), point("bowline", 150.0), point("bowline-core", 180.0)])
    assert [(r["system"], r["vs_vllm"]) for r in rows] == [("bowline", 1.5), ("bowline-core", 1.8)]


def test_the_half_precision_cache_is_its_own_system_and_row():
    kv16 = servers.bowline_spec("m", 8000, 2**30, 64, half_kv_cache=True)
    assert kv16.name == "bowline-kv16" and kv16.argv[kv16.argv.index("--kv-cache-dtype") + 1] == "float16"
    assert "--kv-cache-dtype" not in servers.bowline_spec("m", 8000, 2**30, 64).argv
    systems, *_ = run.resolve_plan(run.parse_args(["--systems", "bowline-kv16,vllm,bowline"]))
    assert systems == ["vllm", "bowline", "bowline-kv16"]
    rows = report.ratios([
        {"system": s, "workload": "mixed", "concurrency": 16, "output_tokens_per_s": t, "errors": 0}
        for s, t in (("vllm", 100.0), ("bowline", 150.0), ("bowline-kv16", 170.0))
    ])
    assert [(r["system"], r["vs_vllm"]) for r in rows] == [("bowline", 1.5), ("bowline-kv16", 1.7)]
