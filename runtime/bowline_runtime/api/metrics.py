"""Prometheus metrics under vLLM's names, so existing Grafana dashboards and KEDA triggers work.

Gauges (running/waiting requests, KV-cache usage) are read from the engine at scrape time;
histograms and counters are fed by a RequestMetrics per request. Each app owns its registry, so
several apps (tests) never collide in prometheus-client's global one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from bowline_runtime.engine.outputs import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class _EngineGauges(Collector):
    """Reads the engine's gauges when Prometheus scrapes, so they are never stale."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None],
                 cache_config: Mapping[str, str] | None = None) -> None:
        self._model_name = model_name
        self._stats = stats
        self._cache_config = dict(cache_config or {})

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        values = {
            "vllm:num_requests_running": ("Requests in the running batch.", stats.num_running if stats else 0),
            "vllm:num_requests_waiting": ("Requests waiting to be scheduled.", stats.num_waiting if stats else 0),
            "vllm:kv_cache_usage_perc": ("KV-cache usage: 1 means all blocks in use.", stats.kv_cache_usage if stats else 0.0),
            "vllm:num_gpu_blocks": ("KV-cache blocks reserved (on whichever device).", stats.num_total_blocks if stats else 0),
        }
        for name, (doc, value) in values.items():
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self._model_name], float(value))
            yield family
        if stats is not None:
            # vLLM's info gauge (value 1, settings as labels): the inference gateway's endpoint picker reads
            # block_size and num_gpu_blocks from it for prefix-cache-aware routing. Shown once the engine has
            # loaded, when the number of blocks is known.
            labels = {**self._cache_config, "num_gpu_blocks": str(stats.num_total_blocks)}
            info = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV-cache config.", labels=sorted(labels))
            info.add_metric([labels[k] for k in sorted(labels)], 1.0)
            yield info
        lora = stats.lora if stats else None
        if lora is not None:  # vLLM's: the value is the time of the reading, the adapters are labels
            family = GaugeMetricFamily(
                "vllm:lora_requests_info", "Running stats on LoRA requests.",
                labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            )
            family.add_metric([",".join(lora.running), ",".join(lora.waiting), str(lora.max_lora)], time.time())
            yield family


class ServerMetrics:
    """All metrics of one server."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None],
                 cache_config: Mapping[str, str] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        reg = self.registry
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels, registry=reg, buckets=_TTFT_BUCKETS)
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds", "Time per output token after the first.", labels, registry=reg, buckets=_TPOT_BUCKETS
        )
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.", labels, registry=reg, buckets=_E2E_BUCKETS)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=reg)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels, registry=reg)
        self.request_success = Counter(
            "vllm:request_success", "Requests finished, by finish reason.", [*labels, "finished_reason"], registry=reg
        )
        self.rejected = Counter(
            "bowline:requests_rejected", "Requests refused before reaching the engine, by reason.", [*labels, "reason"], registry=reg
        )
        reg.register(_EngineGauges(model_name, stats, cache_config))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request(self, arrival_time: float, prompt_tokens: int) -> RequestMetrics:
        return RequestMetrics(self, arrival_time, prompt_tokens)

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()


class RequestMetrics:
    """Timing of one request (all its choices together), recorded once when it ends."""

    def __init__(self, server: ServerMetrics, arrival_time: float, prompt_tokens: int) -> None:
        self._server = server
        self.arrival_time = arrival_time
        self.prompt_tokens = prompt_tokens
        self.first_token_time: float | None = None
        self._done = False

    def observe_tokens(self, num_generated: int) -> None:
        if self.first_token_time is None and num_generated > 0:
            self.first_token_time = time.time()

    def finish(self, generated_tokens: int, finish_reasons: list[str | None]) -> None:
        if self._done:
            return
        self._done = True
        now = time.time()
        name = self._server.model_name
        s = self._server
        s.prompt_tokens.labels(name).inc(self.prompt_tokens)
        s.generation_tokens.labels(name).inc(generated_tokens)
        s.e2e.labels(name).observe(now - self.arrival_time)
        if self.first_token_time is not None:
            s.ttft.labels(name).observe(self.first_token_time - self.arrival_time)
            if generated_tokens > 1:
                s.tpot.labels(name).observe((now - self.first_token_time) / (generated_tokens - 1))
        for reason in finish_reasons:
            s.request_success.labels(name, reason or "abort").inc()
