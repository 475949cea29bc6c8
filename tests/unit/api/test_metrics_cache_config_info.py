"""vllm:cache_config_info: vLLM's info gauge, shown once the engine knows its number of KV blocks."""

from __future__ import annotations

from bowline_runtime.api.metrics import ServerMetrics
from bowline_runtime.engine.outputs import EngineStats
from prometheus_client.parser import text_string_to_metric_families


def _families(metrics: ServerMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def test_absent_while_loading_then_labels_from_config_and_engine() -> None:
    stats: list[EngineStats] = []
    metrics = ServerMetrics("m", lambda: stats[0] if stats else None,
                            cache_config={"block_size": "32", "enable_prefix_caching": "True"})
    assert "vllm:cache_config_info" not in _families(metrics)  # the block count is not known yet
    stats.append(EngineStats(num_running=0, num_waiting=0, num_free_blocks=100, num_total_blocks=123))
    (sample,) = _families(metrics)["vllm:cache_config_info"].samples
    assert sample.value == 1.0
    assert sample.labels == {"block_size": "32", "enable_prefix_caching": "True", "num_gpu_blocks": "123"}
