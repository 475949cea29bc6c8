"""The operator started without --standalone in a cluster that lacks the peering object: kopf pauses
every watch and says so only at DEBUG; the operator must say it as a WARNING, repeatedly while paused,
and in its health endpoint, then resume by itself once the object exists."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from operator_emulator import REPO_ROOT, EmulatorThread, start_operator, stop_operator, wait_for

NS = "default"
GROUP, VERSION, PLURAL = "serving.bowline.dev", "v1alpha1", "inferenceservices"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def paused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    emulator = EmulatorThread().start()
    kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig")
    client = kubernetes.config.new_client_from_config(str(kubeconfig))
    port = _free_port()
    monkeypatch.setenv("BOWLINE_OPERATOR_PEERING_CHECK_SECONDS", "1")  # "every minute", faster
    log = tmp_path / "operator.log"
    proc = start_operator(kubeconfig, log, "--peering=bowline", "--log-format=json",
                          f"--liveness=http://127.0.0.1:{port}/healthz", standalone=False)
    yield {"emulator": emulator, "log": log, "port": port, "custom": kubernetes.client.CustomObjectsApi(client),
           "apps": kubernetes.client.AppsV1Api(client)}
    stop_operator(proc)
    emulator.stop()


def _warnings(log: Path) -> list[str]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line["message"] for line in lines if line["level"] == "warning" and "peering" in line["message"]]


def _health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return json.loads(response.read())


def test_missing_peering_is_a_repeated_warning_and_in_healthz(paused: dict[str, Any]) -> None:
    warnings = wait_for(lambda: len(w := _warnings(paused["log"])) >= 2 and w, 40, 0.2,
                        what="two peering warnings")
    message = warnings[0]
    assert "ClusterKopfPeering 'bowline' does not exist" in message
    assert '"kind": "ClusterKopfPeering", "metadata": {"name": "bowline"}' in message  # how to create it
    assert "Helm chart creates it" in message and "--standalone" in message
    health = wait_for(lambda: _health(paused["port"]), 20, 0.2, what="the health endpoint")
    assert health["peering"]["ok"] is False
    assert health["peering"]["missing"] == ["ClusterKopfPeering 'bowline'"]

    # Paused indeed: an InferenceService gets no Deployment while the object is missing.
    obj = yaml.safe_load((REPO_ROOT / "examples" / "cpu-tiny.yaml").read_text())
    obj["metadata"] = {"name": "tiny-waiting", "namespace": NS}
    paused["custom"].create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, obj)
    time.sleep(1.5)
    with pytest.raises(kubernetes.client.ApiException) as error:
        paused["apps"].read_namespaced_deployment("tiny-waiting", NS)
    assert error.value.status == 404

    # Creating the object (what the warning says) resumes the operator without a restart.
    paused["custom"].create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", {
        "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "bowline"}})
    wait_for(lambda: paused["apps"].read_namespaced_deployment("tiny-waiting", NS), 40, 0.2,
             what="the Deployment once the peering object exists")
    wait_for(lambda: "Peering object found" in paused["log"].read_text(), 10, what="the all-clear")
    # kopf caches probe results for up to 10 s, so this also spans many check intervals.
    health = wait_for(lambda: (h := _health(paused["port"]))["peering"]["ok"] and h, 20, 0.2,
                      what="peering ok in /healthz")
    assert health["peering"]["missing"] == []
    after = paused["log"].read_text().split("Peering object found", 1)[1]
    assert "Paused, reconciling nothing" not in after  # no more warnings once the object exists
