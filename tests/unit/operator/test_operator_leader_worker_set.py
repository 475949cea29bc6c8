"""Multi-node InferenceServices: the rendered LeaderWorkerSet against the LWS CRD's schema, and the spec rules.

LWS_SCHEMA is the part of kubernetes-sigs/lws v0.10.0 `config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml`
(openAPIV3Schema of leaderworkerset.x-k8s.io/v1) that covers every field the operator renders: the same
types, enums, bounds and required lists, with additionalProperties false where the CRD lists all fields,
so a misspelt or invented field fails here as the API server would prune or refuse it. The pod templates
are checked as Pods against Kubernetes' own schema.
"""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
from bowline_operator.leader_worker_set import LWS_API_VERSION, WORKER_INDEX_LABEL, rollout_view
from bowline_operator.render import Owner, render_children
from bowline_operator.status import compute_status
from bowline_operator.validation import validate_spec
from operator_crd_tools import apply_defaults, cel_failures, example, schema, schema_errors

K8S_VERSION = "1.33"
LWS_VERSION = "v0.10.0"

_INT32 = {"type": "integer", "format": "int32"}
_INT_OR_STRING = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
_TEMPLATE = {"type": "object", "properties": {"metadata": {"type": "object"}, "spec": {"type": "object",
                                                                                      "required": ["containers"]}},
             "additionalProperties": False}
LWS_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
        "kind": {"const": "LeaderWorkerSet"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["leaderWorkerTemplate"],
            "additionalProperties": False,
            "properties": {
                "replicas": {**_INT32, "minimum": 0},
                "startupPolicy": {"type": "string", "enum": ["LeaderCreated", "LeaderReady"]},
                "networkConfig": {"type": "object", "required": ["subdomainPolicy"], "properties": {
                    "subdomainPolicy": {"type": "string", "enum": ["Shared", "UniquePerReplica"]}}},
                "rolloutStrategy": {
                    "type": "object", "required": ["type"], "additionalProperties": False,
                    "properties": {
                        "type": {"type": "string", "enum": ["RollingUpdate"]},
                        "rollingUpdateConfiguration": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"maxSurge": _INT_OR_STRING, "maxUnavailable": _INT_OR_STRING,
                                           "partition": _INT32},
                        },
                    },
                },
                "leaderWorkerTemplate": {
                    "type": "object", "required": ["workerTemplate"], "additionalProperties": False,
                    "properties": {
                        "size": _INT32,
                        "restartPolicy": {"type": "string", "enum": ["Default", "RecreateGroupOnPodRestart",
                                                                     "RecreateGroupAfterStart", "None"]},
                        "leaderTemplate": _TEMPLATE,
                        "workerTemplate": _TEMPLATE,
                        "subGroupPolicy": {"type": "object"},
                        "volumeClaimTemplates": {"type": "array"},
                        "persistentVolumeClaimRetentionPolicy": {"type": "object"},
                    },
                },
            },
        },
    },
}

OWNER = Owner(name="big", namespace="ns", uid="0000-1111")


def _rendered(spec_dict: dict) -> list[dict]:
    checked = validate_spec(apply_defaults(schema(), {"spec": spec_dict})["spec"])
    assert checked.ok, checked.problems
    return render_children(OWNER, checked.spec)


@pytest.fixture(scope="module")
def children() -> list[dict]:
    return _rendered(example("multi-node-npu")["spec"])


def test_example_passes_schema_cel_and_operator() -> None:
    obj = example("multi-node-npu")
    assert schema_errors(obj) == [] and cel_failures(obj) == [] and validate_spec(obj["spec"]).ok


def test_rendered_leader_worker_set_validates_against_the_lws_crd_schema(children) -> None:
    service, lws = children
    assert [c["kind"] for c in children] == ["Service", "LeaderWorkerSet"]
    jsonschema.Draft7Validator(LWS_SCHEMA).validate(lws)
    kubernetes_validate.validate(service, K8S_VERSION, strict=True)
    for role in ("leaderTemplate", "workerTemplate"):
        template = lws["spec"]["leaderWorkerTemplate"][role]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **template["metadata"]},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_one_group_of_nodes_pods_per_replica_recreated_whole(children) -> None:
    _, lws = children
    assert lws["apiVersion"] == LWS_API_VERSION
    assert lws["spec"]["replicas"] == 1
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2 and group["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lws["metadata"]["ownerReferences"][0]["name"] == "big"


def test_leader_and_worker_pods_share_the_accelerator_profile_and_only_the_leader_serves(children) -> None:
    service, lws = children
    assert service["spec"]["selector"][WORKER_INDEX_LABEL] == "0"
    leader = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
    worker = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    lc, wc = leader["containers"][0], worker["containers"][0]
    for c in (lc, wc):
        assert c["resources"]["limits"]["huawei.com/ascend-1980"] == "8"
        assert {"name": "ASCEND_RT_VISIBLE_DEVICES", "value": "0,1,2,3,4,5,6,7"} in c["env"]
        assert c["args"][c["args"].index("--tensor-parallel-size") + 1] == "8"
        assert c["args"][c["args"].index("--pipeline-parallel-size") + 1] == "2"
        assert "--nnodes" not in c["args"] and "--node-rank" not in c["args"]  # from LWS_* env in each pod
    assert leader["volumes"] == worker["volumes"] and lc["volumeMounts"] == wc["volumeMounts"]
    assert leader["nodeSelector"] == worker["nodeSelector"]
    assert lc["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "readinessProbe" not in wc and "livenessProbe" not in wc
    assert 8080 not in [p["containerPort"] for p in wc.get("ports", [])]


def test_one_node_still_renders_a_deployment() -> None:
    spec = copy.deepcopy(example("ascend-npu")["spec"])
    assert [c["kind"] for c in _rendered(spec)] == ["Service", "Deployment"]


def test_status_counts_ready_groups() -> None:
    spec = validate_spec(example("multi-node-npu")["spec"]).spec
    lws = {"metadata": {"generation": 3}, "status": {"observedGeneration": 3, "replicas": 1, "readyReplicas": 1,
                                                     "updatedReplicas": 1, "conditions": [
                                                         {"type": "Available", "status": "True"},
                                                         {"type": "Progressing", "status": "False"}]}}
    status = compute_status(OWNER, spec, 1, rollout_view(lws), "2026-01-01T00:00:00Z")
    assert status["phase"] == "Ready" and status["readyReplicas"] == 1


# (mutation of the multi-node example, the CRD rule message the API server would answer with)
CASES = [
    (lambda s: s.update(pipelineParallelSize=1), "tensorParallelSize × pipelineParallelSize must equal nodes × accelerator.count"),
    (lambda s: s.update(nodes=4), "tensorParallelSize × pipelineParallelSize must equal nodes × accelerator.count"),
    (lambda s: (s["accelerator"].clear(), s["accelerator"].update(type="cpu"), s.update(nodes=3)),
     "tensorParallelSize × pipelineParallelSize must be a multiple of nodes"),
    (lambda s: s.update(autoscaling=example("autoscaling")["spec"]["autoscaling"]),
     "autoscaling and model.cache apply to one-node services (nodes: 1) only"),
    (lambda s: s.update(model=example("model-cache")["spec"]["model"]),
     "autoscaling and model.cache apply to one-node services (nodes: 1) only"),
    (lambda s: s["engine"].update(extraArgs=["--node-rank=1"]),
     "engine.extraArgs must not set flags the operator manages; use the matching spec field"),
]


@pytest.mark.parametrize(("mutate", "message"), CASES)
def test_cel_rules_and_operator_agree_on_multi_node_shapes(mutate, message: str) -> None:
    obj = copy.deepcopy(example("multi-node-npu"))
    mutate(obj["spec"])
    assert message in cel_failures(obj)
    checked = validate_spec(apply_defaults(schema(), obj)["spec"])
    assert not checked.ok and message in checked.problems


def test_tp16_over_two_nodes_of_eight_is_valid() -> None:
    obj = copy.deepcopy(example("multi-node-npu"))
    obj["spec"].update(tensorParallelSize=16, pipelineParallelSize=1)
    assert cel_failures(obj) == [] and validate_spec(apply_defaults(schema(), obj)["spec"]).ok
