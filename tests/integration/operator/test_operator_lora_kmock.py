"""spec.adapters through the real operator process against kmock: flags rendered, duplicates refused."""

from __future__ import annotations

from typing import Any

import kubernetes
import pytest
from operator_emulator import wait_for
from test_operator_kmock import NS, _condition, _create, _deployment, _example, _get, cluster  # noqa: F401

ADAPTERS = [{"name": "sql", "source": "pvc://adapters/sql-lora"}, {"name": "chat", "source": "/adapters/chat"}]


def test_adapters_render_lora_flags_mounts_and_status(cluster: dict[str, Any]) -> None:  # noqa: F811
    obj = _example("cpu-tiny", "tiny-lora")
    obj["spec"]["adapters"] = ADAPTERS
    obj["spec"]["lora"] = {"maxRank": 32, "maxAdapters": 2, "maxCpuAdapters": 4}
    _create(cluster, obj)
    dep = wait_for(lambda: _deployment(cluster, "tiny-lora"), what="Deployment")
    pod = dep["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    i = args.index("--lora-modules")
    assert "--enable-lora" in args
    assert args[i + 1 : i + 3] == ["sql=/mnt/adapters/0/sql-lora", "chat=/adapters/chat"]
    assert [args[args.index(f) + 1] for f in ("--max-lora-rank", "--max-loras", "--max-cpu-loras")] == ["32", "2", "4"]
    claim = next(v for v in pod["volumes"] if v["name"] == "adapter-0")["persistentVolumeClaim"]
    assert claim == {"claimName": "adapters", "readOnly": True}
    parent = wait_for(lambda: (p := _get(cluster, "tiny-lora")).get("status", {}).get("adapters") and p, what="status")
    assert parent["status"]["adapters"] == ["sql", "chat"] and parent["status"]["adapterCount"] == 2


def test_duplicate_adapter_names_are_refused_with_valid_false(cluster: dict[str, Any]) -> None:  # noqa: F811
    obj = _example("cpu-tiny", "tiny-lora-dup")
    obj["spec"]["adapters"] = [*ADAPTERS, {"name": "sql", "source": "/adapters/other"}]
    _create(cluster, obj)
    parent = wait_for(lambda: (p := _get(cluster, "tiny-lora-dup")).get("status", {}).get("phase") == "Failed" and p,
                      what="Failed")
    valid = _condition(parent, "Valid")
    assert valid["status"] == "False" and "adapters[].name must be unique (repeated: sql)" in valid["message"]
    with pytest.raises(kubernetes.client.ApiException) as error:
        cluster["apps"].read_namespaced_deployment("tiny-lora-dup", NS)
    assert error.value.status == 404
