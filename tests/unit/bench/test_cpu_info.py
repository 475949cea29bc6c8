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
