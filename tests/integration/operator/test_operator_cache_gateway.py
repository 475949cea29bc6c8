"""Model cache and inference gateway through the real operator process against kmock.

One emulator and one operator serve the module; each test uses its own names. kmock has no garbage
collector and no Job controller: the tests play the Job controller (a status patch) and check owner
references where a real cluster would garbage-collect.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kmock
import kubernetes
import pytest
import yaml
from bowline_operator import gateway
from bowline_operator.model_cache import CACHE_LABEL, claim_name, job_name
from operator_emulator import REPO_ROOT, EmulatorThread, start_operator, stop_operator, wait_for

NS = "default"
GROUP, VERSION, PLURAL = "serving.bowline.dev", "v1alpha1", "inferenceservices"
SOURCE = "hf://Qwen/Qwen2.5-0.5B-Instruct"
POOLS = ("inference.networking.k8s.io", "v1", "inferencepools")
OBJECTIVES = ("inference.networking.x-k8s.io", "v1alpha2", "inferenceobjectives")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    emulator = EmulatorThread().start()

    def register() -> None:  # the extension's resources are served; its CRD objects come later
        assert emulator.kmock is not None
        for (group, version, plural), kind in ((POOLS, "InferencePool"), (OBJECTIVES, "InferenceObjective")):
            emulator.kmock.resources[f"{group}/{version}/{plural}"] = kmock.ResourceInfo(
                kind=kind, namespaced=True, verbs={"get", "list", "watch", "create", "patch", "update", "delete"})

    emulator.call(register)
    workdir = tmp_path_factory.mktemp("operator-cache")
    kubeconfig = emulator.write_kubeconfig(workdir / "kubeconfig")
    client = kubernetes.config.new_client_from_config(str(kubeconfig))
    state = {"emulator": emulator, "log": workdir / "operator.log", "client": client,
             "custom": kubernetes.client.CustomObjectsApi(client), "apps": kubernetes.client.AppsV1Api(client),
             "core": kubernetes.client.CoreV1Api(client), "batch": kubernetes.client.BatchV1Api(client),
             "ext": kubernetes.client.ApiextensionsV1Api(client)}
    before = emulator.watch_requests("/jobs"), emulator.watch_requests("/inferenceservices")
    state["proc"] = start_operator(kubeconfig, state["log"])
    wait_for(lambda: emulator.watch_requests("/jobs") > before[0]
             and emulator.watch_requests("/inferenceservices") > before[1], 30, what="operator watches")
    yield state
    stop_operator(state["proc"])
    emulator.stop()


def _service(name: str, **spec: Any) -> dict[str, Any]:
    obj = yaml.safe_load((REPO_ROOT / "examples" / "cpu-tiny.yaml").read_text())
    obj["metadata"] = {"name": name, "namespace": NS}
    obj["spec"].update(spec)
    return obj


def _cached(name: str, delete_policy: str = "Retain", revision: str = "main") -> dict[str, Any]:
    return _service(name, model={"source": SOURCE, "revision": revision, "servedModelName": name,
                                 "cache": {"enabled": True, "size": "5Gi", "deletePolicy": delete_policy}})


def _sanitized(cluster: dict[str, Any], obj: Any) -> dict[str, Any]:
    return cluster["client"].sanitize_for_serialization(obj)


def _get(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    return cluster["custom"].get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)


def _condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype), None)


def _missing(call: Any) -> bool:
    try:
        call()
    except kubernetes.client.ApiException as error:
        return error.status == 404
    return False


def _requests(cluster: dict[str, Any], method: str, fragment: str) -> list[Any]:
    return [r for r in list(cluster["emulator"].kmock) if str(r.method).upper().endswith(method) and fragment in str(r.url.path)]


def _finish_job(cluster: dict[str, Any], name: str) -> None:
    """What the Job controller does when the fill pod exits 0."""
    cluster["batch"].patch_namespaced_job_status(
        name, NS, {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}},
        _content_type="application/merge-patch+json")


def test_cache_is_filled_once_shared_and_gates_the_pods(cluster: dict[str, Any]) -> None:
    claim = claim_name(SOURCE, "main")
    cluster["custom"].create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, _cached("cache-a"))
    pvc = wait_for(lambda: cluster["core"].read_namespaced_persistent_volume_claim(claim, NS), what="the claim")
    job = wait_for(lambda: cluster["batch"].read_namespaced_job(job_name(claim), NS), what="the fill Job")
    assert pvc.spec.resources.requests["storage"] == "5Gi" and not pvc.metadata.owner_references
    assert job.metadata.labels[CACHE_LABEL] == claim
    fill = job.spec.template.spec.containers[0]
    assert SOURCE.removeprefix("hf://") in fill.command and "/mnt/models/model" in fill.command
    parent = wait_for(lambda: (p := _get(cluster, "cache-a")).get("status", {}).get("cache") and p, what="status.cache")
    assert parent["status"]["cache"]["claimName"] == claim
    assert parent["status"]["cache"]["phase"] in ("Pending", "Filling")
    assert _condition(parent, "ModelCached")["status"] == "False"
    assert _condition(parent, "Ready")["reason"] == "WaitingForModelCache"
    assert _missing(lambda: cluster["apps"].read_namespaced_deployment("cache-a", NS)), "pods must wait for the cache"

    # A second service on the same model and revision shares the claim: no second claim, no second Job.
    cluster["custom"].create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, _cached("cache-b", "Delete"))
    wait_for(lambda: (_get(cluster, "cache-b").get("status", {}).get("cache") or {}).get("claimName") == claim,
             what="the second service on the same claim")
    assert len([r for r in _requests(cluster, "POST", "/persistentvolumeclaims")
                if r.data and r.data["metadata"]["name"] == claim]) == 1
    assert len([r for r in _requests(cluster, "POST", "/jobs") if r.data and r.data["metadata"]["name"] == job_name(claim)]) == 1

    _finish_job(cluster, job_name(claim))
    for name in ("cache-a", "cache-b"):
        dep = _sanitized(cluster, wait_for(lambda n=name: cluster["apps"].read_namespaced_deployment(n, NS),
                                           what=f"{name}'s Deployment once the cache is filled"))
        pod = dep["spec"]["template"]["spec"]
        assert pod["volumes"][0] == {"name": "model-cache", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        assert "initContainers" not in pod
        container = pod["containers"][0]
        assert {"name": "model-cache", "mountPath": "/mnt/models", "readOnly": True} in container["volumeMounts"]
        assert container["args"][container["args"].index("--model") + 1] == "/mnt/models/model"
        parent = wait_for(lambda n=name: (p := _get(cluster, n))["status"]["cache"]["phase"] == "Ready" and p,
                          what=f"{name}'s cache Ready")
        assert _condition(parent, "ModelCached")["status"] == "True"
        assert parent["status"]["cache"]["sizeBytes"] == 5 * 2**30

    # Spec change: cache-a turns its cache off and is back on the per-pod download; the shared claim stays.
    spec = _get(cluster, "cache-a")["spec"]
    spec["model"]["cache"]["enabled"] = False
    cluster["custom"].patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "cache-a",
                                                     [{"op": "replace", "path": "/spec", "value": spec}])

    def downloading() -> dict[str, Any] | None:
        pod = _sanitized(cluster, cluster["apps"].read_namespaced_deployment("cache-a", NS))["spec"]["template"]["spec"]
        return pod if pod.get("initContainers") else None

    pod = wait_for(downloading, what="cache-a back on the download init container")
    assert [v["name"] for v in pod["volumes"]] == ["model-cache"] and "emptyDir" in pod["volumes"][0]
    wait_for(lambda: not _get(cluster, "cache-a")["status"].get("cache")
             and _condition(_get(cluster, "cache-a"), "ModelCached") is None, what="status.cache cleared")
    assert cluster["core"].read_namespaced_persistent_volume_claim(claim, NS).metadata.name == claim

    # Deleting: cache-a (Retain) keeps the claim; cache-b (Delete) is the last user, so it goes.
    cluster["custom"].delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "cache-a")
    wait_for(lambda: _missing(lambda: _get(cluster, "cache-a")), what="cache-a deleted")
    assert cluster["core"].read_namespaced_persistent_volume_claim(claim, NS).metadata.name == claim
    cluster["custom"].delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "cache-b")
    wait_for(lambda: _missing(lambda: cluster["core"].read_namespaced_persistent_volume_claim(claim, NS)),
             what="the claim deleted with its last Delete-policy user")
    assert _missing(lambda: cluster["batch"].read_namespaced_job(job_name(claim), NS))
    wait_for(lambda: _missing(lambda: _get(cluster, "cache-b")), what="cache-b's finalizer released")


def test_delete_policy_keeps_a_cache_another_service_still_uses(cluster: dict[str, Any]) -> None:
    claim = claim_name(SOURCE, "v2")
    cluster["custom"].create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, _cached("shared-x", "Delete", "v2"))
    cluster["custom"].create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, _cached("shared-y", "Retain", "v2"))
    wait_for(lambda: (_get(cluster, "shared-y").get("status", {}).get("cache") or {}).get("claimName") == claim,
             what="both services on one claim")
    wait_for(lambda: (_get(cluster, "shared-x").get("status", {}).get("cache") or {}).get("claimName") == claim,
             what="both services on one claim")
    assert claim != claim_name(SOURCE, "main")  # another revision is another cache
    # The fill fails: both services say so, with the Job's reason, and a Warning event.
    cluster["batch"].patch_namespaced_job_status(
        job_name(claim), NS, {"status": {"failed": 4, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}},
        _content_type="application/merge-patch+json")
    for name in ("shared-x", "shared-y"):
        parent = wait_for(lambda n=name: (p := _get(cluster, n))["status"]["cache"]["phase"] == "Failed" and p,
                          what=f"{name}'s cache Failed")
        assert parent["status"]["phase"] == "Failed"
        assert "backoff limit" in _condition(parent, "ModelCached")["message"]
    wait_for(lambda: [r for r in _requests(cluster, "POST", "/events") if r.data and r.data.get("reason") == "CacheFailed"],
             what="a CacheFailed event")
    cluster["custom"].delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "shared-x")
    wait_for(lambda: _missing(lambda: _get(cluster, "shared-x")), what="shared-x deleted")
    assert cluster["core"].read_namespaced_persistent_volume_claim(claim, NS).metadata.name == claim
    assert "still used by shared-y" in cluster["log"].read_text()


def _pool(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    return cluster["custom"].get_namespaced_custom_object(*POOLS[:2], NS, POOLS[2], name)


def _objective(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    return cluster["custom"].get_namespaced_custom_object(*OBJECTIVES[:2], NS, OBJECTIVES[2], name)


def _install_extension_crds(cluster: dict[str, Any]) -> None:
    for crd, (group, version, plural), kind in ((gateway.POOL_CRD, POOLS, "InferencePool"),
                                                (gateway.OBJECTIVE_CRD, OBJECTIVES, "InferenceObjective")):
        cluster["ext"].create_custom_resource_definition({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": crd},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"plural": plural, "singular": plural[:-1], "kind": kind},
                     "versions": [{"name": version, "served": True, "storage": True,
                                   "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}})


def test_gateway_pool_and_objective_follow_the_spec(cluster: dict[str, Any]) -> None:
    custom = cluster["custom"]
    # Before the extension is installed: nothing rendered, and the condition says why.
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, _service("routed", gateway={"enabled": True, "priority": 5}))
    parent = wait_for(lambda: (p := _get(cluster, "routed")) and _condition(p, "InferencePoolReady") and p,
                      what="InferencePoolReady")
    cond = _condition(parent, "InferencePoolReady")
    assert cond["status"] == "False" and cond["reason"] == "InferenceExtensionMissing"
    assert gateway.POOL_CRD in cond["message"]
    wait_for(lambda: [r for r in _requests(cluster, "POST", "/events")
                      if r.data and r.data.get("reason") == "InferenceExtensionMissing"], what="a Warning event")
    assert cluster["apps"].read_namespaced_deployment("routed", NS).metadata.name == "routed"  # serving goes on

    _install_extension_crds(cluster)
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "routed", {"spec": {"gateway": {"priority": 6}}})
    pool = wait_for(lambda: _pool(cluster, "routed"), what="the InferencePool")
    parent = _get(cluster, "routed")
    assert pool["spec"]["selector"]["matchLabels"] == {"serving.bowline.dev/inferenceservice": "routed"}
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"] == {"kind": "Service", "name": "routed-epp", "port": {"number": 9002},
                                                 "failureMode": "FailClose"}
    assert pool["metadata"]["ownerReferences"][0]["uid"] == parent["metadata"]["uid"]  # garbage-collected with it
    objective = wait_for(lambda: _objective(cluster, "routed"), what="the InferenceObjective")
    assert objective["spec"] == {"poolRef": {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "routed"},
                                 "priority": 6}
    wait_for(lambda: (_condition(_get(cluster, "routed"), "InferencePoolReady") or {}).get("status") == "True",
             what="InferencePoolReady True")
    assert _get(cluster, "routed")["status"]["gateway"] == {"poolName": "routed"}

    # Renamed pool and new priority: the objective follows, the old pool goes.
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "routed",
                                          {"spec": {"gateway": {"poolName": "routed-pool", "priority": 9}}})
    wait_for(lambda: _pool(cluster, "routed-pool"), what="the renamed pool")
    wait_for(lambda: _missing(lambda: _pool(cluster, "routed")), what="the old pool deleted")
    wait_for(lambda: _objective(cluster, "routed")["spec"]["priority"] == 9
             and _objective(cluster, "routed")["spec"]["poolRef"]["name"] == "routed-pool", what="the objective updated")

    # Disabled: both go, and so do status.gateway and the condition.
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "routed", {"spec": {"gateway": {"enabled": False}}})
    wait_for(lambda: _missing(lambda: _pool(cluster, "routed-pool")), what="the pool deleted")
    wait_for(lambda: _missing(lambda: _objective(cluster, "routed")), what="the objective deleted")
    wait_for(lambda: _condition(_get(cluster, "routed"), "InferencePoolReady") is None
             and not _get(cluster, "routed")["status"].get("gateway"), what="the gateway status cleared")
