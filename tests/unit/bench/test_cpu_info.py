"""The bench header's CPU line: model name and kernel-choosing flags from /proc/cpuinfo, Linear summary."""

from __future__ import annotations

from bench import cpu_info, report

CPUINFO = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma bmi2
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma bmi2
"""


def test_parse_cpuinfo_keeps_the_model_and_only_kernel_flags():
    assert cpu_info.parse_cpuinfo(CPUINFO) == ("AMD EPYC 7B13", ["avx2", "fma"])
    assert cpu_info.parse_cpuinfo("") == ("unknown CPU", [])


def test_linear_summary_counts_choices():
    entries = {"a": {"choice": "torch"}, "b": {"choice": "kernel"}, "c": {"choice": "torch"}}
    assert cpu_info.linear_summary(entries) == "kernel 1, torch 2"
    assert cpu_info.linear_summary({}) == "none measured"


def test_report_header_names_the_cpu():
    meta = {"run_id": "r", "model": "m", "model_preset": "bench", "dtype": "float32", "device": "cpu",
            "cpu_count": 2, "requests": 1, "git": "abc", "versions": {},
            "cpu": {"model": "AMD EPYC 7B13", "flags": ["avx2", "fma"], "linear": "torch 2"}}
    text = report.render_markdown(meta, [], [])
    assert "CPU AMD EPYC 7B13; kernel flags avx2 fma; Linear shapes served by torch 2." in text
    meta["cpu"] = {**meta["cpu"], "linear": "kernel 1 (16000x512)", "layer_products": "kernel"}
    text = report.render_markdown(meta, [], [])
    assert "Linear shapes served by kernel 1 (16000x512); the layers' products: kernel (by rule)." in text


def test_the_header_says_the_layer_products_follow_the_rule_unless_forced(monkeypatch):
    from bowline_runtime.kernels import cpu as kernels

    monkeypatch.delenv("BOWLINE_CPU_LINEAR", raising=False)
    assert cpu_info.cpu_facts()["layer_products"] == ("kernel" if kernels.gemm_available() else None)
    monkeypatch.setenv("BOWLINE_CPU_LINEAR", "onednn")
    assert cpu_info.cpu_facts()["layer_products"] is None


BENCH_CONFIG = {"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8, "num_key_value_heads": 4,
                "vocab_size": 16000}


def test_linear_shapes_cover_the_fused_and_plain_products_of_a_config():
    shapes = cpu_info.linear_shapes(BENCH_CONFIG)
    assert {(1024, 512), (3072, 512), (512, 1536), (512, 512), (16000, 512)} <= shapes  # what the packed decoder runs
    assert (256, 512) in shapes and (1536, 512) in shapes  # k/v and gate/up apart
    assert (64, 32) not in shapes


def test_linear_summary_counts_only_the_benchmarked_model_on_this_cpu():
    here = "v2|aaa|torch 2.13.0+cpu|torch.float32|"
    entries = {
        f"{here}16000x512|bias=False": {"choice": "kernel"},
        f"{here}3072x512|bias=False": {"choice": "onednn"},
        f"{here}64x32|bias=False": {"choice": "torch"},  # a test's tiny model: not the bench model's
        "v2|bbb|torch 2.13.0+cpu|torch.float32|1024x512|bias=False": {"choice": "torch"},  # another CPU or build
    }
    shapes = cpu_info.linear_shapes(BENCH_CONFIG)
    assert cpu_info.linear_summary(entries, shapes, here) == "kernel 1 (16000x512), onednn 1 (3072x512)"
    assert cpu_info.linear_summary(entries, shapes, "v2|ccc|") == "none measured"
