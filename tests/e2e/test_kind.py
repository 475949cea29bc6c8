"""End to end on kind: the chart, the operator and the CPU runtime, as a user runs them.

`make kind-up` once, then `make e2e` (builds runtime-cpu and operator, loads them into kind, runs this).
Steps: install the chart (real Helm, hack/helm.py), `kubectl apply` examples/cpu-tiny.yaml, wait for
phase Ready, call /v1/chat/completions from a pod inside the cluster through status.url, delete the
InferenceService and check its Deployment and Service are garbage-collected.

Skips, saying why, where docker (a running engine, not just the CLI), kind, kubectl, the Helm tool env
or the kind cluster are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER = os.environ.get("KIND_CLUSTER", "bowline")
RELEASE = "bowline-e2e"
OPERATOR_NAMESPACE = "bowline-e2e"
APP_NAMESPACE = "bowline-e2e-app"
EXAMPLE = REPO_ROOT / "examples" / "cpu-tiny.yaml"
HELM = [str(REPO_ROOT / ".venv-helm" / "bin" / "python"), str(REPO_ROOT / "hack" / "helm.py")]

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


def missing_tool() -> str | None:
    """Why this machine cannot run the e2e tests, or None."""
    if shutil.which("docker") is None:
        return "docker CLI not found"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out: no Docker engine answers"
    if info.returncode != 0:
        return "the docker CLI is installed but no Docker engine runs (`docker info` failed)"
    for tool in ("kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if not Path(HELM[0]).exists():
        return ".venv-helm is missing: `make install` builds it (needs Python >= 3.12)"
    clusters = subprocess.run(["kind", "get", "clusters"], capture_output=True, text=True, timeout=60).stdout
    if CLUSTER not in clusters.split():
        return f"no kind cluster named {CLUSTER!r}: run `make kind-up`, then `make e2e`"
    return None


def run(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def kubectl(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("kubectl", *args, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A kubeconfig for the kind cluster, exported for kubectl and Helm in this process's children."""
    reason = missing_tool()
    if reason:
        pytest.skip(reason)
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    kubeconfig.write_text(run("kind", "get", "kubeconfig", "--name", CLUSTER).stdout)
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig)
    yield
    if old is None:
        os.environ.pop("KUBECONFIG")
    else:
        os.environ["KUBECONFIG"] = old


@pytest.fixture(scope="module")
def operator(kube: None) -> Iterator[None]:
    """The chart installed with default values (images as `make e2e` tagged and loaded them)."""
    run(*HELM, "uninstall", "--release", RELEASE, "--namespace", OPERATOR_NAMESPACE, check=False)  # a failed run's
    run(*HELM, "install", "charts/bowline", "--release", RELEASE, "--namespace", OPERATOR_NAMESPACE)
    kubectl("-n", OPERATOR_NAMESPACE, "rollout", "status", f"deployment/{RELEASE}", "--timeout=300s", timeout=320)
    kubectl("create", "namespace", APP_NAMESPACE, check=False)
    yield
    kubectl("delete", "namespace", APP_NAMESPACE, "--wait=true", "--timeout=180s", check=False, timeout=200)
    run(*HELM, "uninstall", "--release", RELEASE, "--namespace", OPERATOR_NAMESPACE, check=False)
    kubectl("delete", "namespace", OPERATOR_NAMESPACE, "--wait=false", check=False)


def test_cpu_tiny_becomes_ready_and_answers_inside_the_cluster(operator: None) -> None:
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    kubectl("-n", APP_NAMESPACE, "apply", "-f", str(EXAMPLE))
    kubectl("-n", APP_NAMESPACE, "wait", f"inferenceservice/{name}", "--for=jsonpath={.status.phase}=Ready",
            "--timeout=600s", timeout=620)
    status = json.loads(kubectl("-n", APP_NAMESPACE, "get", f"inferenceservice/{name}", "-o", "json").stdout)["status"]
    assert status["url"].startswith(f"http://{name}.{APP_NAMESPACE}.svc")

    # The client runs in the runtime-cpu image: it is in the cluster already and has Python.
    image = yaml.safe_load(EXAMPLE.read_text())["spec"]["runtime"]["image"]
    client = (
        "import json, sys, urllib.request\n"
        "body = json.dumps({'model': sys.argv[2], 'max_tokens': 8,\n"
        "                   'messages': [{'role': 'user', 'content': 'Hello!'}]}).encode()\n"
        "request = urllib.request.Request(sys.argv[1] + '/chat/completions', body,\n"
        "                                 {'Content-Type': 'application/json'})\n"
        "print(urllib.request.urlopen(request, timeout=120).read().decode())\n"
    )
    kubectl("-n", APP_NAMESPACE, "run", "e2e-client", f"--image={image}", "--image-pull-policy=IfNotPresent",
            "--restart=Never", "--command", "--", "python", "-c", client, status["url"], status["servedModelName"])
    try:
        kubectl("-n", APP_NAMESPACE, "wait", "pod/e2e-client", "--for=jsonpath={.status.phase}=Succeeded",
                "--timeout=180s", timeout=200)
        logs = kubectl("-n", APP_NAMESPACE, "logs", "pod/e2e-client").stdout
    finally:
        kubectl("-n", APP_NAMESPACE, "delete", "pod/e2e-client", "--wait=false", check=False)
    completion = json.loads(logs.strip().splitlines()[-1])
    assert completion["object"] == "chat.completion"
    assert completion["model"] == status["servedModelName"]
    assert completion["usage"]["completion_tokens"] > 0
    assert isinstance(completion["choices"][0]["message"]["content"], str)


def test_deleting_the_inference_service_removes_its_children(operator: None) -> None:
    from bowline_operator.render import INSTANCE_LABEL

    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    kubectl("-n", APP_NAMESPACE, "apply", "-f", str(EXAMPLE))  # idempotent; lets this test run alone
    kubectl("-n", APP_NAMESPACE, "wait", f"deployment/{name}", "--for=create", "--timeout=120s", timeout=140)
    kubectl("-n", APP_NAMESPACE, "delete", f"inferenceservice/{name}", "--wait=true", "--timeout=120s", timeout=140)
    deadline = time.monotonic() + 180
    while True:
        children = kubectl("-n", APP_NAMESPACE, "get", "deployments,services", "-o", "name",
                           "-l", f"{INSTANCE_LABEL}={name}").stdout.split()
        if not children or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert children == []
