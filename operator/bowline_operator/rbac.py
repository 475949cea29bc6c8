"""The Kubernetes permissions the operator needs, as data.

The Helm chart renders its ClusterRole from `REQUIRED_RULES` and a test checks the two agree, so a new
API call in the operator fails a test instead of failing in a cluster with a 403.
"""

from __future__ import annotations

from typing import TypedDict


class PolicyRule(TypedDict):
    """One rbac.authorization.k8s.io/v1 PolicyRule (only the fields the operator uses)."""

    apiGroups: list[str]
    resources: list[str]
    verbs: list[str]


REQUIRED_RULES: list[PolicyRule] = [
    # The custom resource itself: kopf watches it and patches annotations (handler progress, last-handled
    # spec); the operator writes status through the status subresource.
    {"apiGroups": ["serving.bowline.dev"], "resources": ["inferenceservices"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["serving.bowline.dev"], "resources": ["inferenceservices/status"], "verbs": ["get", "patch", "update"]},
    # Children: rendered, created and patched; watched so their status flows up to the parent.
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch", "create", "patch"]},
    # Model cache (model_cache.py): the shared claim and the Job that fills it are created once, never
    # patched; deleted with the last service whose cache.deletePolicy is Delete. Jobs are watched so a
    # finished fill starts the pods.
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get", "create", "delete"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
    # Inference gateway (gateway.py): applied like the other children, listed to delete renamed ones.
    {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"], "verbs": ["get", "list", "create", "patch", "delete"]},
    {"apiGroups": ["inference.networking.x-k8s.io"], "resources": ["inferenceobjectives"], "verbs": ["get", "list", "create", "patch", "delete"]},
    # Scale-out children (autoscaling.py): created, patched, and deleted when the spec stops asking for
    # them (an HPA after KEDA arrived, a PDB after scaling to one replica); never listed or watched.
    {"apiGroups": ["keda.sh"], "resources": ["scaledobjects"], "verbs": ["get", "create", "patch", "delete"]},
    {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": ["get", "create", "patch", "delete"]},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": ["get", "create", "patch", "delete"]},
    # Events: kopf.info/warn and the per-handler events kopf posts.
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    # kopf scans CRDs to resolve resources and watches namespaces when given namespace patterns.
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    # kopf peering: leader election between operator replicas (cluster-wide and per-namespace modes).
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"], "verbs": ["get", "list", "watch", "patch", "create"]},
    {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "verbs": ["get", "list", "watch", "patch", "create"]},
]
