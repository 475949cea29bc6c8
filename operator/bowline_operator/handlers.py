"""kopf handlers: thin glue from API events to the pure modules and `kube`'s few API calls.

Every handler is level-triggered: it reads what exists, renders what should exist, and patches only the
difference, so replays (operator restarts, resumed objects, duplicate events) change nothing.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from . import autoscaling, gateway, kube, model_cache
from .diff import DEPLOYMENT_PRUNE
from .render import API_VERSION, GROUP, KIND, PLURAL, VERSION, Owner, render_children
from .status import compute_status, condition, invalid_status, status_changed
from .validation import validate_spec

MANAGED_BY = {"app.kubernetes.io/managed-by": "bowline"}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Credentials for our own calls, and kopf settings that suit many small, quick reconciles."""
    kube.load_credentials()
    settings.execution.max_workers = 16
    settings.posting.level = logging.WARNING  # Events for problems only; progress is in status
    settings.persistence.finalizer = "serving.bowline.dev/finalizer"  # only on services whose model cache is deleted with them
    settings.watching.server_timeout = 300
    settings.networking.error_backoffs = [1, 2, 5, 10]


def _write_status(namespace: str, name: str, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
    if status_changed(old, new):
        kube.patch_status(API_VERSION, PLURAL, namespace, name, new)


def reconcile_object(body: kopf.Body | dict[str, Any], logger: logging.Logger | logging.LoggerAdapter) -> str:
    """Bring one InferenceService's children and status in line with its spec; returns what happened."""
    meta, status = body.get("metadata", {}), dict(body.get("status") or {})
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    previous = status.get("conditions") or []
    checked = validate_spec(body.get("spec"), name)
    if not checked.ok:
        message = "; ".join(checked.problems)
        _write_status(namespace, name, status, invalid_status(checked.problems, generation, _now(), previous))
        kopf.warn(dict(body), reason="InvalidSpec", message=message)
        logger.warning("Invalid spec, nothing deployed: %s", message)
        return "invalid"
    assert checked.spec is not None
    owner = Owner(name=name, namespace=namespace, uid=meta["uid"])
    cache, actions = model_cache.sync(owner, checked.spec)
    withheld = cache is not None and not cache.ready  # pods start only on a filled cache
    deployment: dict[str, Any] | None = None
    keda = checked.spec.autoscaling is not None and autoscaling.KEDA_PLURAL in kube.served_resources(autoscaling.KEDA_API_VERSION)
    children = render_children(owner, checked.spec) + autoscaling.render_scaling(owner, checked.spec, keda)
    for child in children:
        if child["kind"] == "Deployment" and cache is not None:
            if withheld:
                deployment = kube.get("apps/v1", "deployments", namespace, name)
                continue
            child = model_cache.mount_cache(child, checked.spec)
        live, action = kube.apply(child, DEPLOYMENT_PRUNE if child["kind"] == "Deployment" else None,
                                  autoscaling.on_create(child, checked.spec))
        actions.append(f"{child['kind']} {action}")
        if child["kind"] == "Deployment":
            deployment = live
    for kind, api_version, plural in autoscaling.unrendered(children):  # e.g. HPA after KEDA arrived
        if kube.delete_owned(api_version, plural, namespace, name, owner.uid):
            actions.append(f"{kind} deleted")
    routing, gateway_actions = gateway.sync(owner, checked.spec, gateway.reported(status))
    now = _now()
    new = compute_status(owner, checked.spec, generation, deployment, now, previous)

    def make_condition(ctype: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
        return condition(ctype, ok, reason, message, generation, now, previous)

    new = model_cache.apply_status(new, cache, make_condition, withheld and deployment is None)
    new = gateway.apply_status(new, routing, gateway.pool_name(owner, checked.spec), make_condition)
    _write_status(namespace, name, status, {**new, **autoscaling.scaling_status(checked.spec, children)})
    _warn_on_new_problem(body, previous, new["conditions"], {"ModelCached": "CacheFailed",
                                                             "InferencePoolReady": "InferenceExtensionMissing"})
    return ", ".join(actions + gateway_actions)


def _warn_on_new_problem(body: kopf.Body | dict[str, Any], previous: list[dict[str, Any]],
                         current: list[dict[str, Any]], problems: dict[str, str]) -> None:
    """A Warning event when a condition turns to one of `problems`' reasons (once, not every reconcile)."""
    before = {c.get("type"): c.get("reason") for c in previous}
    for cond in current:
        reason = problems.get(cond["type"])
        if reason and cond.get("reason") == reason and before.get(cond["type"]) != reason:
            kopf.warn(dict(body), reason=reason, message=cond.get("message", ""))


def _reconcile_handler(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    try:
        result = reconcile_object(body, logger)
    except ApiException as error:
        if error.status in kube.TRANSIENT:
            raise kopf.TemporaryError(f"API answered {error.status}; will retry", delay=2) from error
        raise kopf.PermanentError(f"API refused the change ({error.status}): {error.body}") from error
    logger.info("Reconciled: %s", result)


# One reconcile for every reason: creation, spec edits, and operator restarts (resume). kopf calls
# on.update only for changes in spec/labels/annotations, never for our own status writes.
reconcile = kopf.on.resume(GROUP, VERSION, PLURAL, backoff=2)(
    kopf.on.update(GROUP, VERSION, PLURAL, backoff=2, field="spec")(
        kopf.on.create(GROUP, VERSION, PLURAL, backoff=2)(_reconcile_handler)))


def _owner_name(body: kopf.Body) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/") and ref.get("controller"):
            return ref.get("name")
    return None


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED_BY)
def deployment_event(body: kopf.Body, event: kopf.RawEvent, logger: logging.Logger, **_: Any) -> None:
    """A child Deployment changed (rollout progress, pods ready, edits, deletion): re-level its parent.

    Event handlers are not retried by kopf, so transient API errors are retried inside `kube`; a
    persistent failure is logged and the next Deployment event (or resume) converges anyway.
    """
    parent_name = _owner_name(body)
    if parent_name is None:
        return
    namespace = body["metadata"]["namespace"]
    try:
        parent = kube.get(API_VERSION, PLURAL, namespace, parent_name)
        if parent is None or parent.get("metadata", {}).get("deletionTimestamp"):
            return  # the parent is gone; garbage collection removes this child
        reconcile_object(parent, logger)
    except ApiException as error:
        logger.error("Could not update InferenceService %s/%s from its Deployment: %s", namespace, parent_name, error)


@kopf.on.event("batch", "v1", "jobs", labels={model_cache.CACHE_LABEL: kopf.PRESENT, **MANAGED_BY})
def cache_job_event(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """A model-cache Job changed (started, succeeded, failed): re-level every service that waits on it.

    The Job has no controller owner (it is shared), so its users are found by the claim they name.
    """
    namespace = body["metadata"]["namespace"]
    claim = body["metadata"].get("labels", {}).get(model_cache.CACHE_LABEL)
    try:
        for parent in kube.list_objects(API_VERSION, KIND, namespace):
            if parent.get("metadata", {}).get("deletionTimestamp"):
                continue
            if model_cache.users(claim, [parent], exclude_uid=""):
                reconcile_object(parent, logger)
    except ApiException as error:
        logger.error("Could not update the InferenceServices of model cache %s/%s: %s", namespace, claim, error)


def _deletes_cache(spec: kopf.Spec, **_: Any) -> bool:
    cache = (spec.get("model") or {}).get("cache") or {}
    return bool(cache.get("enabled")) and cache.get("deletePolicy") == "Delete"


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_deletes_cache, backoff=2)
def release_cache(body: kopf.Body, spec: kopf.Spec, logger: logging.Logger, **_: Any) -> None:
    """cache.deletePolicy Delete: the claim and its Job go with the last InferenceService using them.

    Only services with that policy carry kopf's finalizer; the others' deletion is never blocked.
    """
    meta = body["metadata"]
    logger.info("Model cache: %s", model_cache.release(meta["namespace"], meta["uid"], dict(spec), logger.info))


@kopf.on.probe(id="reconciling")
def probe(**_: Any) -> str:
    """Reported at the --liveness endpoint, next to kopf's own checks that its watch loops run."""
    return "ok"
