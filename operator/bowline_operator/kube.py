"""The operator's only Kubernetes I/O: get, create-or-patch and status writes, with retries.

Handlers call these few functions; everything they send is computed by the pure modules. Requests are
raw JSON over the kubernetes client's configured connection (kubeconfig or in-cluster), so the same code
serves built-in kinds and the custom resource, and patches are JSON merge patches (the emulator in the
tests and every API server understand them; strategic merge is built-in-kinds-only).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import kubernetes
from kubernetes.client.exceptions import ApiException

from .diff import Path, last_applied, merge_patch, with_last_applied

FIELD_MANAGER = "bowline"
MERGE_PATCH = "application/merge-patch+json"
# Conflicts, throttling and server errors are worth an immediate retry; others (403, 422) are not.
TRANSIENT = frozenset({409, 429, 500, 502, 503, 504})

log = logging.getLogger(__name__)
T = TypeVar("T")

_client: kubernetes.client.ApiClient | None = None


def load_credentials() -> None:
    """In-cluster service-account credentials when running in a pod, else the standard kubeconfig."""
    global _client
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    _client = kubernetes.client.ApiClient()


def _api() -> kubernetes.client.ApiClient:
    if _client is None:
        load_credentials()
    assert _client is not None
    return _client


def request(method: str, path: str, body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
    """One API call; raises ApiException on HTTP errors (status 404, 409, ...)."""
    api = _api()
    query = [("fieldManager", FIELD_MANAGER)] if method in ("POST", "PATCH") else []
    m, url, headers, data, _ = api.param_serialize(
        method=method, resource_path=path, query_params=query,
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body, auth_settings=["BearerToken"])
    response = api.call_api(m, url, header_params=headers, body=data, _request_timeout=30)
    response.read()
    if response.status >= 400:
        raise ApiException(http_resp=response)
    return json.loads(response.data or b"{}")


def with_retries(call: Callable[[], T], attempts: int = 4, delay: float = 0.2) -> T:
    """Retry transient API errors a few times in place: cheaper and quicker than a failed handler."""
    for attempt in range(attempts):
        try:
            return call()
        except ApiException as error:
            if error.status not in TRANSIENT or attempt == attempts - 1:
                raise
            log.info("API answered %s; retrying (%d/%d)", error.status, attempt + 1, attempts)
            time.sleep(delay * (2 ** attempt))
    raise AssertionError("unreachable")


def object_path(api_version: str, plural: str, namespace: str, name: str | None = None) -> str:
    """REST path of a namespaced resource (core `v1` lives under /api, groups under /apis)."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


PLURALS = {
    "Deployment": "deployments",
    "Service": "services",
    "ScaledObject": "scaledobjects",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "PodDisruptionBudget": "poddisruptionbudgets",
}


def plural_of(kind: str) -> str:
    """The resource name of a kind: PLURALS, else the regular lower-case plural (Job -> jobs)."""
    return PLURALS.get(kind) or kind.lower() + "s"


def get(api_version: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    """The live object, or None when it does not exist."""
    try:
        return with_retries(lambda: request("GET", object_path(api_version, plural, namespace, name)))
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def apply(desired: dict[str, Any], prune: Mapping[Path, frozenset[str]] | None = None,
          on_create: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Create `desired`, or patch the live object by exactly the difference; returns (object, action).

    action is "created", "patched" or "unchanged". A second call with the same `desired` is "unchanged"
    and sends nothing but a GET, which is what makes reconciles safe to repeat. `desired` is recorded in
    the child's LAST_APPLIED annotation, so fields a later `desired` drops are deleted, not left behind.
    `on_create` is merged into the object only when it is created (a start value others own afterwards,
    such as the replica count an autoscaler takes over); it is not recorded, so never patched or deleted.
    """
    desired = with_last_applied(desired)
    meta = desired["metadata"]
    api_version, plural = desired["apiVersion"], plural_of(desired["kind"])
    path = object_path(api_version, plural, meta["namespace"], meta["name"])

    def once() -> tuple[dict[str, Any], str]:
        live = get(api_version, plural, meta["namespace"], meta["name"])
        if live is None:
            try:
                body = _deep_merge(desired, on_create) if on_create else desired
                return request("POST", object_path(api_version, plural, meta["namespace"]), body), "created"
            except ApiException as error:
                if error.status != 409:
                    raise
                live = get(api_version, plural, meta["namespace"], meta["name"])  # lost a race: patch instead
                if live is None:
                    raise
        patch = merge_patch(desired, live, prune, last_applied(live))
        if not patch:
            return live, "unchanged"
        return request("PATCH", path, patch, MERGE_PATCH), "patched"

    return with_retries(once)


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) else value
    return merged


def patch_status(api_version: str, plural: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
    """Merge-patch the status subresource (lists such as conditions are replaced whole)."""
    path = object_path(api_version, plural, namespace, name) + "/status"
    return with_retries(lambda: request("PATCH", path, {"status": status}, MERGE_PATCH))


def create_if_missing(desired: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Create `desired` unless an object of that name exists; never patch it ("created" / "exists").

    For children whose spec is immutable or shared (a model cache's claim and Job), where a patch would
    be refused or would change them under other owners.
    """
    meta = desired["metadata"]
    api_version, plural = desired["apiVersion"], plural_of(desired["kind"])

    def once() -> tuple[dict[str, Any], str]:
        live = get(api_version, plural, meta["namespace"], meta["name"])
        if live is not None:
            return live, "exists"
        try:
            return request("POST", object_path(api_version, plural, meta["namespace"]), desired), "created"
        except ApiException as error:
            if error.status != 409:
                raise
            live = get(api_version, plural, meta["namespace"], meta["name"])
            if live is None:
                raise
            return live, "exists"

    return with_retries(once)


def list_objects(api_version: str, kind: str, namespace: str) -> list[dict[str, Any]]:
    """Every object of a kind in a namespace (callers filter; the emulator in tests has no selectors).
    A real API server's list items carry no kind/apiVersion; they are filled in."""
    path = object_path(api_version, plural_of(kind), namespace)
    items = with_retries(lambda: request("GET", path)).get("items") or []
    return [{**item, "apiVersion": api_version, "kind": kind} for item in items]


def delete(api_version: str, plural: str, namespace: str, name: str) -> bool:
    """Delete one object (its dependents in the background); False when it was already gone."""
    path = object_path(api_version, plural, namespace, name)
    try:
        with_retries(lambda: request("DELETE", path, {"propagationPolicy": "Background"}))
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def crd_installed(name: str) -> bool:
    """Whether the CustomResourceDefinition `name` (plural.group) exists in the cluster."""
    try:
        with_retries(lambda: request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"))
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def served_resources(group_version: str) -> frozenset[str]:
    """Plural names the API server serves in `group_version` (discovery); empty when the group is absent,
    e.g. keda.sh/v1alpha1 in a cluster without KEDA's CRDs."""
    try:
        listing = with_retries(lambda: request("GET", f"/apis/{group_version}"))
    except ApiException as error:
        if error.status == 404:
            return frozenset()
        raise
    return frozenset(r["name"] for r in listing.get("resources", []) if "/" not in r.get("name", "/"))


def delete_owned(api_version: str, plural: str, namespace: str, name: str, owner_uid: str) -> bool:
    """Delete a child the spec no longer needs, if it exists and this owner controls it; True if deleted.

    Objects of the same name that someone else made (no controller reference to `owner_uid`) are left.
    """
    live = get(api_version, plural, namespace, name)
    if live is None:
        return False
    refs = live.get("metadata", {}).get("ownerReferences") or []
    if not any(ref.get("uid") == owner_uid and ref.get("controller") for ref in refs):
        return False
    try:
        with_retries(lambda: request("DELETE", object_path(api_version, plural, namespace, name),
                                     {"propagationPolicy": "Background"}))
    except ApiException as error:
        if error.status != 404:
            raise
    return True
