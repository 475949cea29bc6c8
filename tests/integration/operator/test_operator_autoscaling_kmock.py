"""spec.autoscaling through the real operator process against kmock: the HPA (no KEDA), then the KEDA
ScaledObject once KEDA's resource is served, the PodDisruptionBudget, and each removed again as the spec
changes; the scaler's replica count is never patched back.

kmock has no garbage collector, so deletion of the InferenceService is shown by the children's
controller owner references (what the API server's garbage collector follows).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import kmock
import kubernetes
import pytest
import yaml
from bowline_operator.diff import LAST_APPLIED
from operator_emulator import REPO_ROOT, EmulatorThread, start_operator, stop_operator, wait_for

NS = "default"
GROUP, VERSION, PLURAL = "serving.bowline.dev", "v1alpha1", "inferenceservices"
HPA = ("autoscaling", "v2", "horizontalpodautoscalers")
PDB = ("policy", "v1", "poddisruptionbudgets")
KEDA = ("keda.sh", "v1alpha1", "scaledobjects")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    emulator = EmulatorThread().start()
    workdir = tmp_path_factory.mktemp("operator-autoscaling")
    kubeconfig = emulator.write_kubeconfig(workdir / "kubeconfig")
    client = kubernetes.config.new_client_from_config(str(kubeconfig))
    log = workdir / "operator.log"
    proc = start_operator(kubeconfig, log, "--prometheus-url=http://prom.monitoring:9090")
    wait_for(lambda: emulator.watch_requests("/deployments") and emulator.watch_requests("/inferenceservices"),
             30, what="operator watches")
    yield {"emulator": emulator, "log": log, "custom": kubernetes.client.CustomObjectsApi(client),
           "apps": kubernetes.client.AppsV1Api(client)}
    stop_operator(proc)
    emulator.stop()


def _example(name: str) -> dict[str, Any]:
    obj = yaml.safe_load((REPO_ROOT / "examples" / "autoscaling.yaml").read_text())
    obj["metadata"] = {"name": name, "namespace": NS}
    return obj


def _get(cluster: dict[str, Any], resource: tuple[str, str, str], name: str) -> dict[str, Any] | None:
    try:
        return cluster["custom"].get_namespaced_custom_object(*resource[:2], NS, resource[2], name)
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return None
        raise


def _isvc(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    return cluster["custom"].get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)


def _deployment(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    return cluster["apps"].api_client.sanitize_for_serialization(cluster["apps"].read_namespaced_deployment(name, NS))


def _replace_spec(cluster: dict[str, Any], name: str, spec: dict[str, Any]) -> None:
    cluster["custom"].patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name,
                                                     [{"op": "replace", "path": "/spec", "value": spec}])


def _deployment_patches_with_replicas(cluster: dict[str, Any], name: str) -> int:
    """The operator's (fieldManager=bowline) patches of the Deployment that touch spec.replicas."""
    return sum(1 for r in list(cluster["emulator"].kmock)
               if str(r.method).upper().endswith("PATCH") and str(r.url.path).endswith(f"/deployments/{name}")
               and "fieldManager=bowline" in str(r.url)
               and isinstance(r.data, dict) and "replicas" in (r.data.get("spec") or {}))


def test_autoscaler_follows_the_spec_from_hpa_to_keda_and_away(cluster: dict[str, Any]) -> None:
    name = "chat"
    obj = _example(name)
    obj["spec"]["autoscaling"]["minReplicas"] = 2
    cluster["custom"].create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, obj)

    # No KEDA in the cluster: an HPA on the Pods metric, a PDB (max 4 > 1), a Deployment that starts at
    # minReplicas but whose applied record has no replicas (the scaler owns them).
    hpa = wait_for(lambda: _get(cluster, HPA, name), what="HPA")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 4)
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    parent = _isvc(cluster, name)
    for child in (hpa, wait_for(lambda: _get(cluster, PDB, name), what="PDB"), _deployment(cluster, name)):
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref["uid"] == parent["metadata"]["uid"] and ref["controller"] is True  # GC'd with the parent
    deployment = _deployment(cluster, name)
    assert deployment["spec"]["replicas"] == 2
    assert "replicas" not in json.loads(deployment["metadata"]["annotations"][LAST_APPLIED])["spec"]
    status = wait_for(lambda: (s := _isvc(cluster, name).get("status", {})).get("scaler") and s, what="status")
    assert status["autoscaling"] == "2-4" and status["scaler"] == f"HorizontalPodAutoscaler/{name}"

    # The HPA scales the Deployment to 3: the status follows, the operator does not patch it back.
    cluster["apps"].patch_namespaced_deployment(name, NS, {"spec": {"replicas": 3}},
                                                _content_type="application/merge-patch+json")
    wait_for(lambda: _isvc(cluster, name)["status"].get("desiredReplicas") == 3, what="desiredReplicas 3")
    time.sleep(0.5)
    assert _deployment(cluster, name)["spec"]["replicas"] == 3
    assert _deployment_patches_with_replicas(cluster, name) == 0

    # Spec change: a wider range on another gauge patches the HPA.
    spec = {**obj["spec"], "autoscaling": {"minReplicas": 2, "maxReplicas": 6, "metric": "kv_cache_usage",
                                           "target": 0.7}}
    _replace_spec(cluster, name, spec)
    hpa = wait_for(lambda: (h := _get(cluster, HPA, name)) and h["spec"]["maxReplicas"] == 6 and h, what="HPA patched")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_kv_cache_usage_perc"
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "700m"

    # KEDA gets installed; the next reconcile renders a ScaledObject and deletes the HPA.
    emulator: EmulatorThread = cluster["emulator"]
    emulator.call(lambda: emulator.kmock.resources.__setitem__(
        "keda.sh/v1alpha1/scaledobjects", kmock.ResourceInfo(kind="ScaledObject", namespaced=True, verbs={
            "get", "list", "watch", "create", "patch", "update", "delete"})))
    _replace_spec(cluster, name, {**spec, "autoscaling": {**spec["autoscaling"], "scaleDownDelaySeconds": 60}})
    scaled = wait_for(lambda: _get(cluster, KEDA, name), what="ScaledObject")
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (2, 6)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["metadata"]["serverAddress"] == "http://prom.monitoring:9090"
    assert trigger["metadata"]["query"] == 'sum(vllm:kv_cache_usage_perc{namespace="default",pod=~"chat-[a-z0-9]+-[a-z0-9]+"})'
    assert trigger["metadata"]["threshold"] == "0.7"
    wait_for(lambda: _get(cluster, HPA, name) is None, what="the HPA deleted")
    wait_for(lambda: _isvc(cluster, name)["status"].get("scaler") == f"ScaledObject/{name}", what="status scaler")

    # Autoscaling removed, replicas 1: the ScaledObject and the PDB go, the Deployment gets replicas back.
    plain = {k: v for k, v in spec.items() if k != "autoscaling"} | {"replicas": 1}
    _replace_spec(cluster, name, plain)
    wait_for(lambda: _get(cluster, KEDA, name) is None, what="the ScaledObject deleted")
    wait_for(lambda: _get(cluster, PDB, name) is None, what="the PDB deleted")
    assert _deployment(cluster, name)["spec"]["replicas"] == 1
    assert _deployment_patches_with_replicas(cluster, name) == 1  # this one, by the operator
    status = wait_for(lambda: "scaler" not in (s := _isvc(cluster, name)["status"]) and s, what="status cleared")
    assert "autoscaling" not in status and status["desiredReplicas"] == 1
    log = cluster["log"].read_text()
    assert "HorizontalPodAutoscaler deleted" in log and "ScaledObject deleted" in log


def test_fixed_replicas_above_one_get_a_pdb_and_lose_it_at_one(cluster: dict[str, Any]) -> None:
    name = "fixed"
    obj = _example(name)
    del obj["spec"]["autoscaling"]
    obj["spec"]["replicas"] = 2
    cluster["custom"].create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, obj)
    pdb = wait_for(lambda: _get(cluster, PDB, name), what="PDB")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert _deployment(cluster, name)["spec"]["replicas"] == 2
    assert _get(cluster, HPA, name) is None and _get(cluster, KEDA, name) is None
    spread = _deployment(cluster, name)["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread[0]["topologyKey"] == "kubernetes.io/hostname"
    cluster["custom"].patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name, {"spec": {"replicas": 1}})
    wait_for(lambda: _get(cluster, PDB, name) is None, what="the PDB deleted")
