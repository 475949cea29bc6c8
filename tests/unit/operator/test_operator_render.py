"""Golden rendering tests: what each example's pods, mounts, args and probes look like."""

from __future__ import annotations

from typing import Any

from bowline_operator.render import Owner, render_children
from bowline_operator.validation import validate_spec
from operator_crd_tools import apply_defaults, example, schema

OWNER = Owner(name="svc", namespace="ml", uid="1234-abcd")


def _render(name: str, **spec_overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = apply_defaults(schema(), example(name))["spec"]
    spec.update(spec_overrides)
    checked = validate_spec(spec)
    assert checked.ok, checked.problems
    service, deployment = render_children(OWNER, checked.spec)
    return deployment, service


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_children_are_owned_and_named_after_the_service() -> None:
    deployment, service = _render("cpu-tiny")
    for child in (deployment, service):
        assert child["metadata"]["name"] == "svc" and child["metadata"]["namespace"] == "ml"
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "serving.bowline.dev/v1alpha1", "kind": "InferenceService", "name": "svc",
                       "uid": "1234-abcd", "controller": True, "blockOwnerDeletion": True}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in service["spec"]["selector"].items())


def test_cpu_tiny() -> None:
    deployment, service = _render("cpu-tiny")
    container = _container(deployment)
    pod = deployment["spec"]["template"]["spec"]
    args = container["args"]
    assert container["command"] == ["python", "-m", "bowline_runtime", "serve"]
    assert container["image"] == "ghcr.io/bowline-dev/bowline-runtime-cpu:0.1.0"
    assert _flag(args, "--model") == "/models/tiny"
    assert _flag(args, "--served-model-name") == "tiny"
    assert _flag(args, "--device") == "cpu"
    assert _flag(args, "--tensor-parallel-size") == "1"
    assert _flag(args, "--max-model-len") == "512"
    assert _flag(args, "--port") == "8000" and _flag(args, "--host") == "0.0.0.0"
    assert pod["volumes"] == [] and container["volumeMounts"] == []  # model in the image, tp=1: no shm
    assert not any(k.endswith("/gpu") or "huawei" in k for k in container["resources"].get("limits", {}))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["enableServiceLinks"] is False
    assert service["spec"]["ports"][0]["port"] == 8000


def test_probes_allow_model_loading_and_draining() -> None:
    deployment, _ = _render("cpu-tiny")
    container = _container(deployment)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # the example's startupTimeoutSeconds
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    env = {e["name"]: e.get("value") for e in container["env"]}
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(env["BOWLINE_SHUTDOWN_GRACE_PERIOD"]) + 5  # drain + preStop fit before SIGKILL


def test_nvidia_gpu() -> None:
    deployment, _ = _render("nvidia-gpu")
    container = _container(deployment)
    pod = deployment["spec"]["template"]["spec"]
    args = container["args"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert _flag(args, "--device") == "cuda" and _flag(args, "--tensor-parallel-size") == "2"
    assert _flag(args, "--max-model-len") == "32768" and _flag(args, "--served-model-name") == "qwen2.5-7b-instruct"
    assert _flag(args, "--model") == "/mnt/models/qwen2.5-7b-instruct"
    assert _flag(args, "--dtype") == "bfloat16" and _flag(args, "--gpu-memory-utilization") == "0.9"
    assert "--enable-prefix-caching" in args
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"model": "/mnt/models", "dshm": "/dev/shm"}
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # no spare GPUs for a surge pod


def test_ascend_npu_matches_the_reference_deployment() -> None:
    deployment, service = _render("ascend-npu")
    container = _container(deployment)
    pod = deployment["spec"]["template"]["spec"]
    args = container["args"]
    assert container["resources"]["limits"]["huawei.com/ascend-1980"] == "8"
    assert container["resources"]["requests"]["huawei.com/ascend-1980"] == "8"
    assert pod["nodeSelector"] == {"accelerator/huawei-npu": "ascend-1980"}
    assert pod["schedulerName"] == "volcano"
    assert _flag(args, "--device") == "npu" and _flag(args, "--tensor-parallel-size") == "8"
    assert _flag(args, "--max-model-len") == "4096" and _flag(args, "--block-size") == "128"
    assert _flag(args, "--port") == "8080" and container["ports"][0]["containerPort"] == 8080
    assert service["spec"]["ports"][0]["port"] == 8080
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ASCEND_RT_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert env["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host == {"model": "/data/models/qwen2-72b-instruct", "ascend-driver": "/usr/local/Ascend/driver",
                    "ascend-add-ons": "/usr/local/Ascend/add-ons", "hccn": "/etc/hccn.conf",
                    "npu-smi": "/usr/local/sbin/npu-smi", "localtime": "/etc/localtime"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["hccn"] == "/etc/hccn.conf" and mounts["npu-smi"] == "/usr/local/sbin/npu-smi"
    assert mounts["dshm"] == "/dev/shm"
    assert container["securityContext"]["runAsUser"] == 0  # runAsRoot, as the reference document runs


def test_ascend_default_resource_name_and_user_node_selector() -> None:
    spec = apply_defaults(schema(), example("ascend-npu"))["spec"]
    del spec["accelerator"]["resourceName"]
    spec["runtime"]["nodeSelector"] = {"zone": "a"}
    checked = validate_spec(spec)
    _, deployment = render_children(OWNER, checked.spec)
    pod = deployment["spec"]["template"]["spec"]
    assert _container(deployment)["resources"]["limits"]["huawei.com/Ascend910"] == "8"
    assert pod["nodeSelector"] == {"accelerator/huawei-npu": "ascend-1980", "zone": "a"}


def test_hf_source_downloads_before_serving() -> None:
    deployment, _ = _render("cpu-tiny", model={"source": "hf://Qwen/Qwen2.5-0.5B", "revision": "v1"})
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"][-3:] == ["Qwen/Qwen2.5-0.5B", "v1", "/mnt/models/Qwen/Qwen2.5-0.5B"]
    assert _flag(_container(deployment)["args"], "--model") == "/mnt/models/Qwen/Qwen2.5-0.5B"
    assert _flag(_container(deployment)["args"], "--served-model-name") == "svc"  # defaults to the object name
    assert {"name": "model-cache", "emptyDir": {}} in pod["volumes"]


def test_amd_vendor_uses_amd_resource() -> None:
    spec = apply_defaults(schema(), example("nvidia-gpu"))["spec"]
    spec["accelerator"]["vendor"] = "amd"
    _, deployment = render_children(OWNER, validate_spec(spec).spec)
    assert _container(deployment)["resources"]["limits"]["amd.com/gpu"] == "2"


def test_rendering_is_deterministic() -> None:
    assert _render("ascend-npu") == _render("ascend-npu")
