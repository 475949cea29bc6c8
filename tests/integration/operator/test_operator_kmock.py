"""The real operator process against kmock's Kubernetes emulation, driven with the `kubernetes` client.

One operator process serves the whole module (startup costs ~1 s); each test uses its own object names.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
import yaml
from operator_emulator import REPO_ROOT, EmulatorThread, start_operator, stop_operator, wait_for

NS = "default"
GROUP, VERSION, PLURAL = "serving.bowline.dev", "v1alpha1", "inferenceservices"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    emulator = EmulatorThread().start()
    workdir = tmp_path_factory.mktemp("operator")
    kubeconfig = emulator.write_kubeconfig(workdir / "kubeconfig")
    client = kubernetes.config.new_client_from_config(str(kubeconfig))
    log = workdir / "operator.log"
    state = {"emulator": emulator, "kubeconfig": kubeconfig, "log": log,
             "custom": kubernetes.client.CustomObjectsApi(client), "apps": kubernetes.client.AppsV1Api(client),
             "core": kubernetes.client.CoreV1Api(client)}
    state["proc"] = _start(state)
    yield state
    stop_operator(state["proc"])
    emulator.stop()


def _start(state: dict[str, Any]) -> Any:
    """Start the operator and wait until it watches (objects created earlier could be missed by kmock)."""
    emulator: EmulatorThread = state["emulator"]
    before = emulator.watch_requests("/deployments"), emulator.watch_requests("/inferenceservices")
    proc = start_operator(state["kubeconfig"], state["log"])
    wait_for(lambda: emulator.watch_requests("/deployments") > before[0]
             and emulator.watch_requests("/inferenceservices") > before[1], 30, what="operator watches")
    return proc


def _example(name: str, new_name: str) -> dict[str, Any]:
    obj = yaml.safe_load((REPO_ROOT / "examples" / f"{name}.yaml").read_text())
    obj["metadata"] = {"name": new_name, "namespace": NS}
    return obj


def _create(cluster: dict[str, Any], obj: dict[str, Any]) -> None:
    cluster["custom"].create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, obj)


def _get(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    return cluster["custom"].get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)


def _condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype), None)


def _deployment(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    return cluster["apps"].api_client.sanitize_for_serialization(cluster["apps"].read_namespaced_deployment(name, NS))


def _requests(cluster: dict[str, Any], method: str, fragment: str) -> list[Any]:
    return [r for r in list(cluster["emulator"].kmock) if str(r.method).upper().endswith(method) and fragment in str(r.url.path)]


def test_create_renders_children_and_status(cluster: dict[str, Any]) -> None:
    _create(cluster, _example("nvidia-gpu", "gpu-a"))
    dep = wait_for(lambda: _deployment(cluster, "gpu-a"), what="Deployment")
    svc = cluster["core"].read_namespaced_service("gpu-a", NS)
    parent = _get(cluster, "gpu-a")

    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    args = container["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--max-model-len") + 1] == "32768"
    assert dep["metadata"]["ownerReferences"][0]["uid"] == parent["metadata"]["uid"]
    assert svc.spec.ports[0].port == 8000
    assert svc.metadata.owner_references[0].name == "gpu-a"

    parent = wait_for(lambda: (p := _get(cluster, "gpu-a")).get("status", {}).get("url") and p, what="status")
    assert parent["status"]["url"] == "http://gpu-a.default.svc.cluster.local:8000/v1"
    assert parent["status"]["device"] == "gpu×2"
    assert _condition(parent, "Valid")["status"] == "True"
    assert _condition(parent, "Ready")["status"] == "False"
    assert parent["status"]["phase"] == "Pending"


def test_editing_max_model_len_rolls_the_deployment(cluster: dict[str, Any]) -> None:
    _create(cluster, _example("cpu-tiny", "tiny-edit"))
    wait_for(lambda: _deployment(cluster, "tiny-edit"), what="Deployment")
    cluster["custom"].patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "tiny-edit", {"spec": {"maxModelLen": 1024}})

    def rolled() -> bool:
        args = _deployment(cluster, "tiny-edit")["spec"]["template"]["spec"]["containers"][0]["args"]
        return args[args.index("--max-model-len") + 1] == "1024"

    wait_for(rolled, what="new --max-model-len in the Deployment")
    parent = wait_for(lambda: (p := _get(cluster, "tiny-edit"))["status"].get("observedGeneration") == 2 and p,
                      what="observedGeneration 2")
    assert _condition(parent, "Valid")["observedGeneration"] == 2


def test_ready_deployment_makes_the_parent_ready(cluster: dict[str, Any]) -> None:
    _create(cluster, _example("cpu-tiny", "tiny-ready"))
    dep = wait_for(lambda: _deployment(cluster, "tiny-ready"), what="Deployment")
    generation = dep["metadata"].get("generation", 1)
    cluster["apps"].patch_namespaced_deployment_status(
        "tiny-ready", NS, {"status": {"observedGeneration": generation, "replicas": 1, "readyReplicas": 1,
                                      "updatedReplicas": 1, "availableReplicas": 1}},
        _content_type="application/merge-patch+json")
    parent = wait_for(lambda: (p := _get(cluster, "tiny-ready"))["status"].get("phase") == "Ready" and p, what="Ready")
    assert parent["status"]["readyReplicas"] == 1
    assert parent["status"]["ready"] == "1/1"
    assert _condition(parent, "Ready")["status"] == "True"
    assert _condition(parent, "Progressing")["reason"] == "RolloutComplete"


def test_invalid_spec_reports_and_creates_nothing(cluster: dict[str, Any]) -> None:
    bad = _example("nvidia-gpu", "gpu-bad")
    bad["spec"]["tensorParallelSize"] = 3  # 3 does not divide 2 GPUs, and exceeds them
    _create(cluster, bad)
    parent = wait_for(lambda: (p := _get(cluster, "gpu-bad")).get("status", {}).get("phase") == "Failed" and p,
                      what="Failed")
    valid = _condition(parent, "Valid")
    assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
    assert "tensorParallelSize must divide accelerator.count" in valid["message"]
    wait_for(lambda: any(r.data and r.data.get("reason") == "InvalidSpec"
                         for r in _requests(cluster, "POST", "/events")), what="a Kubernetes Event")
    assert not _requests(cluster, "POST", "/deployments") or all(
        r.data["metadata"]["name"] != "gpu-bad" for r in _requests(cluster, "POST", "/deployments"))
    with pytest.raises(kubernetes.client.ApiException) as error:
        cluster["apps"].read_namespaced_deployment("gpu-bad", NS)
    assert error.value.status == 404


def test_api_errors_once_are_retried_without_loss(cluster: dict[str, Any]) -> None:
    # A fresh namespace: kmock's `[:1]` slices count from the first matching request ever seen.
    emulator: EmulatorThread = cluster["emulator"]
    ns, name = "flaky", "tiny-flaky"
    services = f"/api/v1/namespaces/{ns}/services"
    status_path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}/{name}/status"
    emulator.call(lambda: emulator.kmock[f"post {services}"][:1] << 500)
    emulator.call(lambda: emulator.kmock[f"patch {status_path}"][:1] << 409)
    obj = _example("cpu-tiny", name)
    obj["metadata"]["namespace"] = ns
    cluster["custom"].create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, obj)

    def status() -> dict[str, Any] | None:
        parent = cluster["custom"].get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        return parent if parent.get("status", {}).get("url") else None

    parent = wait_for(status, 20, what="status")
    assert _condition(parent, "Valid")["status"] == "True"
    assert cluster["core"].read_namespaced_service(name, ns).metadata.name == name
    assert cluster["apps"].read_namespaced_deployment(name, ns).spec.replicas == 1
    # The injected errors were really answered, and the operator retried each. (kmock stores a created
    # object even when a reaction answers 500, so the retry finds the Service and creates no duplicate.)
    assert emulator.call(lambda: len(list(emulator.kmock[f"post {services}"]))) == 1
    log = cluster["log"].read_text()
    assert "API answered 500; retrying" in log and "API answered 409; retrying" in log


def test_restart_does_not_duplicate_or_churn_children(cluster: dict[str, Any]) -> None:
    _create(cluster, _example("ascend-npu", "npu-restart"))
    wait_for(lambda: _get(cluster, "npu-restart").get("status", {}).get("url"), what="status")
    time.sleep(0.5)  # let the Deployment event round settle
    stop_operator(cluster["proc"])
    before = {k: len(_requests(cluster, m, p)) for k, (m, p) in {
        "post": ("POST", "/deployments"), "patch": ("PATCH", "/deployments"),
        "spost": ("POST", "/services"), "spatch": ("PATCH", "/services")}.items()}
    cluster["proc"] = _start(cluster)
    # Resuming re-reconciles every existing object; give it time to touch them all.
    wait_for(lambda: "Resuming" in cluster["log"].read_text() or "resum" in cluster["log"].read_text().lower(), 10,
             what="resume")
    time.sleep(1.5)
    after = {k: len(_requests(cluster, m, p)) for k, (m, p) in {
        "post": ("POST", "/deployments"), "patch": ("PATCH", "/deployments"),
        "spost": ("POST", "/services"), "spatch": ("PATCH", "/services")}.items()}
    assert after == before, "a restarted operator must not create or patch unchanged children"
    names = [d.metadata.name for d in cluster["apps"].list_namespaced_deployment(NS).items]
    assert names.count("npu-restart") == 1


def test_removed_runtime_fields_leave_the_deployment(cluster: dict[str, Any]) -> None:
    obj = _example("cpu-tiny", "tiny-stale")
    obj["spec"].setdefault("runtime", {}).update(
        podLabels={"team": "ml"}, podAnnotations={"example.com/owner": "ml"},
        nodeSelector={"pool": "cpu", "zone": "z1"}, serviceAccountName="runner", schedulerName="volcano")
    _create(cluster, obj)
    template = wait_for(lambda: _deployment(cluster, "tiny-stale"), what="Deployment")["spec"]["template"]
    assert template["metadata"]["labels"]["team"] == "ml"
    # Someone else's label on the pod template: not the operator's to remove.
    cluster["apps"].patch_namespaced_deployment(
        "tiny-stale", NS, {"spec": {"template": {"metadata": {"labels": {"added-by": "someone"}}}}},
        _content_type="application/merge-patch+json")
    runtime = {**obj["spec"]["runtime"], "podLabels": {}, "podAnnotations": {}, "nodeSelector": {"pool": "cpu"},
               "serviceAccountName": None, "schedulerName": None}
    _replace_spec(cluster, "tiny-stale", {**obj["spec"], "runtime": {k: v for k, v in runtime.items() if v is not None}})

    def cleaned() -> dict[str, Any] | None:
        template = _deployment(cluster, "tiny-stale")["spec"]["template"]
        return None if "team" in template["metadata"]["labels"] else template

    template = wait_for(cleaned, what="the removed pod label gone")
    pod = template["spec"]
    assert template["metadata"]["labels"]["added-by"] == "someone"
    assert "example.com/owner" not in template["metadata"].get("annotations", {})
    assert pod["nodeSelector"] == {"pool": "cpu"}
    assert "serviceAccountName" not in pod and "schedulerName" not in pod


def _replace_spec(cluster: dict[str, Any], name: str, spec: dict[str, Any]) -> None:
    """A user's edit that drops keys (as `kubectl apply` or `edit` would): a JSON patch replacing the spec."""
    cluster["custom"].patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, name, [{"op": "replace", "path": "/spec", "value": spec}])
