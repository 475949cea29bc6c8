"""bench.lora_bench's request mix: base requests between the adapters', every adapter equally often."""

from __future__ import annotations

from bench import lora_bench, servers


def test_mixed_point_cycles_base_and_each_adapter():
    models = lora_bench.mixed_models(["a", "b", "c", "d"], 10)
    assert models == [servers.SERVED_NAME, "a", "b", "c", "d"] * 2


def test_defaults_are_the_issue_point():
    args = lora_bench.parse_args([])
    assert (args.concurrency, args.adapters, args.rank) == (8, 4, 16)
