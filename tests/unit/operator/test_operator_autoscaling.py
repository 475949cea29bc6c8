"""spec.autoscaling, the PodDisruptionBudget and the node spread: rendering, schemas and CRD rules.

The ScaledObject is checked against KEDA's own CRD schema for the fields the operator renders (below,
written down from kedacore/keda config/crd/bases/keda.sh_scaledobjects.yaml at v2.20, controller-gen
v0.20.1), the HPA, PDB and Deployment against the official Kubernetes schemas.
"""

from __future__ import annotations

import copy
from typing import Any

import cel
import jsonschema
import kubernetes_validate
import pytest
from bowline_operator import autoscaling
from bowline_operator.diff import merge_patch, with_last_applied
from bowline_operator.render import Owner, render_children, render_deployment
from bowline_operator.status import compute_status
from bowline_operator.validation import validate_spec
from operator_crd_tools import apply_defaults, cel_failures, example, load_crd, schema, transition_failures

K8S_VERSION = "1.33"
OWNER = Owner(name="chat", namespace="ml", uid="1234-abcd")

_INT32 = {"type": "integer", "format": "int32"}
# KEDA v2.20 ScaledObject (keda.sh/v1alpha1): the subset the operator renders, with the CRD's types,
# bounds and required lists. additionalProperties: false on top, since the API server would silently
# prune a misspelt field; `metricType`'s values are KEDA's documented ones (the CRD types it as string).
KEDA_SCALEDOBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "name": {"type": "string", "minLength": 1},
                                   "envSourceContainerName": {"type": "string"}},
                },
                "minReplicaCount": {**_INT32, "minimum": 0},
                "maxReplicaCount": {**_INT32, "minimum": 1},
                "pollingInterval": {**_INT32, "minimum": 1},
                "cooldownPeriod": _INT32,
                "advanced": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object", "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object", "additionalProperties": False,
                                    "properties": {d: {
                                        "type": "object", "additionalProperties": False,
                                        "properties": {"stabilizationWindowSeconds": _INT32,
                                                       "selectPolicy": {"type": "string"},
                                                       "policies": {"type": "array"}},
                                    } for d in ("scaleDown", "scaleUp")},
                                },
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["metadata", "type"], "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string", "minLength": 1},
                            "name": {"type": "string"},
                            "metricType": {"type": "string", "enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            },
        },
    },
}
# The CRD's own CEL rule on spec (x-kubernetes-validations).
KEDA_SPEC_RULE = "!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount) ? self.maxReplicaCount : 100)"
# What KEDA's Prometheus scaler reads from trigger metadata (serverAddress, query, threshold are required).
KEDA_PROMETHEUS_METADATA = {"serverAddress", "query", "threshold"}


def _spec(name: str = "autoscaling", **overrides: Any) -> Any:
    spec = apply_defaults(schema(), example(name))["spec"]
    spec.update(overrides)
    checked = validate_spec(apply_defaults(schema(), {"spec": spec})["spec"])
    assert checked.ok, checked.problems
    return checked.spec


def _scaling(keda: bool, **overrides: Any) -> dict[str, dict[str, Any]]:
    return {c["kind"]: c for c in autoscaling.render_scaling(OWNER, _spec(**overrides), keda, "http://prom:9090")}


def test_keda_scaled_object_follows_the_spec_and_validates_against_kedas_schema() -> None:
    scaled = _scaling(True)["ScaledObject"]
    jsonschema.Draft7Validator(KEDA_SCALEDOBJECT_SCHEMA).validate(scaled)
    assert cel.evaluate(KEDA_SPEC_RULE, {"self": scaled["spec"]}) is True
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 4)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == {"stabilizationWindowSeconds": 120}
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert set(trigger["metadata"]) == KEDA_PROMETHEUS_METADATA
    assert trigger["metadata"]["serverAddress"] == "http://prom:9090"
    assert trigger["metadata"]["threshold"] == "2"
    # Summed over this service's pods only; AverageValue divides by the replica count: per replica.
    assert trigger["metadata"]["query"] == \
        'sum(vllm:num_requests_waiting{namespace="ml",pod=~"chat-[a-z0-9]+-[a-z0-9]+"})'
    assert scaled["metadata"]["ownerReferences"][0]["uid"] == "1234-abcd"


@pytest.mark.parametrize(("metric", "series", "target", "threshold", "quantity"), [
    ("num_requests_waiting", "vllm:num_requests_waiting", None, "2", "2"),
    ("num_requests_running", "vllm:num_requests_running", 12, "12", "12"),
    ("kv_cache_usage", "vllm:kv_cache_usage_perc", None, "0.8", "800m"),
    ("kv_cache_usage", "vllm:kv_cache_usage_perc", 0.65, "0.65", "650m"),
])
def test_each_metric_maps_to_the_runtimes_gauge(metric: str, series: str, target: float | None,
                                                threshold: str, quantity: str) -> None:
    scaling = {"minReplicas": 2, "maxReplicas": 6, "metric": metric}
    if target is not None:
        scaling["target"] = target
    keda = _scaling(True, autoscaling=scaling)["ScaledObject"]
    jsonschema.Draft7Validator(KEDA_SCALEDOBJECT_SCHEMA).validate(keda)
    metadata = keda["spec"]["triggers"][0]["metadata"]
    assert metadata["query"].startswith(f"sum({series}{{") and metadata["threshold"] == threshold
    hpa = _scaling(False, autoscaling=scaling)["HorizontalPodAutoscaler"]
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    (pods,) = hpa["spec"]["metrics"]
    assert pods["type"] == "Pods"
    assert pods["pods"]["metric"]["name"] == series.replace(":", "_")
    assert pods["pods"]["target"] == {"type": "AverageValue", "averageValue": quantity}


def test_runtime_exports_every_gauge_the_scalers_follow() -> None:
    from bowline_runtime.api.metrics import ServerMetrics
    scraped = ServerMetrics("tiny", lambda: None).render().decode()
    for series in autoscaling.METRIC_SERIES.values():
        assert f'{series}{{model_name="tiny"}}' in scraped


def test_hpa_without_keda_is_a_valid_autoscaling_v2_object() -> None:
    children = _scaling(False)
    assert set(children) == {"HorizontalPodAutoscaler", "PodDisruptionBudget"}
    hpa = children["HorizontalPodAutoscaler"]
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    assert hpa["spec"]["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 120}}


def test_autoscaling_wins_over_replicas_and_the_deployment_leaves_the_count_to_the_scaler() -> None:
    spec = _spec(replicas=3)
    deployment = render_deployment(OWNER, spec)
    assert "replicas" not in deployment["spec"]
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    # A new Deployment starts at minReplicas (a start value only, not in the applied record).
    assert autoscaling.on_create(deployment, _spec(autoscaling={"minReplicas": 2, "maxReplicas": 4})) == \
        {"spec": {"replicas": 2}}
    assert autoscaling.on_create(deployment, _spec("cpu-tiny")) is None
    # Switching an existing Deployment (replicas: 3 applied) to autoscaling keeps the live count.
    before = with_last_applied(render_deployment(OWNER, _spec("cpu-tiny", replicas=3)))
    patch = merge_patch(with_last_applied(deployment), before, None, None)
    assert "replicas" not in patch.get("spec", {})
    from bowline_operator.diff import last_applied
    patch = merge_patch(with_last_applied(deployment), before, None, last_applied(before))
    assert "replicas" not in patch.get("spec", {})
    # ...and the scaler's later choice (5) is not patched back either.
    live = copy.deepcopy(with_last_applied(deployment))
    live["spec"]["replicas"] = 5
    assert merge_patch(with_last_applied(deployment), live, None, last_applied(live)) == {}


def test_removing_autoscaling_hands_the_count_back_to_spec_replicas() -> None:
    scaled = with_last_applied(render_deployment(OWNER, _spec()))
    scaled["spec"]["replicas"] = 4
    fixed = render_deployment(OWNER, _spec("cpu-tiny", replicas=2))
    assert merge_patch(fixed, scaled, None, None)["spec"]["replicas"] == 2


@pytest.mark.parametrize(("overrides", "pdb"), [
    ({"replicas": 1}, False),
    ({"replicas": 2}, True),
    ({"replicas": 0}, False),
    ({"autoscaling": {"minReplicas": 1, "maxReplicas": 3}}, True),
    ({"autoscaling": {"minReplicas": 1, "maxReplicas": 1}}, False),
])
def test_pod_disruption_budget_when_there_can_be_more_than_one_replica(overrides: dict[str, Any], pdb: bool) -> None:
    base = {"autoscaling": None} if "replicas" in overrides else {}
    spec = _spec("cpu-tiny", **{**base, **overrides})
    rendered = autoscaling.render_pdb(OWNER, spec)
    assert (rendered is not None) == pdb
    if rendered:
        kubernetes_validate.validate(rendered, K8S_VERSION, strict=True)
        assert rendered["spec"]["maxUnavailable"] == 1
        assert rendered["spec"]["selector"] == {"matchLabels": {"serving.bowline.dev/inferenceservice": "chat"}}


def test_unrendered_optional_kinds_are_the_ones_to_delete() -> None:
    children = render_children(OWNER, _spec("cpu-tiny")) + autoscaling.render_scaling(OWNER, _spec("cpu-tiny"), False)
    assert [kind for kind, _, _ in autoscaling.unrendered(children)] == [
        "ScaledObject", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    children = autoscaling.render_scaling(OWNER, _spec(), True)
    assert [kind for kind, _, _ in autoscaling.unrendered(children)] == ["HorizontalPodAutoscaler"]


def test_replicas_spread_across_nodes_by_default() -> None:
    for name in ("cpu-tiny", "nvidia-gpu", "ascend-npu", "autoscaling"):
        deployment = render_deployment(OWNER, _spec(name))
        (spread,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
        assert spread["labelSelector"] == deployment["spec"]["selector"]
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    zones = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
              "labelSelector": {"matchLabels": {"serving.bowline.dev/inferenceservice": "chat"}}}]
    runtime = {**example("cpu-tiny")["spec"]["runtime"], "topologySpreadConstraints": zones}
    assert render_deployment(OWNER, _spec("cpu-tiny", runtime=runtime))["spec"]["template"]["spec"][
        "topologySpreadConstraints"] == zones
    off = {**runtime, "topologySpreadConstraints": []}
    assert "topologySpreadConstraints" not in render_deployment(OWNER, _spec("cpu-tiny", runtime=off))["spec"]["template"]["spec"]


def test_status_shows_desired_and_current_replicas_and_the_range() -> None:
    spec = _spec()
    deployment = {"metadata": {"generation": 2}, "spec": {"replicas": 3},
                  "status": {"observedGeneration": 2, "replicas": 3, "readyReplicas": 2, "updatedReplicas": 3}}
    status = compute_status(OWNER, spec, 1, deployment, "2026-01-01T00:00:00Z")
    assert (status["desiredReplicas"], status["currentReplicas"], status["ready"]) == (3, 3, "2/3")
    assert status["phase"] == "Loading"
    extra = autoscaling.scaling_status(spec, autoscaling.render_scaling(OWNER, spec, True))
    assert extra == {"autoscaling": "1-4", "scaler": "ScaledObject/chat"}
    # Without autoscaling the keys are deleted (merge patch null), and desired is spec.replicas.
    plain = _spec("cpu-tiny", replicas=2)
    assert autoscaling.scaling_status(plain, []) == {"autoscaling": None, "scaler": None}
    assert compute_status(OWNER, plain, 1, deployment, "2026-01-01T00:00:00Z")["desiredReplicas"] == 2


# --- the CRD --------------------------------------------------------------------------------------


def _with_autoscaling(**scaling: Any) -> dict[str, Any]:
    obj = copy.deepcopy(example("autoscaling"))
    obj["spec"]["autoscaling"] = scaling
    return obj


@pytest.mark.parametrize(("scaling", "message"), [
    ({"minReplicas": 5, "maxReplicas": 2}, "autoscaling.minReplicas must not exceed autoscaling.maxReplicas"),
    ({"maxReplicas": 2, "metric": "kv_cache_usage", "target": 1.5},
     "autoscaling.target for kv_cache_usage is a fraction of the KV cache, at most 1"),
])
def test_autoscaling_cel_rules_and_operator_agree(scaling: dict[str, Any], message: str) -> None:
    obj = _with_autoscaling(**scaling)
    assert message in cel_failures(obj)
    checked = validate_spec(apply_defaults(schema(), obj)["spec"])
    assert not checked.ok and message in checked.problems


@pytest.mark.parametrize("scaling", [{"minReplicas": 0, "maxReplicas": 2}, {"maxReplicas": 2, "metric": "gpu_util"},
                                     {"minReplicas": 1}, {"maxReplicas": 2, "target": 0},
                                     {"maxReplicas": 2, "scaleDownDelaySeconds": 7200}])
def test_schema_and_operator_refuse_bad_autoscaling(scaling: dict[str, Any]) -> None:
    from operator_crd_tools import schema_errors
    obj = _with_autoscaling(**scaling)
    assert any(e.startswith("spec.autoscaling") for e in schema_errors(obj)), schema_errors(obj)
    assert not validate_spec(obj["spec"]).ok


SCALE_REFUSED = "spec.replicas cannot change while spec.autoscaling is set"


def test_kubectl_scale_is_refused_while_autoscaling_is_set() -> None:
    old = example("autoscaling")
    scaled = copy.deepcopy(old)
    scaled["spec"]["replicas"] = 3  # what the scale subresource writes for `kubectl scale --replicas=3`
    assert any(m.startswith(SCALE_REFUSED) for m in transition_failures(old, scaled))
    # Edits of autoscaling itself, and scaling without autoscaling, go through.
    wider = copy.deepcopy(old)
    wider["spec"]["autoscaling"]["maxReplicas"] = 8
    assert transition_failures(old, wider) == []
    plain = example("cpu-tiny")
    plain_scaled = copy.deepcopy(plain)
    plain_scaled["spec"]["replicas"] = 3
    assert transition_failures(plain, plain_scaled) == []
    # Removing autoscaling and setting replicas in one edit, or adding it with a new count, too.
    back = copy.deepcopy(scaled)
    del back["spec"]["autoscaling"]
    assert transition_failures(old, back) == []
    added = copy.deepcopy(plain_scaled)
    added["spec"]["autoscaling"] = {"maxReplicas": 4}
    assert transition_failures(plain, added) == []


def test_crd_is_still_a_valid_customresourcedefinition_with_the_new_columns() -> None:
    crd = load_crd()
    kubernetes_validate.validate(crd, K8S_VERSION, strict=True)
    wide = {c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]
            if c.get("priority") == 1}
    assert wide["Autoscaling"] == ".status.autoscaling" and wide["Desired"] == ".status.desiredReplicas"


def _undescribed(node: dict[str, Any], path: str) -> list[str]:
    missing = [] if node.get("description") else [path]
    for key, sub in (node.get("properties") or {}).items():
        missing += _undescribed(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict) and node["items"].get("properties"):
        missing += _undescribed(node["items"], f"{path}[]")
    return missing


def test_kubectl_explain_describes_every_new_field() -> None:
    props = schema()["properties"]
    nodes = {"spec.autoscaling": props["spec"]["properties"]["autoscaling"],
             "spec.runtime.topologySpreadConstraints": props["spec"]["properties"]["runtime"]["properties"]["topologySpreadConstraints"]}
    nodes.update({f"status.{k}": props["status"]["properties"][k]
                  for k in ("desiredReplicas", "currentReplicas", "autoscaling", "scaler")})
    assert [m for path, node in nodes.items() for m in _undescribed(node, path)] == []
