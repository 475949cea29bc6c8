"""Leader election: operator replicas with kopf peering (not --standalone) against the emulator.

kopf's peering is not a lease: every replica writes a keep-alive (identity, priority, lifetime) into the
ClusterKopfPeering's status and watches it; a replica that sees a live peer with a higher priority pauses
its watches, and when two share the highest priority *all* pause. These tests show that one replica
reconciles and the other creates nothing, and that one replica alone is not blocked by peering.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from operator_emulator import REPO_ROOT, EmulatorThread, start_operator, stop_operator, wait_for

NS = "default"
GROUP, VERSION, PLURAL = "serving.bowline.dev", "v1alpha1", "inferenceservices"
PEERING = "bowline"


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[dict[str, Any]]:
    emulator = EmulatorThread().start()
    kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig")
    client = kubernetes.config.new_client_from_config(str(kubeconfig))
    custom = kubernetes.client.CustomObjectsApi(client)
    # The chart creates the peering object (templates/peering.yaml); kopf only joins it.
    custom.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings",
                                        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                                         "metadata": {"name": PEERING}})
    state: dict[str, Any] = {"emulator": emulator, "kubeconfig": kubeconfig, "custom": custom, "procs": [],
                             "apps": kubernetes.client.AppsV1Api(client), "tmp": tmp_path}
    yield state
    for proc in state["procs"]:
        stop_operator(proc)
    emulator.stop()


def _start(cluster: dict[str, Any], log_name: str) -> Path:
    log = cluster["tmp"] / log_name
    cluster["procs"].append(start_operator(cluster["kubeconfig"], log, f"--peering={PEERING}", "--log-format=json",
                                           standalone=False))
    return log


def _peers(cluster: dict[str, Any]) -> dict[str, Any]:
    peering = cluster["custom"].get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", PEERING)
    return peering.get("status") or {}


def _create_isvc(cluster: dict[str, Any], name: str) -> None:
    obj = yaml.safe_load((REPO_ROOT / "examples" / "cpu-tiny.yaml").read_text())
    obj["metadata"] = {"name": name, "namespace": NS}
    cluster["custom"].create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, obj)


def _posts(cluster: dict[str, Any], plural: str, name: str) -> int:
    return sum(1 for r in list(cluster["emulator"].kmock)
               if str(r.method).upper().endswith("POST") and str(r.url.path).endswith(f"/{plural}")
               and isinstance(r.data, dict) and r.data.get("metadata", {}).get("name") == name)


def _json_lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _isvc_watches(cluster: dict[str, Any]) -> int:
    return cluster["emulator"].watch_requests("/inferenceservices")


def test_one_replica_with_peering_reconciles(cluster: dict[str, Any]) -> None:
    log = _start(cluster, "solo.log")
    wait_for(lambda: len(_peers(cluster)) == 1, 30, what="the replica's keep-alive in the peering object")
    wait_for(lambda: _isvc_watches(cluster), 30, what="the InferenceService watch")
    _create_isvc(cluster, "tiny-peered")
    wait_for(lambda: cluster["apps"].read_namespaced_deployment("tiny-peered", NS), what="Deployment")
    [(identity, peer)] = _peers(cluster).items()
    assert peer["priority"] > 0 and peer["lifetime"] > 0  # a random priority: replicas never tie
    # --log-format=json: every line the operator wrote is one JSON object with the promised fields.
    # The reconcile logs "Reconciled" after its last child and status write, a moment after the Deployment.
    wait_for(lambda: any(line.get("object") == f"{NS}/tiny-peered" and "Reconciled" in line["message"]
                         for line in _json_lines(log)), what="the Reconciled line")
    lines = _json_lines(log)
    assert lines and all({"time", "level", "logger", "message"} <= line.keys() for line in lines)


def test_two_replicas_create_children_exactly_once(cluster: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    logs = {}
    for replica in ("replica-a", "replica-b"):
        monkeypatch.setenv("POD_ID", replica)  # kopf's peer identity, as the chart sets it from the pod name
        logs[replica] = _start(cluster, f"{replica}.log")
    peers = wait_for(lambda: len(p := _peers(cluster)) == 2 and p, 30, what="both replicas in the peering object")
    leader = max(peers, key=lambda identity: peers[identity]["priority"])
    # Each replica reacts to the other's keep-alive within milliseconds; the follower pauses silently when
    # it never ran (kopf starts paused and logs only transitions), so leave it a moment.
    time.sleep(1.0)
    wait_for(lambda: _isvc_watches(cluster), 30, what="the InferenceService watch")
    _create_isvc(cluster, "tiny-ha")
    wait_for(lambda: cluster["apps"].read_namespaced_deployment("tiny-ha", NS), what="Deployment")
    time.sleep(1.0)  # room for the follower's (wrong) reconcile to show up
    assert _posts(cluster, "deployments", "tiny-ha") == 1
    assert _posts(cluster, "services", "tiny-ha") == 1
    reconciled = [replica for replica, log in logs.items()
                  if any(line.get("object") == f"{NS}/tiny-ha" for line in _json_lines(log))]
    assert reconciled == [leader]
