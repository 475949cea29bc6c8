"""Inference gateway: an InferencePool and an InferenceObjective for the Gateway API Inference Extension.

With `spec.gateway.enabled`, and when the extension's CRDs are installed, the operator renders:

- an `InferencePool` (inference.networking.k8s.io/v1) selecting this service's runtime pods on the
  runtime port, with the endpoint picker (EPP) Service from the operator's settings (the chart's
  `gateway.endpointPicker` values). A Gateway's HTTPRoute names the pool as its backend, and the EPP
  picks a pod per request from the runtime's vLLM-named metrics (queue, KV-cache usage, prefix and
  LoRA affinity);
- an `InferenceObjective` (inference.networking.x-k8s.io/v1alpha2) with the request priority.

Shapes follow the extension's v1.5.0 CRDs (config/crd/bases/). Both objects are owned by the
InferenceService (garbage-collected with it) and deleted when the gateway is disabled or renamed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .render import INSTANCE_LABEL, Owner, common_labels, owner_reference, selector_labels
from .spec import InferenceServiceSpec

POOL_GROUP = "inference.networking.k8s.io"
POOL_API_VERSION = f"{POOL_GROUP}/v1"
OBJECTIVE_GROUP = "inference.networking.x-k8s.io"
OBJECTIVE_API_VERSION = f"{OBJECTIVE_GROUP}/v1alpha2"
POOL_CRD = f"inferencepools.{POOL_GROUP}"
OBJECTIVE_CRD = f"inferenceobjectives.{OBJECTIVE_GROUP}"
EXTENSION_VERSION = "v1.5.0"  # the release whose CRDs these shapes follow

# The endpoint picker's ext-proc gRPC port in the extension's own chart.
DEFAULT_EPP_PORT = 9002


@dataclass(frozen=True, slots=True)
class EndpointPicker:
    """The EPP Service every rendered pool points at. `name` may contain `{pool}`: the extension's chart
    names its EPP `<pool>-epp`, so one setting serves every pool."""

    name: str = "{pool}-epp"
    port: int = DEFAULT_EPP_PORT
    failure_mode: str = "FailClose"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> EndpointPicker:
        """From BOWLINE_OPERATOR_EPP_NAME / _PORT / _FAILURE_MODE (the chart sets them from its values)."""
        default = cls()
        return cls(name=env.get("BOWLINE_OPERATOR_EPP_NAME") or default.name,
                   port=int(env.get("BOWLINE_OPERATOR_EPP_PORT") or default.port),
                   failure_mode=env.get("BOWLINE_OPERATOR_EPP_FAILURE_MODE") or default.failure_mode)


def pool_name(owner: Owner, spec: InferenceServiceSpec) -> str:
    return spec.gateway.pool_name or owner.name


def render_pool(owner: Owner, spec: InferenceServiceSpec, picker: EndpointPicker) -> dict[str, Any]:
    """The InferencePool: the runtime pods (same selector as the Service) on the runtime port."""
    name = pool_name(owner, spec)
    return {
        "apiVersion": POOL_API_VERSION,
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": owner.namespace, "labels": common_labels(owner),
                     "ownerReferences": [owner_reference(owner)]},
        "spec": {
            "selector": {"matchLabels": selector_labels(owner)},
            "targetPorts": [{"number": spec.runtime.port}],
            "endpointPickerRef": {"kind": "Service", "name": picker.name.format(pool=name),
                                  "port": {"number": picker.port}, "failureMode": picker.failure_mode},
        },
    }


def render_objective(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The InferenceObjective: this service's requests in the pool, with their priority (unset = 0)."""
    objective_spec: dict[str, Any] = {"poolRef": {"group": POOL_GROUP, "kind": "InferencePool", "name": pool_name(owner, spec)}}
    if spec.gateway.priority is not None:
        objective_spec["priority"] = spec.gateway.priority
    return {
        "apiVersion": OBJECTIVE_API_VERSION,
        "kind": "InferenceObjective",
        "metadata": {"name": owner.name, "namespace": owner.namespace, "labels": common_labels(owner),
                     "ownerReferences": [owner_reference(owner)]},
        "spec": objective_spec,
    }


def render(owner: Owner, spec: InferenceServiceSpec, picker: EndpointPicker,
           installed: frozenset[str]) -> list[dict[str, Any]]:
    """What to apply, given which of the extension's CRDs (`POOL_CRD`, `OBJECTIVE_CRD`) are installed."""
    if not spec.gateway.enabled or POOL_CRD not in installed:
        return []
    children = [render_pool(owner, spec, picker)]
    if OBJECTIVE_CRD in installed:
        children.append(render_objective(owner, spec))
    return children


def stale(owner: Owner, live: list[dict[str, Any]], desired: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Live objects of this service (by label and owner uid) that `desired` no longer contains."""
    keep = {(o["kind"], o["metadata"]["name"]) for o in desired}
    out = []
    for obj in live:
        meta = obj.get("metadata", {})
        ours = (meta.get("labels") or {}).get(INSTANCE_LABEL) == owner.name and any(
            ref.get("uid") == owner.uid for ref in meta.get("ownerReferences") or [])
        if ours and (obj.get("kind"), meta.get("name")) not in keep:
            out.append(obj)
    return out


def condition_args(owner: Owner, spec: InferenceServiceSpec, picker: EndpointPicker,
                   installed: frozenset[str]) -> tuple[bool, str, str] | None:
    """(ok, reason, message) of the InferencePoolReady condition; None when the gateway is off."""
    if not spec.gateway.enabled:
        return None
    if POOL_CRD not in installed:
        return (False, "InferenceExtensionMissing",
                f"spec.gateway is enabled but the CRD {POOL_CRD} is not installed; install the Gateway API "
                f"Inference Extension ({EXTENSION_VERSION} or later) to route through an inference gateway.")
    name = pool_name(owner, spec)
    message = (f"InferencePool {name} selects the runtime pods on port {spec.runtime.port}; endpoint picker "
               f"{picker.name.format(pool=name)}:{picker.port}.")
    if OBJECTIVE_CRD not in installed:
        message += f" No InferenceObjective: the CRD {OBJECTIVE_CRD} is not installed."
    return True, "PoolApplied", message


def apply_status(status: dict[str, Any], args: tuple[bool, str, str] | None, pool: str,
                 make_condition: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """`status` plus status.gateway and the InferencePoolReady condition (both removed when off)."""
    conditions = [c for c in status["conditions"] if c["type"] != "InferencePoolReady"]
    if args is None:
        status["gateway"] = None
    else:
        ok, reason, message = args
        status["gateway"] = {"poolName": pool} if ok else None
        conditions.append(make_condition("InferencePoolReady", ok, reason, message))
    status["conditions"] = conditions
    return status


def reported(status: dict[str, Any]) -> bool:
    """Whether a previous status says a pool was (or was meant to be) rendered."""
    return bool(status.get("gateway")) or any(c.get("type") == "InferencePoolReady" for c in status.get("conditions") or [])


def sync(owner: Owner, spec: InferenceServiceSpec, previously: bool) -> tuple[tuple[bool, str, str] | None, list[str]]:
    """Apply the pool and objective, delete ones no longer rendered; returns (condition args, actions).

    `previously`: the last status reported a pool, so one may need deleting. Otherwise a service
    without the gateway costs no API calls here.
    """
    from . import kube

    if not spec.gateway.enabled and not previously:
        return None, []
    installed = frozenset(name for name in (POOL_CRD, OBJECTIVE_CRD) if kube.crd_installed(name))
    picker = EndpointPicker.from_env()
    desired = render(owner, spec, picker, installed)
    actions = []
    for child in desired:
        _, action = kube.apply(child)
        actions.append(f"{child['kind']} {action}")
    live: list[dict[str, Any]] = []
    for crd, api_version, kind in ((POOL_CRD, POOL_API_VERSION, "InferencePool"),
                                   (OBJECTIVE_CRD, OBJECTIVE_API_VERSION, "InferenceObjective")):
        if crd in installed:
            live += kube.list_objects(api_version, kind, owner.namespace)
    for obj in stale(owner, live, desired):
        kube.delete(obj["apiVersion"], kube.plural_of(obj["kind"]), owner.namespace, obj["metadata"]["name"])
        actions.append(f"{obj['kind']} {obj['metadata']['name']} deleted")
    return condition_args(owner, spec, picker, installed), actions
