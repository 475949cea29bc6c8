"""The real server's /metrics carries every metric the inference gateway's endpoint picker scrapes.

The names are the endpoint picker's vLLM defaults in the Gateway API Inference Extension v1.5.0
(pkg/epp/server/options.go and the model-server protocol, docs/proposals/003-model-server-protocol):
queue, running requests and KV-cache usage as gauges, and the KV-cache config as an info gauge whose
`block_size` and `num_gpu_blocks` labels size its prefix-cache scorer. (`vllm:lora_requests_info`,
for LoRA affinity, comes with LoRA serving and is tested there.)
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

EPP_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")
EPP_CACHE_INFO = "vllm:cache_config_info"


def test_metrics_cover_the_endpoint_picker(http) -> None:
    response = http.get("/metrics")
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in (*EPP_GAUGES, EPP_CACHE_INFO):
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == "gauge", name
    (sample,) = families[EPP_CACHE_INFO].samples
    assert sample.value == 1.0
    assert int(sample.labels["block_size"]) == 16  # the server's --block-size default
    assert int(sample.labels["num_gpu_blocks"]) == int(families["vllm:num_gpu_blocks"].samples[0].value) > 0
