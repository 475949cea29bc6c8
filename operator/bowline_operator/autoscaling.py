"""Pure rendering of the scale-out children: a KEDA ScaledObject or an HPA, and a PodDisruptionBudget.

`spec.autoscaling` follows one of the runtime's vLLM-named gauges. With KEDA installed (its CRD served),
a ScaledObject with a Prometheus trigger asks Prometheus directly; without it, an autoscaling/v2
HorizontalPodAutoscaler reads a Pods metric from the custom-metrics API (prometheus-adapter serves it).
Either way the scaler owns the Deployment's `replicas`: the operator stops rendering that field, so it
never patches the count back, and the CRD refuses `kubectl scale` while autoscaling is set.

No I/O here: the handlers find out whether KEDA is served and apply or delete what this returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .render import Owner, common_labels, owner_reference, selector_labels
from .spec import InferenceServiceSpec

KEDA_API_VERSION = "keda.sh/v1alpha1"
KEDA_PLURAL = "scaledobjects"
HPA_API_VERSION = "autoscaling/v2"
PDB_API_VERSION = "policy/v1"

# Default Prometheus address for KEDA's trigger (kube-prometheus-stack's Service); the chart's value
# `autoscaling.prometheus.serverAddress` reaches the operator as --prometheus-url.
DEFAULT_PROMETHEUS_URL = "http://prometheus-operated.monitoring.svc.cluster.local:9090"
POLLING_INTERVAL_SECONDS = 15

# spec.autoscaling.metric -> the runtime's gauge (api/metrics.py exports each, vLLM's names).
METRIC_SERIES: Mapping[str, str] = {
    "num_requests_waiting": "vllm:num_requests_waiting",
    "num_requests_running": "vllm:num_requests_running",
    "kv_cache_usage": "vllm:kv_cache_usage_perc",
}
# Per-replica targets when spec.autoscaling.target is unset: a queue of 2 means the replicas no longer
# keep up; 16 running sequences is a moderate batch; KV cache 80 % full leaves room for new prompts.
DEFAULT_TARGETS: Mapping[str, float] = {"num_requests_waiting": 2, "num_requests_running": 16, "kv_cache_usage": 0.8}

# Every kind this module may render: (apiVersion, plural). A kind the spec no longer needs is deleted.
OPTIONAL_CHILDREN: Mapping[str, tuple[str, str]] = {
    "ScaledObject": (KEDA_API_VERSION, KEDA_PLURAL),
    "HorizontalPodAutoscaler": (HPA_API_VERSION, "horizontalpodautoscalers"),
    "PodDisruptionBudget": (PDB_API_VERSION, "poddisruptionbudgets"),
}

_prometheus_url = DEFAULT_PROMETHEUS_URL


def configure(prometheus_url: str | None) -> None:
    """Set the Prometheus address KEDA's trigger queries (from `--prometheus-url`)."""
    global _prometheus_url
    _prometheus_url = prometheus_url or DEFAULT_PROMETHEUS_URL


def prometheus_url() -> str:
    return _prometheus_url


def autoscaling_problems(spec: InferenceServiceSpec) -> list[str]:
    """The CRD's autoscaling CEL rules, in Python (the messages are the CRD's own)."""
    scaling = spec.autoscaling
    if scaling is None:
        return []
    problems = []
    if scaling.min_replicas > scaling.max_replicas:
        problems.append("autoscaling.minReplicas must not exceed autoscaling.maxReplicas")
    if scaling.metric == "kv_cache_usage" and scaling.target is not None and scaling.target > 1:
        problems.append("autoscaling.target for kv_cache_usage is a fraction of the KV cache, at most 1")
    return problems


def target(spec: InferenceServiceSpec) -> float:
    """The per-replica target value: the spec's, or the metric's default."""
    assert spec.autoscaling is not None
    scaling = spec.autoscaling
    return scaling.target if scaling.target is not None else DEFAULT_TARGETS[scaling.metric]


def quantity(value: float) -> str:
    """A Kubernetes quantity for a target: `2`, or milli-units for fractions (0.8 -> `800m`)."""
    if float(value).is_integer():
        return str(int(value))
    return f"{round(value * 1000)}m"


def threshold(value: float) -> str:
    """KEDA's threshold string: `2`, `0.8` (KEDA parses it as a float)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def adapter_metric_name(metric: str) -> str:
    """The name prometheus-adapter gives the gauge: custom-metrics names cannot contain `:`."""
    return METRIC_SERIES[metric].replace(":", "_")


def pod_name_regex(owner: Owner) -> str:
    """Pods of the Deployment named after the service: NAME-<template hash>-<suffix>, nothing longer,
    so a service named NAME-b (pods NAME-b-<hash>-<suffix>) is not counted with NAME."""
    return owner.name.replace(".", "\\\\.") + "-[a-z0-9]+-[a-z0-9]+"


def prometheus_query(owner: Owner, metric: str) -> str:
    """The gauge summed over this service's pods; KEDA's AverageValue divides it by the replica count,
    so the target is per replica."""
    return f'sum({METRIC_SERIES[metric]}{{namespace="{owner.namespace}",pod=~"{pod_name_regex(owner)}"}})'


def _metadata(owner: Owner) -> dict[str, Any]:
    return {"name": owner.name, "namespace": owner.namespace, "labels": common_labels(owner),
            "ownerReferences": [owner_reference(owner)]}


def _target_ref(owner: Owner) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": owner.name}


def _scale_down(spec: InferenceServiceSpec) -> dict[str, Any]:
    assert spec.autoscaling is not None
    return {"scaleDown": {"stabilizationWindowSeconds": spec.autoscaling.scale_down_delay_seconds}}


def render_scaled_object(owner: Owner, spec: InferenceServiceSpec, server_address: str) -> dict[str, Any]:
    """KEDA ScaledObject on the runtime Deployment with one Prometheus trigger."""
    assert spec.autoscaling is not None
    scaling = spec.autoscaling
    return {
        "apiVersion": KEDA_API_VERSION,
        "kind": "ScaledObject",
        "metadata": _metadata(owner),
        "spec": {
            "scaleTargetRef": _target_ref(owner),
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "pollingInterval": POLLING_INTERVAL_SECONDS,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _scale_down(spec)}},
            "triggers": [{
                "type": "prometheus",
                "name": scaling.metric,
                "metricType": "AverageValue",
                "metadata": {
                    "serverAddress": server_address,
                    "query": prometheus_query(owner, scaling.metric),
                    "threshold": threshold(target(spec)),
                },
            }],
        },
    }


def render_hpa(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """autoscaling/v2 HPA on a Pods metric: the per-pod gauge averaged over the Deployment's pods."""
    assert spec.autoscaling is not None
    scaling = spec.autoscaling
    return {
        "apiVersion": HPA_API_VERSION,
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(owner),
        "spec": {
            "scaleTargetRef": _target_ref(owner),
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": adapter_metric_name(scaling.metric)},
                "target": {"type": "AverageValue", "averageValue": quantity(target(spec))},
            }}],
            "behavior": _scale_down(spec),
        },
    }


def max_replicas(spec: InferenceServiceSpec) -> int:
    return spec.autoscaling.max_replicas if spec.autoscaling else spec.replicas


def render_pdb(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any] | None:
    """At most one runtime pod evicted at a time (drains, upgrades), when there can be more than one.

    maxUnavailable rather than minAvailable, so a drain never blocks on a single replica; pods still
    loading the model may be evicted (AlwaysAllow): they serve nothing yet.
    """
    if max_replicas(spec) <= 1:
        return None
    return {
        "apiVersion": PDB_API_VERSION,
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(owner)},
                 "unhealthyPodEvictionPolicy": "AlwaysAllow"},
    }


def render_scaling(owner: Owner, spec: InferenceServiceSpec, keda: bool,
                   server_address: str | None = None) -> list[dict[str, Any]]:
    """The scaler (ScaledObject when KEDA is served, else HPA) and the PodDisruptionBudget, as needed."""
    children = []
    if spec.autoscaling is not None:
        children.append(render_scaled_object(owner, spec, server_address or prometheus_url()) if keda
                        else render_hpa(owner, spec))
    pdb = render_pdb(owner, spec)
    if pdb is not None:
        children.append(pdb)
    return children


def unrendered(children: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(kind, apiVersion, plural) of the optional kinds absent from `children`: to delete if they exist."""
    present = {child["kind"] for child in children}
    return [(kind, api_version, plural) for kind, (api_version, plural) in OPTIONAL_CHILDREN.items()
            if kind not in present]


def on_create(child: Mapping[str, Any], spec: InferenceServiceSpec) -> dict[str, Any] | None:
    """What a new child starts with but the operator does not own: a Deployment created under
    autoscaling starts at minReplicas, instead of 1 until the scaler's first poll."""
    if child["kind"] == "Deployment" and spec.autoscaling is not None:
        return {"spec": {"replicas": spec.autoscaling.min_replicas}}
    return None


def desired_replicas(spec: InferenceServiceSpec, deployment: Mapping[str, Any] | None) -> int:
    """The replica count the service should have now: the scaler's (on the Deployment) or spec.replicas."""
    if spec.autoscaling is None:
        return spec.replicas
    live = ((deployment or {}).get("spec") or {}).get("replicas")
    if isinstance(live, int):
        return min(max(live, spec.autoscaling.min_replicas), spec.autoscaling.max_replicas)
    return spec.autoscaling.min_replicas


def scaling_status(spec: InferenceServiceSpec, children: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """status.autoscaling (`MIN-MAX`, the wide printer column) and status.scaler (`Kind/name`).

    None values delete the keys (a merge patch) when autoscaling is removed.
    """
    scaler = next((c for c in children if c["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")), None)
    if spec.autoscaling is None or scaler is None:
        return {"autoscaling": None, "scaler": None}
    return {"autoscaling": f"{spec.autoscaling.min_replicas}-{spec.autoscaling.max_replicas}",
            "scaler": f"{scaler['kind']}/{scaler['metadata']['name']}"}
