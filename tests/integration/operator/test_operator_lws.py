"""The real operator process against kmock with multi-node InferenceServices (spec.nodes > 1).

The emulator serves the LeaderWorkerSet API; whether its CRD is "installed" is whether the
CustomResourceDefinition object exists, which is what the operator checks. Without it the spec is
Valid=False and nothing is created; with it the operator creates the LeaderWorkerSet and its
leader-only Service, patches it on a spec change and reports the ready groups as ready replicas.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kmock
import kubernetes
import pytest
import yaml
from operator_emulator import REPO_ROOT, EmulatorThread, start_operator, stop_operator, wait_for

NS = "default"
GROUP, VERSION, PLURAL = "serving.bowline.dev", "v1alpha1", "inferenceservices"
LWS_GROUP, LWS_VERSION, LWS_PLURAL = "leaderworkerset.x-k8s.io", "v1", "leaderworkersets"
LWS_CRD = f"{LWS_PLURAL}.{LWS_GROUP}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    emulator = EmulatorThread().start()

    def serve_lws() -> None:
        assert emulator.kmock is not None
        emulator.kmock.resources[f"{LWS_GROUP}/{LWS_VERSION}/{LWS_PLURAL}"] = kmock.ResourceInfo(
            kind="LeaderWorkerSet", namespaced=True, subresources={"status", "scale"},
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"})

    emulator.call(serve_lws)
    workdir = tmp_path_factory.mktemp("operator-lws")
    kubeconfig = emulator.write_kubeconfig(workdir / "kubeconfig")
    client = kubernetes.config.new_client_from_config(str(kubeconfig))
    state = {"emulator": emulator, "custom": kubernetes.client.CustomObjectsApi(client),
             "core": kubernetes.client.CoreV1Api(client), "log": workdir / "operator.log"}
    before = emulator.watch_requests("/inferenceservices")
    proc = start_operator(kubeconfig, state["log"])
    wait_for(lambda: emulator.watch_requests("/inferenceservices") > before, 30, what="operator watches")
    yield state
    stop_operator(proc)
    emulator.stop()


def _example(new_name: str) -> dict[str, Any]:
    obj = yaml.safe_load((REPO_ROOT / "examples" / "multi-node-npu.yaml").read_text())
    obj["metadata"] = {"name": new_name, "namespace": NS}
    return obj


def _get(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    return cluster["custom"].get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)


def _lws(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    return cluster["custom"].get_namespaced_custom_object(LWS_GROUP, LWS_VERSION, NS, LWS_PLURAL, name)


def _condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype), None)


def _leader_args(lws: dict[str, Any]) -> list[str]:
    return lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["args"]


def test_without_the_lws_crd_the_spec_is_invalid_and_nothing_is_created(cluster: dict[str, Any]) -> None:
    cluster["custom"].create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, _example("mn-no-crd"))
    parent = wait_for(lambda: (p := _get(cluster, "mn-no-crd")).get("status", {}).get("phase") == "Failed" and p,
                      what="Failed phase")
    valid = _condition(parent, "Valid")
    assert valid["status"] == "False" and LWS_CRD in valid["message"]
    with pytest.raises(kubernetes.client.ApiException) as missing:
        _lws(cluster, "mn-no-crd")
    assert missing.value.status == 404


def test_with_the_crd_a_leader_worker_set_is_created_updated_and_reported(cluster: dict[str, Any]) -> None:
    cluster["custom"].create_cluster_custom_object(
        "apiextensions.k8s.io", "v1", "customresourcedefinitions",
        {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": LWS_CRD},
         "spec": {"group": LWS_GROUP, "scope": "Namespaced",
                  "names": {"kind": "LeaderWorkerSet", "plural": LWS_PLURAL, "singular": "leaderworkerset"},
                  "versions": [{"name": LWS_VERSION, "served": True, "storage": True}]}})
    cluster["custom"].create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, _example("mn-a"))
    lws = wait_for(lambda: _lws(cluster, "mn-a"), what="LeaderWorkerSet")
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    assert lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lws["metadata"]["ownerReferences"][0]["uid"] == _get(cluster, "mn-a")["metadata"]["uid"]
    service = cluster["core"].read_namespaced_service("mn-a", NS)
    assert service.spec.selector["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    parent = wait_for(lambda: (p := _get(cluster, "mn-a")).get("status", {}).get("phase") and p, what="status")
    assert _condition(parent, "Valid")["status"] == "True" and parent["status"]["phase"] == "Pending"

    cluster["custom"].patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "mn-a", {"spec": {"maxModelLen": 4096}})

    def updated() -> bool:
        args = _leader_args(_lws(cluster, "mn-a"))
        return args[args.index("--max-model-len") + 1] == "4096"

    wait_for(updated, what="new --max-model-len in the LeaderWorkerSet")

    generation = _lws(cluster, "mn-a")["metadata"].get("generation", 1)
    cluster["custom"].patch_namespaced_custom_object_status(
        LWS_GROUP, LWS_VERSION, NS, LWS_PLURAL, "mn-a",
        {"status": {"observedGeneration": generation, "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1,
                    "conditions": [{"type": "Available", "status": "True", "reason": "AllGroupsReady",
                                    "message": "All replicas are ready", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                                   {"type": "Progressing", "status": "False", "reason": "Ready",
                                    "message": "Replicas are progressing", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    parent = wait_for(lambda: (p := _get(cluster, "mn-a"))["status"].get("phase") == "Ready" and p, what="Ready")
    assert parent["status"]["ready"] == "1/1"
    assert _condition(parent, "Ready")["status"] == "True"


def test_nodes_back_to_one_swaps_the_leader_worker_set_for_a_deployment(cluster: dict[str, Any]) -> None:
    apps = kubernetes.client.AppsV1Api(cluster["core"].api_client)
    cluster["custom"].create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, _example("mn-swap"))
    wait_for(lambda: _lws(cluster, "mn-swap"), what="LeaderWorkerSet")
    cluster["custom"].patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "mn-swap",
                                                     {"spec": {"nodes": 1, "pipelineParallelSize": 1}})
    dep = wait_for(lambda: apps.read_namespaced_deployment("mn-swap", NS), what="Deployment")
    assert dep.spec.template.spec.containers[0].resources.limits["huawei.com/ascend-1980"] == "8"

    def lws_gone() -> bool:
        try:
            _lws(cluster, "mn-swap")
        except kubernetes.client.ApiException as error:
            return error.status == 404
        return False

    wait_for(lws_gone, what="the LeaderWorkerSet deleted")
    service = cluster["core"].read_namespaced_service("mn-swap", NS)
    assert "leaderworkerset.sigs.k8s.io/worker-index" not in service.spec.selector
