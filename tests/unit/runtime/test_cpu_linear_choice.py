"""Each Linear shape is served by what measured fastest; the decision is pure, the measuring cached."""

from __future__ import annotations

import logging

import pytest
import torch
from bowline_runtime.devices import cpu as cpu_device
from bowline_runtime.devices.cpu import CpuDevice, LinearChooser
from bowline_runtime.kernels import cpu as kernels
from bowline_runtime.kernels import linear_choice


def test_choose_takes_the_least_time_over_the_decode_row_counts():
    timings = {
        "kernel": {1: 100.0, 8: 500.0, 16: 900.0},  # 1500: fastest at 1 row only
        "onednn": {1: 200.0, 8: 300.0, 16: 500.0},  # 1000
        "torch": {1: 90.0, 8: 900.0, 16: 1300.0},  # 2290
    }
    assert linear_choice.choose(timings) == "onednn"
    assert linear_choice.choose(timings, {1: 1.0}) == "torch"


def test_choose_breaks_ties_in_declared_order_and_treats_missing_rows_as_slowest():
    same = {1: 1.0, 8: 1.0, 16: 1.0}
    assert linear_choice.choose({"torch": same, "kernel": same}) == "kernel"
    assert linear_choice.choose({"kernel": {1: 1.0}, "torch": {1: 5.0, 8: 5.0, 16: 5.0}}) == "torch"
    with pytest.raises(ValueError):
        linear_choice.choose({})


def test_forced_choice_reads_the_switch(monkeypatch):
    monkeypatch.delenv(linear_choice.LINEAR_ENV, raising=False)
    assert linear_choice.forced_choice(["kernel", "torch"]) is None
    monkeypatch.setenv(linear_choice.LINEAR_ENV, "onednn")
    assert linear_choice.forced_choice(["onednn", "torch"]) == "onednn"
    assert linear_choice.forced_choice(["torch"]) == "torch"  # not available here: torch's own
    monkeypatch.setenv(linear_choice.LINEAR_ENV, "fastest")
    with pytest.raises(ValueError, match="BOWLINE_CPU_LINEAR"):
        linear_choice.forced_choice(["torch"])


def test_packed_linear_off_means_plain_torch(monkeypatch):
    monkeypatch.setenv(cpu_device.PACKED_LINEAR_ENV, "0")
    assert LinearChooser().available(torch.float32) == ["torch"]


def test_measured_choice_is_logged_cached_on_disk_and_reused(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(linear_choice.LINEAR_ENV, raising=False)
    monkeypatch.setattr(linear_choice, "others_share", lambda a, b: 0.0)  # a quiet machine (the load rule: below)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(64, 96), torch.nn.Linear(96, 64))
    model[1].load_state_dict(model[0].state_dict())
    x = torch.randn(3, 64)
    with torch.inference_mode():
        expected = model[2](model[0](x))
        with caplog.at_level(logging.INFO, logger=cpu_device.__name__):
            CpuDevice().optimize_model(model)
        torch.testing.assert_close(model[2](model[0](x)), expected, rtol=1e-4, atol=1e-4)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Linear ")]
    assert len(lines) == 2 and "96x64" in lines[0] and "64x96" in lines[1]  # one line per distinct shape
    cached = linear_choice.load_cache(tmp_path / "linear_choice.json")
    assert len(cached) == 2 and all(e["choice"] in linear_choice.CHOICES for e in cached.values())
    # A second start reads the cache: no measuring at all.
    monkeypatch.setattr(linear_choice, "measure", lambda *a: pytest.fail("measured again"))
    CpuDevice().optimize_model(torch.nn.Sequential(torch.nn.Linear(64, 96)))


def test_others_share_counts_what_other_processes_took():
    start = linear_choice.CpuTicks(busy=1000, total=4000, own=300)
    # 200 ticks of the machine passed: 150 busy, 50 of them ours -> others took 100 / 200.
    assert linear_choice.others_share(start, linear_choice.CpuTicks(busy=1150, total=4200, own=350)) == 0.5
    assert linear_choice.others_share(start, linear_choice.CpuTicks(busy=1100, total=4200, own=400)) == 0.0
    assert linear_choice.others_share(None, start) == 0.0
    ticks = linear_choice.cpu_ticks()
    assert ticks is None or 0 <= ticks.busy <= ticks.total


def test_a_shape_measured_under_load_takes_the_rule_and_is_not_cached(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(linear_choice.LINEAR_ENV, raising=False)
    monkeypatch.setattr(linear_choice, "others_share", lambda a, b: 0.6)
    # Noise that would pick plain torch, as a lost time slice does.
    monkeypatch.setattr(linear_choice, "measure", lambda fn, k, dtype: {1: 9.0 if fn.__class__ is torch.nn.Linear else 8000.0})
    chooser = LinearChooser()
    linear = torch.nn.Linear(64, 96)
    with caplog.at_level(logging.WARNING, logger=cpu_device.__name__):
        chooser.replacement(linear)
    chooser.finish()
    assert chooser.chosen and set(chooser.chosen.values()) == {linear_choice.fallback_choice(chooser.available(torch.float32))}
    assert any("not cached" in r.getMessage() for r in caplog.records)
    assert linear_choice.load_cache(tmp_path / "linear_choice.json") == {}


def test_the_rule_prefers_our_kernel_then_onednn_never_torch_when_another_exists():
    assert linear_choice.fallback_choice(["kernel", "onednn", "torch"]) == "kernel"
    assert linear_choice.fallback_choice(["onednn", "torch"]) == "onednn"
    assert linear_choice.fallback_choice(["torch"]) == "torch"
