"""Model cache rendering: the shared claim, the fill Job, the Deployment on the claim, and the status."""

from __future__ import annotations

import copy
import re
from typing import Any

import kubernetes_validate
import pytest
from bowline_operator import model_cache
from bowline_operator.model_cache import cache_state, claim_name, quantity_bytes
from bowline_operator.render import Owner, render_children
from bowline_operator.status import condition
from bowline_operator.validation import validate_spec
from operator_crd_tools import apply_defaults, cel_failures, example, schema, schema_errors

K8S_VERSION = "1.33"
OWNER = Owner(name="svc", namespace="ml", uid="1234-abcd")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _spec(**cache: Any) -> Any:
    obj = example("model-cache")
    obj["spec"]["model"]["cache"].update(cache)
    checked = validate_spec(apply_defaults(schema(), obj)["spec"])
    assert checked.ok, checked.problems
    return checked.spec


def test_example_passes_schema_cel_and_operator() -> None:
    obj = example("model-cache")
    assert schema_errors(obj) == [] and cel_failures(obj) == []
    assert validate_spec(obj["spec"]).ok


def test_claim_name_is_per_source_and_revision_and_a_valid_name() -> None:
    a = claim_name("hf://Qwen/Qwen2.5-0.5B-Instruct", "main")
    assert a == claim_name("hf://Qwen/Qwen2.5-0.5B-Instruct", None)  # main is the default revision
    assert a.startswith("model-qwen-qwen2-5-0-5b-instruct-main-")
    others = {claim_name("hf://Qwen/Qwen2.5-0.5B-Instruct", "v2"), claim_name("hf://qwen/qwen2.5-0.5b-instruct", "main"),
              claim_name("hf://Qwen/Qwen2-5-0-5B-Instruct", "main"), claim_name("/models/tiny", None)}
    assert a not in others and len(others) == 4  # names that sanitize alike still differ by the hash
    long = claim_name("hf://some-organisation-with-a-long-name/" + "x" * 200, "refs/pr/12")
    for name in (a, long, *others):
        assert DNS_LABEL.match(name) and len(name) <= 57, name
        assert len(model_cache.job_name(name)) <= 63


def test_claim_and_job_are_valid_shared_and_unowned() -> None:
    spec = _spec(storageClassName="fast", accessMode="ReadWriteMany")
    claim, job = model_cache.render_claim(OWNER, spec), model_cache.render_job(OWNER, spec)
    for obj in (claim, job):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert "ownerReferences" not in obj["metadata"]  # outlives any one InferenceService
        assert obj["metadata"]["labels"][model_cache.CACHE_LABEL] == claim["metadata"]["name"]
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "5Gi"}},
                             "storageClassName": "fast"}
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["volumes"] == [{"name": "model-cache", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}]
    (fill,) = pod["containers"]
    # The same download step as the init container without a cache, into the claim's model folder.
    assert fill["command"][:2] == ["python", "-c"] and "snapshot_download" in fill["command"][2]
    assert fill["command"][3:] == ["Qwen/Qwen2.5-0.5B-Instruct", "main", "/mnt/models/model"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"] == 1000
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


def test_image_path_is_copied_and_gated_secret_passed() -> None:
    obj = apply_defaults(schema(), example("model-cache"))
    obj["spec"]["model"] = {"source": "/models/tiny", "cache": {"enabled": True}}
    spec = validate_spec(obj["spec"]).spec
    fill = model_cache.render_job(OWNER, spec)["spec"]["template"]["spec"]["containers"][0]
    assert "copytree" in fill["command"][2] and fill["command"][3:] == ["/models/tiny", "/mnt/models/model"]
    assert model_cache.render_claim(OWNER, spec)["spec"]["resources"]["requests"]["storage"] == "100Gi"
    obj["spec"]["model"] = {"source": "hf://org/gated", "hfTokenSecretName": "hf", "cache": {"enabled": True}}
    fill = model_cache.render_job(OWNER, validate_spec(obj["spec"]).spec)["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in fill["env"]


def test_deployment_reads_the_claim_read_only_without_download() -> None:
    spec = _spec()
    service, deployment = render_children(OWNER, spec)
    assert deployment["spec"]["template"]["spec"]["initContainers"]  # without the cache: the download
    cached = model_cache.mount_cache(copy.deepcopy(deployment), spec)
    kubernetes_validate.validate(cached, K8S_VERSION, strict=True)
    pod = cached["spec"]["template"]["spec"]
    claim = claim_name("hf://Qwen/Qwen2.5-0.5B-Instruct", "main")
    assert "initContainers" not in pod
    assert pod["volumes"] == [{"name": "model-cache", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]
    # No recursive chown of the weights at every start.
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    (container,) = pod["containers"]
    assert container["volumeMounts"] == [{"name": "model-cache", "mountPath": "/mnt/models", "readOnly": True}]
    args = container["args"]
    assert args[args.index("--model") + 1] == "/mnt/models/model"


@pytest.mark.parametrize("source", ["pvc://weights/llama", "hostPath:///data/llama"])
def test_cache_on_a_volume_source_is_refused_by_cel_and_operator(source: str) -> None:
    obj = example("model-cache")
    obj["spec"]["model"]["source"] = source
    message = "model.cache applies to hf:// sources and paths in the image; pvc:// and hostPath:// are volumes already"
    assert message in cel_failures(obj)
    checked = validate_spec(apply_defaults(schema(), obj)["spec"])
    assert not checked.ok and message in checked.problems
    obj["spec"]["model"]["cache"]["enabled"] = False
    assert cel_failures(obj) == [] and validate_spec(obj["spec"]).ok


@pytest.mark.parametrize(("quantity", "expected"), [("5Gi", 5 * 2**30), ("100Gi", 100 * 2**30), ("1500M", 1_500_000_000),
                                                    ("5e9", 5_000_000_000), (1024, 1024), ("1.5Ki", 1536),
                                                    ("lots", None), (None, None)])
def test_quantity_bytes(quantity: Any, expected: int | None) -> None:
    assert quantity_bytes(quantity) == expected


CLAIM = {"spec": {"resources": {"requests": {"storage": "5Gi"}}}, "status": {"phase": "Bound", "capacity": {"storage": "8Gi"}}}


@pytest.mark.parametrize(("live_claim", "job", "phase", "size"), [
    (None, None, "Pending", None),
    (CLAIM, None, "Pending", 8 * 2**30),
    ({"spec": CLAIM["spec"], "status": {"phase": "Pending"}}, {"status": {}}, "Pending", 5 * 2**30),
    (CLAIM, {"status": {"active": 1}}, "Filling", 8 * 2**30),
    (CLAIM, {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}, "Ready", 8 * 2**30),
    (CLAIM, {"status": {"failed": 4, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}},
     "Failed", 8 * 2**30),
])
def test_cache_phase_from_live_objects(live_claim: Any, job: Any, phase: str, size: int | None) -> None:
    state = cache_state("c", live_claim, job)
    assert (state.phase, state.size_bytes, state.ready) == (phase, size, phase == "Ready")
    if phase == "Failed":
        assert "BackoffLimitExceeded" in state.message and "Delete the Job c-fill to retry" in state.message


def _base_status() -> dict[str, Any]:
    return {"phase": "Pending", "conditions": [
        condition("Valid", True, "SpecValid", "ok", 1, "t0"), condition("Progressing", True, "RollingOut", "x", 1, "t0"),
        condition("Ready", False, "DeploymentMissing", "The runtime Deployment is being created.", 1, "t0")]}


def _make(ctype: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
    return condition(ctype, ok, reason, message, 1, "t1")


def test_status_while_waiting_ready_and_failed() -> None:
    waiting = model_cache.apply_status(_base_status(), cache_state("c", CLAIM, {"status": {"active": 1}}), _make, True)
    conds = {c["type"]: c for c in waiting["conditions"]}
    assert waiting["cache"] == {"phase": "Filling", "claimName": "c", "sizeBytes": 8 * 2**30}
    assert waiting["phase"] == "Pending"
    assert conds["Ready"]["reason"] == "WaitingForModelCache" and "c-fill" in conds["Ready"]["message"]
    assert conds["ModelCached"]["status"] == "False" and conds["ModelCached"]["reason"] == "CacheFilling"

    failed_job = {"status": {"conditions": [{"type": "Failed", "status": "True", "message": "401 from the Hub"}]}}
    failed = model_cache.apply_status(_base_status(), cache_state("c", CLAIM, failed_job), _make, True)
    conds = {c["type"]: c for c in failed["conditions"]}
    assert failed["phase"] == "Failed" and conds["Progressing"]["status"] == "False"
    assert "401 from the Hub" in conds["ModelCached"]["message"]

    ready_job = {"status": {"succeeded": 1}}
    ready = model_cache.apply_status(_base_status(), cache_state("c", CLAIM, ready_job), _make, False)
    assert ready["phase"] == "Pending" and {c["type"]: c for c in ready["conditions"]}["ModelCached"]["status"] == "True"
    assert model_cache.apply_status(_base_status(), None, _make, False)["cache"] is None  # stale status.cache is deleted


def test_users_counts_only_live_services_on_the_same_claim() -> None:
    claim = claim_name("hf://a/b", "main")

    def svc(name: str, uid: str, source: str = "hf://a/b", enabled: bool = True, deleting: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "uid": uid}
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {"metadata": meta, "spec": {"model": {"source": source, "cache": {"enabled": enabled}}}}

    services = [svc("me", "1"), svc("twin", "2"), svc("other-model", "3", "hf://a/c"), svc("uncached", "4", enabled=False),
                svc("going", "5", deleting=True), svc("volume", "6", "pvc://x/y")]
    assert model_cache.users(claim, services, exclude_uid="1") == ["twin"]


def _undescribed(node: dict[str, Any], path: str) -> list[str]:
    missing = [] if node.get("description") else [path]
    for key, sub in (node.get("properties") or {}).items():
        missing += _undescribed(sub, f"{path}.{key}")
    return missing


def test_kubectl_explain_describes_every_cache_and_gateway_field() -> None:
    props = schema()["properties"]
    nodes = {"spec.model.cache": props["spec"]["properties"]["model"]["properties"]["cache"],
             "spec.gateway": props["spec"]["properties"]["gateway"],
             "status.cache": props["status"]["properties"]["cache"],
             "status.gateway": props["status"]["properties"]["gateway"]}
    assert [m for path, node in nodes.items() for m in _undescribed(node, path)] == []
    assert set(nodes["spec.model.cache"]["properties"]) == {"enabled", "storageClassName", "size", "accessMode", "deletePolicy"}
    assert set(nodes["status.cache"]["properties"]) == {"phase", "claimName", "sizeBytes"}


def test_size_must_be_a_quantity_for_the_schema_and_the_operator() -> None:
    obj = example("model-cache")
    for good in ("20Gi", "500M", "1.5Ti", 10**10):
        obj["spec"]["model"]["cache"]["size"] = good
        assert schema_errors(obj) == [] and validate_spec(obj["spec"]).ok, good
    for bad in ("5GB", "-3Gi", "lots"):
        obj["spec"]["model"]["cache"]["size"] = bad
        assert any(e.startswith("spec.model.cache.size") for e in schema_errors(obj)), bad
        assert any(p.startswith("spec.model.cache.size") for p in validate_spec(obj["spec"]).problems), bad
