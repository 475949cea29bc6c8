"""Pure rendering for models larger than one node: a LeaderWorkerSet (kubernetes-sigs/lws) instead of a Deployment.

With `spec.nodes` > 1 one model copy is a group of `nodes` pods: LWS creates `replicas` such groups,
gives every pod LWS_LEADER_ADDRESS, LWS_GROUP_SIZE and LWS_WORKER_INDEX (which the runtime reads as
--master-addr, --nnodes and --node-rank), and with RecreateGroupOnPodRestart recreates the whole group
when any of its pods restarts, which is the only safe recovery for a torch.distributed group. The
leader (worker index 0) serves HTTP and is the only pod the Service selects; the workers run ranks.
Both templates come from the same pod template as the single-node Deployment, so accelerator mounts,
env and resources are per pod exactly as there.
"""

from __future__ import annotations

import copy
from typing import Any

from .render import PORT_NAME, Owner, common_labels, owner_reference, render_deployment, render_service
from .spec import InferenceServiceSpec

LWS_GROUP = "leaderworkerset.x-k8s.io"
LWS_VERSION = "v1"
LWS_API_VERSION = f"{LWS_GROUP}/{LWS_VERSION}"
LWS_KIND = "LeaderWorkerSet"
LWS_PLURAL = "leaderworkersets"
LWS_CRD_NAME = f"{LWS_PLURAL}.{LWS_GROUP}"
# The label LWS puts on every pod of a group: "0" on the leader.
WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
# The runtime's rendezvous port on the leader (--master-port); the next one carries its liveness watch.
RENDEZVOUS_PORT = 29501

MISSING_CRD_MESSAGE = (
    f"nodes > 1 needs the LeaderWorkerSet CRD ({LWS_CRD_NAME}), which this cluster does not have: install "
    "LeaderWorkerSet (https://lws.sigs.k8s.io) or set nodes to 1"
)


def is_multi_node(spec: InferenceServiceSpec) -> bool:
    return spec.nodes > 1


def _group_args(spec: InferenceServiceSpec) -> list[str]:
    """Flags every pod of a group adds to the single-node ones; --nnodes/--node-rank/--master-addr come from LWS env."""
    args = ["--master-port", str(RENDEZVOUS_PORT)]
    if spec.pipeline_parallel_size > 1:
        args += ["--pipeline-parallel-size", str(spec.pipeline_parallel_size)]
    return args


def _templates(owner: Owner, spec: InferenceServiceSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(leader, worker) pod templates from the Deployment's: the worker serves no HTTP, so no probes or port."""
    template = render_deployment(owner, spec)["spec"]["template"]
    leader = copy.deepcopy(template)
    container = leader["spec"]["containers"][0]
    container["args"] = [*container["args"], *_group_args(spec)]
    container["ports"] = [
        *container["ports"],
        {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
        {"name": "rank-watch", "containerPort": RENDEZVOUS_PORT + 1, "protocol": "TCP"},
    ]
    worker = copy.deepcopy(leader)
    wcontainer = worker["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        wcontainer.pop(probe, None)
    wcontainer["ports"] = [p for p in wcontainer["ports"] if p["name"] not in (PORT_NAME, "rendezvous", "rank-watch")]
    if not wcontainer["ports"]:
        del wcontainer["ports"]
    worker["metadata"]["annotations"] = {
        k: v for k, v in worker["metadata"].get("annotations", {}).items() if not k.startswith("prometheus.io/")
    }
    return leader, worker


def render_leader_worker_set(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """One group of `nodes` pods per replica."""
    leader, worker = _templates(owner, spec)
    return {
        "apiVersion": LWS_API_VERSION,
        "kind": LWS_KIND,
        "metadata": {"name": owner.name, "namespace": owner.namespace, "labels": common_labels(owner),
                     "ownerReferences": [owner_reference(owner)]},
        "spec": {
            "replicas": spec.replicas,
            "startupPolicy": "LeaderCreated",
            # One group at a time: accelerator groups cannot surge (the new one waits for the old one's devices).
            "rolloutStrategy": {"type": "RollingUpdate",
                                "rollingUpdateConfiguration": {"maxUnavailable": 1, "maxSurge": 0}},
            "leaderWorkerTemplate": {
                "size": spec.nodes,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": leader,
                "workerTemplate": worker,
            },
        },
    }


def render_leader_service(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The Service of a multi-node copy selects leaders only: the workers serve no HTTP."""
    service = render_service(owner, spec)
    service["spec"]["selector"] = {**service["spec"]["selector"], WORKER_INDEX_LABEL: "0"}
    return service


def render_multi_node_children(owner: Owner, spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    return [render_leader_service(owner, spec), render_leader_worker_set(owner, spec)]


def rollout_view(lws: dict[str, Any]) -> dict[str, Any]:
    """A LeaderWorkerSet's ready groups in the Deployment shape `status.compute_status` reads.

    Its counters count groups (replicas), like a Deployment's count pods; its conditions are left out:
    LWS turns Progressing False once Available, which a Deployment uses for a stuck rollout.
    """
    status = lws.get("status") or {}
    keys = ("observedGeneration", "replicas", "readyReplicas", "updatedReplicas")
    return {"metadata": {"generation": lws.get("metadata", {}).get("generation")},
            "status": {k: status[k] for k in keys if k in status}}
