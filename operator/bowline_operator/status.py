"""Pure status computation: the parent's phase, conditions and URL from its spec and child Deployment.

Kept free of I/O so every phase transition is a unit test. Conditions keep their lastTransitionTime
while their status does not change, as Kubernetes conventions ask, so a no-op reconcile writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .autoscaling import desired_replicas
from .lora import status_fields as lora_status
from .render import Owner, device_summary, served_model_name, service_url
from .spec import InferenceServiceSpec

Condition = dict[str, Any]


def condition(ctype: str, ok: bool, reason: str, message: str, generation: int | None, now: str,
              previous: Sequence[Condition] = ()) -> Condition:
    """One condition; lastTransitionTime carries over from `previous` when the status is unchanged."""
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == ctype), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else now
    cond: Condition = {"type": ctype, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def invalid_status(problems: Sequence[str], generation: int | None, now: str,
                   previous: Sequence[Condition] = ()) -> dict[str, Any]:
    """Status for a spec the operator refuses: Failed, Valid=False with every problem in the message."""
    message = "; ".join(problems)
    return {
        "phase": "Failed",
        "observedGeneration": generation,
        "conditions": [
            condition("Valid", False, "InvalidSpec", message, generation, now, previous),
            condition("Progressing", False, "InvalidSpec", "Nothing is deployed until the spec is fixed.", generation, now, previous),
            condition("Ready", False, "InvalidSpec", "Nothing is deployed until the spec is fixed.", generation, now, previous),
        ],
    }


def _deployment_failure(deployment: dict[str, Any]) -> str | None:
    """The Deployment controller's own verdict that the rollout is stuck (deadline, quota, ...)."""
    for cond in deployment.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == "Progressing" and cond.get("status") == "False":
            return cond.get("message") or cond.get("reason") or "rollout stalled"
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return cond.get("message") or cond.get("reason") or "replica failure"
    return None


def compute_status(owner: Owner, spec: InferenceServiceSpec, generation: int | None,
                   deployment: dict[str, Any] | None, now: str,
                   previous: Sequence[Condition] = ()) -> dict[str, Any]:
    """Phase, conditions and counters for a valid spec, given the live child Deployment (or None)."""
    desired = desired_replicas(spec, deployment)  # the scaler's choice under spec.autoscaling
    dstatus = (deployment or {}).get("status", {}) or {}
    dgen = (deployment or {}).get("metadata", {}).get("generation")
    # Counters from an older Deployment generation describe the previous rollout, not this spec.
    current = deployment is not None and (dgen is None or dstatus.get("observedGeneration", dgen) >= dgen)
    replicas = int(dstatus.get("replicas") or 0)
    ready = int(dstatus.get("readyReplicas") or 0)
    updated = int(dstatus.get("updatedReplicas", ready) or 0)
    failure = _deployment_failure(deployment) if deployment else None

    if deployment is None:
        phase, ready_ok, reason, message = "Pending", False, "DeploymentMissing", "The runtime Deployment is being created."
    elif failure:
        phase, ready_ok, reason, message = "Failed", False, "RolloutFailed", failure
    elif desired == 0:
        phase, ready_ok, reason, message = "Pending", False, "ScaledToZero", "replicas is 0."
    elif current and ready >= desired and updated >= desired:
        phase, ready_ok, reason, message = "Ready", True, "AllReplicasReady", f"{ready}/{desired} replicas ready."
    elif replicas == 0:
        phase, ready_ok, reason, message = "Pending", False, "WaitingForPods", f"0/{desired} replicas ready; waiting for pods to start."
    else:
        phase, ready_ok, reason, message = "Loading", False, "ReplicasNotReady", f"{ready}/{desired} replicas ready; the model is loading."

    rolled_out = phase == "Ready" or (desired == 0 and deployment is not None)
    if failure:
        progressing = condition("Progressing", False, "RolloutFailed", failure, generation, now, previous)
    elif rolled_out:
        progressing = condition("Progressing", False, "RolloutComplete", "The Deployment matches the spec.", generation, now, previous)
    else:
        progressing = condition("Progressing", True, "RollingOut", message, generation, now, previous)

    return {
        "phase": phase,
        "url": service_url(owner, spec),
        "servedModelName": served_model_name(owner, spec),
        "device": device_summary(spec),
        "ready": f"{ready}/{desired}",
        "replicas": replicas,
        "readyReplicas": ready,
        "desiredReplicas": desired,
        "currentReplicas": replicas,
        "selector": f"serving.bowline.dev/inferenceservice={owner.name}",
        "observedGeneration": generation,
        **lora_status(spec),
        "conditions": [
            condition("Valid", True, "SpecValid", "The spec passed validation.", generation, now, previous),
            progressing,
            condition("Ready", ready_ok, reason, message, generation, now, previous),
        ],
    }


def status_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether writing `new` would change anything a user sees (avoids no-op status patches)."""
    old = old or {}
    return any(old.get(key) != value for key, value in new.items())
