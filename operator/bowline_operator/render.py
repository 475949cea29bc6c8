"""Pure rendering: an InferenceService spec → its child Deployment and Service, as plain dicts.

No I/O here: the handlers apply what this returns. Rendering is deterministic (same spec, same dicts),
which is what makes reconciling idempotent: the operator patches only where the rendered object and
the live one differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .accelerators import AcceleratorProfile, profile_for
from .lora import ADAPTER_DIR, adapter_mounts, lora_args
from .scheduling import topology_spread_constraints
from .spec import InferenceServiceSpec, ModelSpec

GROUP = "serving.bowline.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceService"
PLURAL = "inferenceservices"

INSTANCE_LABEL = f"{GROUP}/inferenceservice"
MODEL_DIR = "/mnt/models"
DRAFT_MODEL_DIR = "/mnt/draft-model"  # spec.speculative.model
CONTAINER = "runtime"
PORT_NAME = "http"
# preStop gives endpoints controllers time to drop the pod before SIGTERM; the runtime then drains
# in-flight requests for up to DRAIN_SECONDS; the grace period covers both with a margin.
PRESTOP_SLEEP_SECONDS = 5
DRAIN_SECONDS = 60
TERMINATION_GRACE_SECONDS = PRESTOP_SLEEP_SECONDS + DRAIN_SECONDS + 15
STARTUP_PERIOD_SECONDS = 10
NON_ROOT_UID = 1000


@dataclass(frozen=True, slots=True)
class Owner:
    """The parent InferenceService's identity: what children need for names and owner references."""

    name: str
    namespace: str
    uid: str


def selector_labels(owner: Owner) -> dict[str, str]:
    """The labels that select this service's pods; immutable on a Deployment, so kept minimal."""
    return {INSTANCE_LABEL: owner.name}


def common_labels(owner: Owner) -> dict[str, str]:
    return {
        **selector_labels(owner),
        "app.kubernetes.io/name": "bowline-runtime",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": "inference",
        "app.kubernetes.io/managed-by": "bowline",
    }


def owner_reference(owner: Owner) -> dict[str, Any]:
    """Controller owner reference: deleting the InferenceService garbage-collects its children."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": owner.name, "uid": owner.uid,
            "controller": True, "blockOwnerDeletion": True}


def served_model_name(owner: Owner, spec: InferenceServiceSpec) -> str:
    return spec.model.served_model_name or owner.name


def service_url(owner: Owner, spec: InferenceServiceSpec) -> str:
    return f"http://{owner.name}.{owner.namespace}.svc.cluster.local:{spec.runtime.port}/v1"


def device_summary(spec: InferenceServiceSpec) -> str:
    """`npu×8`, `gpu×2`, `cpu`: the DEVICE printer column."""
    if spec.accelerator.type == "cpu":
        return "cpu"
    return f"{spec.accelerator.type}×{spec.accelerator.count}"


def _profile(spec: InferenceServiceSpec) -> AcceleratorProfile:
    return profile_for(spec.accelerator.type, spec.accelerator.vendor)


def _model_volume(spec: InferenceServiceSpec) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """Where the runtime finds the weights: (path in the container, volumes, volume mounts)."""
    return _volume_for(spec.model, "model", MODEL_DIR)


def _volume_for(model: ModelSpec, name: str, mount_dir: str) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """A model source as (path in the container, volumes, mounts); volumes are `name` / `name`-cache."""
    source = model.source
    if source.startswith("pvc://"):
        claim, _, sub = source.removeprefix("pvc://").partition("/")
        volume = {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        mount = {"name": name, "mountPath": mount_dir, "readOnly": True}
        return f"{mount_dir}/{sub}".rstrip("/"), [volume], [mount]
    if source.startswith("hostPath://"):
        path = source.removeprefix("hostPath://")
        volume = {"name": name, "hostPath": {"path": path, "type": "Directory"}}
        mount = {"name": name, "mountPath": mount_dir, "readOnly": True}
        return mount_dir, [volume], [mount]
    if source.startswith("hf://"):
        repo = source.removeprefix("hf://")
        empty_dir: dict[str, Any] = {}
        if model.cache_size_limit is not None:
            empty_dir["sizeLimit"] = str(model.cache_size_limit)
        volume = {"name": f"{name}-cache", "emptyDir": empty_dir}
        mount = {"name": f"{name}-cache", "mountPath": mount_dir}
        return f"{mount_dir}/{repo}", [volume], [mount]
    return source, [], []  # a path inside the image


# The init container's script: idempotent, so a restarted pod reuses a complete download.
_DOWNLOAD_SCRIPT = (
    "import sys\n"
    "from huggingface_hub import snapshot_download\n"
    "snapshot_download(repo_id=sys.argv[1], revision=sys.argv[2], local_dir=sys.argv[3])\n"
)


def _download_init_container(spec: InferenceServiceSpec, image: str, model_path: str,
                             security_context: dict[str, Any], model: ModelSpec | None = None,
                             name: str = "model", mount_dir: str = MODEL_DIR) -> dict[str, Any]:
    """Downloads an `hf://` model (the main one, or `model` into volume `name`-cache) before the server starts."""
    model = model or spec.model
    repo = model.source.removeprefix("hf://")
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": f"{mount_dir}/.hf-home"}]
    if model.hf_token_secret_name:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": model.hf_token_secret_name, "key": "token"}}})
    container: dict[str, Any] = {
        "name": f"{name}-download",
        "image": image,
        "command": ["python", "-c", _DOWNLOAD_SCRIPT, repo, model.revision or "main", model_path],
        "env": env,
        "volumeMounts": [{"name": f"{name}-cache", "mountPath": mount_dir}],
        "securityContext": security_context,
    }
    if spec.runtime.image_pull_policy:
        container["imagePullPolicy"] = spec.runtime.image_pull_policy
    return container


def _adapter_download(spec: InferenceServiceSpec, image: str, index: int, repo: str, path: str,
                      security_context: dict[str, Any]) -> dict[str, Any]:
    """The model's download step for an `hf://` LoRA adapter, into the adapters' cache volume."""
    container = _download_init_container(spec, image, path, security_context)
    container["name"] = f"adapter-download-{index}"
    container["command"] = ["python", "-c", _DOWNLOAD_SCRIPT, repo, "main", path]
    container["volumeMounts"] = [{"name": "adapter-cache", "mountPath": ADAPTER_DIR + "/hf"}]
    container["env"] = [{**e, "value": f"{ADAPTER_DIR}/hf/.hf-home"} if e["name"] == "HF_HOME" else e
                        for e in container["env"]]
    return container


def runtime_args(owner: Owner, spec: InferenceServiceSpec, model_path: str) -> list[str]:
    """The `bowline_runtime serve` flags; optional engine settings appear only when set."""
    args = [
        "--model", model_path,
        "--served-model-name", served_model_name(owner, spec),
        "--host", "0.0.0.0",
        "--port", str(spec.runtime.port),
        "--device", _profile(spec).device,
        "--tensor-parallel-size", str(spec.tensor_parallel_size),
    ]
    if spec.max_model_len is not None:
        args += ["--max-model-len", str(spec.max_model_len)]
    engine = spec.engine
    optional = [
        ("--dtype", engine.dtype),
        ("--quantization", engine.quantization),
        ("--kv-cache-dtype", engine.kv_cache_dtype),
        ("--max-num-seqs", engine.max_num_seqs),
        ("--max-num-batched-tokens", engine.max_num_batched_tokens),
        ("--block-size", engine.block_size),
        ("--gpu-memory-utilization", engine.memory_utilization),
    ]
    for flag, value in optional:
        if value is not None:
            args += [flag, str(value)]
    if engine.enable_prefix_caching:
        args.append("--enable-prefix-caching")
    return args + speculative_args(spec) + lora_args(spec, adapter_mounts(spec).paths) + list(engine.extra_args)


def speculative_args(spec: InferenceServiceSpec) -> list[str]:
    """spec.speculative as vLLM's speculative-decoding flags; the draft is mounted at DRAFT_MODEL_DIR."""
    spec_dec = spec.speculative
    if spec_dec is None:
        return []
    if spec_dec.resolved_method == "ngram" or spec_dec.model is None:
        args = ["--speculative-model", "[ngram]"]
    else:
        args = ["--speculative-model", _volume_for(spec_dec.model, "draft-model", DRAFT_MODEL_DIR)[0]]
    args += ["--num-speculative-tokens", str(spec_dec.num_speculative_tokens)]
    for flag, value in (("--ngram-prompt-lookup-max", spec_dec.prompt_lookup_max),
                        ("--ngram-prompt-lookup-min", spec_dec.prompt_lookup_min),
                        ("--speculative-disable-by-batch-size", spec_dec.disable_by_batch_size),
                        ("--speculative-draft-tensor-parallel-size",
                         spec_dec.draft_tensor_parallel_size if spec_dec.resolved_method != "ngram" else None)):
        if value is not None:
            args += [flag, str(value)]
    return args


def _env(spec: InferenceServiceSpec, profile: AcceleratorProfile) -> list[dict[str, Any]]:
    """Profile env, then the drain budget, then the user's env; a user entry replaces one of the same name."""
    base = {**profile.env(spec.accelerator.count or 0), "BOWLINE_SHUTDOWN_GRACE_PERIOD": str(DRAIN_SECONDS)}
    user_names = {item["name"] for item in spec.runtime.env}
    env = [{"name": k, "value": v} for k, v in base.items() if k not in user_names]
    return env + [dict(item) for item in spec.runtime.env]


def _resources(spec: InferenceServiceSpec, profile: AcceleratorProfile) -> dict[str, Any]:
    """The user's requests/limits plus the accelerator as an extended resource (requests == limits)."""
    resources: dict[str, Any] = {k: dict(v) for k, v in spec.runtime.resources.items() if isinstance(v, dict)}
    resource_name = spec.accelerator.resource_name or profile.resource_name
    if resource_name and spec.accelerator.count:
        for section in ("requests", "limits"):
            resources.setdefault(section, {})[resource_name] = str(spec.accelerator.count)
    return resources


def _security_contexts(spec: InferenceServiceSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod, container) security contexts: non-root and locked down unless runAsRoot is asked for."""
    if spec.runtime.run_as_root:
        # Some Ascend driver installs only let root open the devices (the Ascend guide runs as uid 0).
        return {}, {"runAsUser": 0, "runAsNonRoot": False}
    pod = {"runAsNonRoot": True, "runAsUser": NON_ROOT_UID, "runAsGroup": NON_ROOT_UID, "fsGroup": NON_ROOT_UID,
           "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    return pod, container


def _probes(spec: InferenceServiceSpec) -> dict[str, Any]:
    """Startup covers model loading (startupTimeoutSeconds); after that readiness/liveness poll /health."""
    def http(period: int, failures: int, timeout: int) -> dict[str, Any]:
        return {"httpGet": {"path": "/health", "port": PORT_NAME}, "periodSeconds": period,
                "failureThreshold": failures, "timeoutSeconds": timeout}

    return {
        "startupProbe": http(STARTUP_PERIOD_SECONDS,
                             math.ceil(spec.runtime.startup_timeout_seconds / STARTUP_PERIOD_SECONDS), 5),
        "readinessProbe": http(5, 3, 5),
        # Generous: a busy engine answers /health late; a restart would throw away the loaded model.
        "livenessProbe": http(15, 6, 10),
    }


def render_deployment(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The runtime Deployment: one pod per replica, each holding a full model copy."""
    profile = _profile(spec)
    rt = spec.runtime
    image = rt.image or profile.image
    model_path, volumes, mounts = _model_volume(spec)
    pod_security, container_security = _security_contexts(spec)

    for host in profile.host_mounts:
        volumes.append({"name": host.name, "hostPath": {"path": host.path, "type": host.type}})
        mounts.append({"name": host.name, "mountPath": host.path, "readOnly": host.read_only})
    adapters = adapter_mounts(spec)
    volumes += adapters.volumes
    mounts += adapters.mounts
    if spec.tensor_parallel_size > 1:
        # Tensor-parallel ranks exchange tensors through shared memory; the default 64 MiB /dev/shm is too small.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})

    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "command": ["python", "-m", "bowline_runtime", "serve"],
        "args": runtime_args(owner, spec, model_path),
        "ports": [{"name": PORT_NAME, "containerPort": rt.port, "protocol": "TCP"}],
        "env": _env(spec, profile),
        "resources": _resources(spec, profile),
        "volumeMounts": mounts,
        **_probes(spec),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_SECONDS)]}}},
        "securityContext": container_security,
    }
    if rt.image_pull_policy:
        container["imagePullPolicy"] = rt.image_pull_policy

    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        # Service links would inject e.g. BOWLINE_PORT=tcp://... for a Service named "bowline", which the
        # runtime reads as its --port. Nothing here needs them.
        "enableServiceLinks": False,
        "securityContext": pod_security,
    }
    init_containers = []
    if spec.model.source.startswith("hf://"):
        init_containers.append(_download_init_container(spec, image, model_path, container_security))
    init_containers += [_adapter_download(spec, image, i, repo, path, container_security)
                        for i, (repo, path) in enumerate(adapters.downloads)]
    draft = spec.speculative.model if spec.speculative is not None else None
    if draft is not None:  # the draft model is mounted (or downloaded) like the main one
        draft_path, draft_volumes, draft_mounts = _volume_for(draft, "draft-model", DRAFT_MODEL_DIR)
        volumes.extend(draft_volumes)
        mounts.extend(draft_mounts)
        if draft.source.startswith("hf://"):
            init_containers.append(_download_init_container(
                spec, image, draft_path, container_security, draft, "draft-model", DRAFT_MODEL_DIR))
    if init_containers:
        pod_spec["initContainers"] = init_containers
    node_selector = {**profile.node_selector, **rt.node_selector}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = list(profile.tolerations) + [dict(t) for t in rt.tolerations]
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spread := topology_spread_constraints(spec, selector_labels(owner)):
        pod_spec["topologySpreadConstraints"] = spread
    optional_pod_fields = {
        "affinity": rt.affinity,
        "serviceAccountName": rt.service_account_name,
        "schedulerName": rt.scheduler_name,
        "runtimeClassName": spec.accelerator.runtime_class_name,
    }
    pod_spec.update({k: v for k, v in optional_pod_fields.items() if v})

    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(rt.port), "prometheus.io/path": "/metrics",
                   **rt.pod_annotations}
    # Accelerator pods cannot surge: the extra pod would wait for devices the old one still holds.
    strategy = ({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
                if spec.accelerator.type != "cpu" else
                {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": owner.name, "namespace": owner.namespace, "labels": common_labels(owner),
                     "ownerReferences": [owner_reference(owner)]},
        "spec": {
            # With spec.autoscaling the scaler owns the count: not rendered, so never patched back.
            **({} if spec.autoscaling else {"replicas": spec.replicas}),
            "selector": {"matchLabels": selector_labels(owner)},
            "strategy": strategy,
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": rt.startup_timeout_seconds + 600,
            "template": {
                "metadata": {"labels": {**rt.pod_labels, **common_labels(owner)}, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


def render_service(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The ClusterIP Service behind status.url; only ready pods (model loaded) receive traffic."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": owner.name, "namespace": owner.namespace, "labels": common_labels(owner),
                     "ownerReferences": [owner_reference(owner)]},
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(owner),
            "ports": [{"name": PORT_NAME, "port": spec.runtime.port, "targetPort": PORT_NAME, "protocol": "TCP",
                       "appProtocol": "http"}],
        },
    }


def render_children(owner: Owner, spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    """Everything an InferenceService owns, in apply order (the Service first, so the URL resolves early)."""
    if spec.nodes > 1:  # a model copy over several pods: a LeaderWorkerSet instead of the Deployment
        from .leader_worker_set import render_multi_node_children

        return render_multi_node_children(owner, spec)
    return [render_service(owner, spec), render_deployment(owner, spec)]
