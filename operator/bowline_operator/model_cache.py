"""Model cache: one PersistentVolumeClaim per model, filled once by a Job, mounted read-only by the pods.

Without it every `hf://` pod downloads the weights into an emptyDir before it starts, so a restart, a
reschedule or a scale-up waits for the whole download again. With `spec.model.cache.enabled` the
operator renders:

- a PersistentVolumeClaim named after the source and revision (`claim_name`), so every
  InferenceService serving the same model in a namespace shares one copy;
- a Job that fills the claim once, with the same download (`hf://`) or copy (a path in the image)
  step the init container runs without a cache;
- the Deployment's model volume pointing at the claim, read-only, and no init container.

Neither the claim nor the Job has a controller owner: they outlive any one InferenceService. The
Deployment is withheld until the Job has succeeded, so pods never start on a half-filled cache.
Everything here is pure; `handlers` applies it and `sync_cache` does the few API calls.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .render import (
    _DOWNLOAD_SCRIPT,
    GROUP,
    MODEL_DIR,
    Owner,
    _profile,
    _security_contexts,
)
from .spec import InferenceServiceSpec

CACHE_LABEL = f"{GROUP}/model-cache"
VOLUME = "model-cache"
MODEL_SUBDIR = "model"  # the weights' folder inside the claim
JOB_BACKOFF_LIMIT = 3
NAME_MAX = 57  # the Job's pods get `job-name=<claim>-fill` as a label, which must stay within 63 characters

# Copies a model folder that ships in the runtime image into the claim; idempotent like the download.
_COPY_SCRIPT = (
    "import shutil, sys\n"
    "shutil.copytree(sys.argv[1], sys.argv[2], dirs_exist_ok=True)\n"
)


def cacheable(source: str) -> bool:
    """Sources worth caching: downloads and paths in the image. pvc:// and hostPath:// are already volumes."""
    return source.startswith("hf://") or source.startswith("/")


def problems(spec: InferenceServiceSpec) -> list[str]:
    """The cache's cross-field rule (the CRD's CEL rule on spec.model says the same)."""
    if spec.model.cache.enabled and not cacheable(spec.model.source):
        return ["model.cache applies to hf:// sources and paths in the image; pvc:// and hostPath:// are volumes already"]
    return []


def enabled(spec: InferenceServiceSpec) -> bool:
    return spec.model.cache.enabled and cacheable(spec.model.source)


def claim_name(source: str, revision: str | None) -> str:
    """`model-<source>-<revision>-<hash>`: readable, DNS-1123, and unique per (source, revision).

    The hash covers the exact strings, so two sources that sanitize alike (case, punctuation, a cut
    tail) still get two claims.
    """
    revision = revision or ("main" if source.startswith("hf://") else "")
    readable = re.sub(r"[^a-z0-9]+", "-", f"{source.split('://', 1)[-1]}-{revision}".lower()).strip("-")
    digest = hashlib.sha256(f"{source}@{revision}".encode()).hexdigest()[:8]
    head = f"model-{readable}"[: NAME_MAX - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}"


def job_name(claim: str) -> str:
    return f"{claim}-fill"


def cache_labels(claim: str) -> dict[str, str]:
    return {CACHE_LABEL: claim, "app.kubernetes.io/name": "bowline-model-cache",
            "app.kubernetes.io/component": "model-cache", "app.kubernetes.io/managed-by": "bowline"}


def model_path(spec: InferenceServiceSpec) -> str:
    """Where the runtime finds the weights on the mounted claim."""
    return f"{MODEL_DIR}/{MODEL_SUBDIR}"


def render_claim(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The shared PersistentVolumeClaim. Created once and never patched: its spec is mostly immutable,
    and the first InferenceService's size and class stay (a later one cannot shrink it under others)."""
    cache = spec.model.cache
    claim = claim_name(spec.model.source, spec.model.revision)
    claim_spec: dict[str, Any] = {"accessModes": [cache.access_mode], "resources": {"requests": {"storage": str(cache.size)}}}
    if cache.storage_class_name:
        claim_spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": owner.namespace, "labels": cache_labels(claim),
                     "annotations": {f"{GROUP}/model-source": spec.model.source,
                                     f"{GROUP}/model-revision": spec.model.revision or ""}},
        "spec": claim_spec,
    }


def _fill_container(spec: InferenceServiceSpec, image: str, container_security: dict[str, Any]) -> dict[str, Any]:
    """The download (hf://) or copy (image path) step, writing into the claim."""
    target = model_path(spec)
    source = spec.model.source
    env: list[dict[str, Any]] = []
    if source.startswith("hf://"):
        env.append({"name": "HF_HOME", "value": f"{MODEL_DIR}/.hf-home"})
        if spec.model.hf_token_secret_name:
            env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": spec.model.hf_token_secret_name, "key": "token"}}})
        command = ["python", "-c", _DOWNLOAD_SCRIPT, source.removeprefix("hf://"), spec.model.revision or "main", target]
    else:
        command = ["python", "-c", _COPY_SCRIPT, source, target]
    container: dict[str, Any] = {
        "name": "model-fill",
        "image": image,
        "command": command,
        "env": env,
        "volumeMounts": [{"name": VOLUME, "mountPath": MODEL_DIR}],
        "securityContext": container_security,
    }
    if spec.runtime.image_pull_policy:
        container["imagePullPolicy"] = spec.runtime.image_pull_policy
    return container


def render_job(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The Job that fills the claim once. Like the claim, created once and never patched (a Job's pod
    template is immutable); deleting a failed Job makes the next reconcile start a fresh one."""
    claim = claim_name(spec.model.source, spec.model.revision)
    image = spec.runtime.image or _profile(spec).image
    pod_security, container_security = _security_contexts(spec)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [_fill_container(spec, image, container_security)],
        "volumes": [{"name": VOLUME, "persistentVolumeClaim": {"claimName": claim}}],
        "enableServiceLinks": False,
        "securityContext": _skip_chown(pod_security),
    }
    optional = {"serviceAccountName": spec.runtime.service_account_name, "nodeSelector": dict(spec.runtime.node_selector),
                "tolerations": [dict(t) for t in spec.runtime.tolerations]}
    pod_spec.update({k: v for k, v in optional.items() if v})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(claim), "namespace": owner.namespace, "labels": cache_labels(claim)},
        "spec": {
            "backoffLimit": JOB_BACKOFF_LIMIT,
            "template": {"metadata": {"labels": cache_labels(claim)}, "spec": pod_spec},
        },
    }


def _skip_chown(pod_security: dict[str, Any]) -> dict[str, Any]:
    """With an fsGroup, the kubelet re-owns every file of a volume at each mount unless told to check the
    root only: gigabytes of weights would be walked at every pod start. The Job writes them with the same
    group, so the root matches and the runtime pods skip the walk."""
    if "fsGroup" not in pod_security:
        return pod_security
    return {**pod_security, "fsGroupChangePolicy": "OnRootMismatch"}


def mount_cache(deployment: dict[str, Any], spec: InferenceServiceSpec) -> dict[str, Any]:
    """The Deployment reading the weights from the claim, read-only, with no download init container."""
    claim = claim_name(spec.model.source, spec.model.revision)
    pod = deployment["spec"]["template"]["spec"]
    pod.pop("initContainers", None)
    pod["securityContext"] = _skip_chown(pod.get("securityContext") or {})
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] not in ("model", VOLUME)]
    pod["volumes"].insert(0, {"name": VOLUME, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    for container in pod["containers"]:
        container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] not in ("model", VOLUME)]
        container["volumeMounts"].insert(0, {"name": VOLUME, "mountPath": MODEL_DIR, "readOnly": True})
        args = container["args"]
        args[args.index("--model") + 1] = model_path(spec)
    return deployment


@dataclass(frozen=True, slots=True)
class CacheState:
    """What the live claim and Job say about one cache."""

    claim: str
    phase: str  # Pending, Filling, Ready, Failed
    message: str
    size_bytes: int | None = None

    @property
    def ready(self) -> bool:
        return self.phase == "Ready"


_SUFFIXES: dict[str, int | Decimal] = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "m": Decimal("0.001")}


def quantity_bytes(quantity: str | int | None) -> int | None:
    """A Kubernetes resource quantity (`100Gi`, `5e9`, `1500M`) in bytes; None when absent or malformed."""
    if quantity is None:
        return None
    match = re.fullmatch(r"([0-9.]+(?:[eE][-+]?[0-9]+)?)([KMGTPE]i|[kMGTPEm])?", str(quantity).strip())
    if not match:
        return None
    return int(Decimal(match.group(1)) * Decimal(_SUFFIXES.get(match.group(2) or "", 1)))


def _job_condition(job: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in (job.get("status") or {}).get("conditions") or []
                 if c.get("type") == ctype and c.get("status") == "True"), None)


def cache_state(claim: str, live_claim: dict[str, Any] | None, live_job: dict[str, Any] | None) -> CacheState:
    """Phase of the cache from the live objects: Ready only once the Job has succeeded."""
    capacity = ((live_claim or {}).get("status") or {}).get("capacity", {}).get("storage")
    requested = ((live_claim or {}).get("spec") or {}).get("resources", {}).get("requests", {}).get("storage")
    size = quantity_bytes(capacity) or quantity_bytes(requested)
    if live_claim is None:
        return CacheState(claim, "Pending", f"Creating the PersistentVolumeClaim {claim}.")
    if live_job is None:
        return CacheState(claim, "Pending", f"Creating the Job {job_name(claim)} that fills the cache.", size)
    status = live_job.get("status") or {}
    if _job_condition(live_job, "Complete") or int(status.get("succeeded") or 0) > 0:
        return CacheState(claim, "Ready", f"The model is cached in {claim}.", size)
    failed = _job_condition(live_job, "Failed")
    if failed:
        reason = failed.get("message") or failed.get("reason") or "the Job failed"
        return CacheState(claim, "Failed", f"Filling {claim} failed: {reason}. Delete the Job {job_name(claim)} to retry.", size)
    if (live_claim.get("status") or {}).get("phase", "Bound") == "Pending":
        return CacheState(claim, "Pending", f"The PersistentVolumeClaim {claim} is not bound yet (storage class, access mode?).", size)
    return CacheState(claim, "Filling", f"The Job {job_name(claim)} is filling {claim}.", size)


def status_fields(state: CacheState) -> dict[str, Any]:
    """status.cache"""
    fields: dict[str, Any] = {"phase": state.phase, "claimName": state.claim}
    if state.size_bytes is not None:
        fields["sizeBytes"] = state.size_bytes
    return fields


def apply_status(status: dict[str, Any], state: CacheState | None, make_condition: Callable[..., dict[str, Any]],
                 deployment_withheld: bool) -> dict[str, Any]:
    """`status` plus status.cache and the ModelCached condition; while the Deployment waits for the cache,
    phase and Ready say so instead of "being created".

    make_condition(ctype, ok, reason, message) builds a condition with generation and transition time.
    """
    if state is None:
        status["cache"] = None  # a merge patch deletes a stale status.cache
        return status
    status["cache"] = status_fields(state)
    reason = {"Ready": "CacheReady", "Filling": "CacheFilling", "Pending": "CachePending", "Failed": "CacheFailed"}[state.phase]
    conditions = [c for c in status["conditions"] if c["type"] != "ModelCached"]
    if deployment_withheld:
        failed = state.phase == "Failed"
        waiting = f"Pods start once the model cache is filled. {state.message}"
        status["phase"] = "Failed" if failed else "Pending"
        replaced = {
            "Ready": make_condition("Ready", False, reason if failed else "WaitingForModelCache", waiting),
            "Progressing": make_condition("Progressing", not failed, reason if failed else "WaitingForModelCache", waiting),
        }
        conditions = [replaced.get(c["type"], c) for c in conditions]
    conditions.append(make_condition("ModelCached", state.ready, reason, state.message))
    status["conditions"] = conditions
    return status


def users(claim: str, services: Sequence[dict[str, Any]], exclude_uid: str) -> list[str]:
    """Names of the other InferenceServices (not being deleted) whose cache is `claim`."""
    out = []
    for obj in services:
        meta, spec = obj.get("metadata", {}), obj.get("spec") or {}
        model = spec.get("model") or {}
        cache = model.get("cache") or {}
        if meta.get("uid") == exclude_uid or meta.get("deletionTimestamp") or not cache.get("enabled"):
            continue
        if cacheable(model.get("source", "")) and claim_name(model["source"], model.get("revision")) == claim:
            out.append(meta.get("name", ""))
    return out


def sync(owner: Owner, spec: InferenceServiceSpec) -> tuple[CacheState | None, list[str]]:
    """Create the claim and the Job if missing and read their state; (None, []) without a cache."""
    from . import kube

    if not enabled(spec):
        return None, []
    claim, claim_action = kube.create_if_missing(render_claim(owner, spec))
    job, job_action = kube.create_if_missing(render_job(owner, spec))
    state = cache_state(claim["metadata"]["name"], claim, job)
    return state, [f"PersistentVolumeClaim {claim_action}", f"Job {job_action}"]


def release(namespace: str, uid: str, spec: dict[str, Any], log: Callable[[str], None]) -> str:
    """On deletion with deletePolicy Delete: remove the claim and its Job unless another service uses them."""
    from . import kube
    from .render import API_VERSION

    model = spec.get("model") or {}
    if not (model.get("cache") or {}).get("enabled") or not cacheable(model.get("source", "")):
        return "no cache"
    claim = claim_name(model["source"], model.get("revision"))
    others = users(claim, kube.list_objects(API_VERSION, "InferenceService", namespace), exclude_uid=uid)
    if others:
        log(f"Keeping the model cache {claim}: still used by {', '.join(sorted(others))}")
        return "kept (shared)"
    kube.delete("batch/v1", "jobs", namespace, job_name(claim))
    kube.delete("v1", "persistentvolumeclaims", namespace, claim)
    return "deleted"
