"""The Helm chart, linted and rendered by real Helm (helm-sdkpy in .venv-helm), then checked as a user relies on it.

All values cases render through one `hack/helm.py batch` process (one kmock emulator, one Helm library
load, about a second); tests look up their case's manifests, NOTES or error by name.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
CHART = REPO_ROOT / "charts" / "bowline"
HELM_PYTHON = REPO_ROOT / ".venv-helm" / "bin" / "python"
HELM_SCRIPT = REPO_ROOT / "hack" / "helm.py"
RELEASE_NAMESPACE = "bowline-system"

_EXAMPLE = yaml.safe_load((REPO_ROOT / "examples" / "cpu-tiny.yaml").read_text())

# Values a user may set, one case per documented option group. Release name = case name.
GOOD_CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "ha": {"replicaCount": 2, "leaderElection": {"enabled": True, "peeringName": "bowline-ha"}},
    "standalone": {"leaderElection": {"enabled": False}},
    "quiet-logs": {"logLevel": "warning"},
    "custom": {
        "image": {"repository": "registry.example.com/bowline-operator", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": ["regcred"],
        "logLevel": "debug",
        "logFormat": "json",
        "healthPort": 9090,
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
        "podAnnotations": {"example.com/team": "ml"},
        "podLabels": {"example.com/tier": "control"},
        "priorityClassName": "system-cluster-critical",
        "serviceAccount": {"create": True, "name": "bowline-op", "annotations": {"example.com/role": "op"}},
    },
    "autoscaling": {"autoscaling": {"prometheus": {"serverAddress": "http://prometheus.obs.svc:9090"}}},
    "no-rbac": {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "existing-sa"}},
    "monitoring": {"monitoring": {"podMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                                  "grafanaDashboard": {"enabled": True, "namespace": "grafana"}}},
    "monitoring-namespaced": {"watchNamespaces": ["team-a"], "monitoring": {"podMonitor": {"enabled": True}}},
    "gateway": {"gateway": {"endpointPicker": {"name": "shared-epp", "port": 9100, "failureMode": "FailOpen"}}},
    "isvcs": {"inferenceServices": [
        {"name": "tiny", "spec": _EXAMPLE["spec"]},
        {"name": "tiny-b", "namespace": "team-b", "labels": {"example.com/app": "chat"},
         "spec": {"model": {"source": "/models/tiny"}, "accelerator": {"type": "cpu"}}},
    ]},
}

# Values the chart must refuse, with the part of Helm's message that tells the user what is wrong.
BAD_CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "namespaces-not-a-list": ({"watchNamespaces": "team-a"}, ["/watchNamespaces", "want array"]),
    "namespace-not-dns": ({"watchNamespaces": ["Team_A"]}, ["/watchNamespaces/0", "does not match pattern"]),
    "unknown-key": ({"replicas": 2}, ["additional properties 'replicas' not allowed"]),
    "bad-log-level": ({"logLevel": "verbose"}, ["/logLevel", "value must be one of"]),
    "bad-log-format": ({"logFormat": "logfmt"}, ["/logFormat", "value must be one of"]),
    "bad-pull-policy": ({"image": {"repository": "r", "pullPolicy": "Sometimes"}}, ["/image/pullPolicy"]),
    "pull-secret-object": ({"imagePullSecrets": [{"name": "regcred"}]}, ["/imagePullSecrets/0", "want string"]),
    "isvc-without-accelerator": ({"inferenceServices": [{"name": "x", "spec": {"model": {"source": "/m"}}}]},
                                 ["/inferenceServices/0/spec", "missing property 'accelerator'"]),
    "isvc-bad-device": ({"inferenceServices": [{"name": "x", "spec": {"model": {"source": "/m"},
                                                                      "accelerator": {"type": "tpu"}}}]},
                        ["/inferenceServices/0/spec/accelerator/type"]),
    "prometheus-without-scheme": ({"autoscaling": {"prometheus": {"serverAddress": "prometheus:9090"}}},
                                  ["/autoscaling/prometheus/serverAddress", "does not match pattern"]),
    "bad-epp-failure-mode": ({"gateway": {"endpointPicker": {"name": "{pool}-epp", "port": 9002, "failureMode": "Retry"}}},
                             ["/gateway/endpointPicker/failureMode", "value must be one of"]),
    "replicas-without-leader-election": ({"replicaCount": 2, "leaderElection": {"enabled": False}},
                                         ["replicaCount > 1 needs leaderElection.enabled=true"]),
}


def run_helm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if not HELM_PYTHON.exists():
        reason = f"{HELM_PYTHON.relative_to(REPO_ROOT)} is missing: `make install` builds it (needs Python >= 3.12)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return subprocess.run([str(HELM_PYTHON), str(HELM_SCRIPT), *args], input=stdin, capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)


@pytest.fixture(scope="session")
def rendered() -> dict[str, dict[str, Any]]:
    """Case name -> {"docs": [objects], "notes": str} or {"error": str}."""
    cases = [{"release": name, "namespace": RELEASE_NAMESPACE, "values": values}
             for name, values in GOOD_CASES.items()]
    cases += [{"release": name, "namespace": RELEASE_NAMESPACE, "values": values}
              for name, (values, _) in BAD_CASES.items()]
    proc = run_helm("batch", str(CHART), stdin=json.dumps(cases))
    assert proc.returncode == 0, proc.stderr
    results = {}
    for case, result in zip(cases, json.loads(proc.stdout), strict=True):
        if "manifest" in result:
            result["docs"] = [d for d in yaml.safe_load_all(result["manifest"]) if d]
        results[case["release"]] = result
    return results


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [obj] = objects(docs, kind)
    return obj


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, for every CRD the chart ships."""
    schemas = {}
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            for version in crd["spec"]["versions"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [container] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


# --- lint -----------------------------------------------------------------------------------------


def test_helm_lint_passes() -> None:
    proc = run_helm("lint", str(CHART))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_helm_lint_catches_a_broken_template(tmp_path: Path) -> None:
    import shutil

    chart = shutil.copytree(CHART, tmp_path / "bowline")
    (chart / "templates" / "broken.yaml").write_text("kind: ConfigMap\nmetadata: {{ .Values.nope.deeper }}\n")
    proc = run_helm("lint", str(chart))
    assert proc.returncode == 1
    assert "templates/" in proc.stdout


# --- every documented option renders to valid Kubernetes objects ---------------------------------


@pytest.mark.parametrize("case", list(GOOD_CASES))
def test_renders_objects_valid_for_kubernetes(rendered: dict[str, dict[str, Any]], case: str) -> None:
    import jsonschema
    import kubernetes_validate

    result = rendered[case]
    assert "error" not in result, result.get("error")
    schemas = crd_schemas()
    for doc in result["docs"]:
        key = (doc["apiVersion"], doc["kind"])
        if key in schemas:
            # Custom resources have no schema in kubernetes-validate: use their CRD's (OpenAPI v3,
            # draft-4 style `exclusiveMinimum: true`).
            jsonschema.Draft4Validator(schemas[key]).validate(doc)
        elif doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # the Prometheus Operator's CRDs are not ours: see test_pod_monitor_scrapes_runtime_pods
        else:
            kubernetes_validate.validate(doc, "1.33", strict=True)


def test_optional_parts_are_off_by_default(rendered: dict[str, dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in rendered["defaults"]["docs"])
    assert kinds == ["ClusterKopfPeering", "ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"]


# --- RBAC: exactly what the operator calls --------------------------------------------------------


def test_cluster_wide_rbac_is_exactly_the_operators_rules(rendered: dict[str, dict[str, Any]]) -> None:
    from bowline_operator.rbac import REQUIRED_RULES

    docs = rendered["defaults"]["docs"]
    assert rule_set(one(docs, "ClusterRole")["rules"]) == rule_set(REQUIRED_RULES)
    assert not objects(docs, "Role")
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one(docs, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": one(docs, "ServiceAccount")["metadata"]["name"],
                                    "namespace": RELEASE_NAMESPACE}]


def test_namespaced_rbac_grants_namespaced_rules_only_in_watched_namespaces(
        rendered: dict[str, dict[str, Any]]) -> None:
    from bowline_operator.rbac import REQUIRED_RULES

    docs = rendered["namespaced"]["docs"]
    cluster_rules = rule_set(one(docs, "ClusterRole")["rules"])
    # Only cluster-scoped resources stay cluster-wide: no Deployments or Services outside the watched namespaces.
    assert {resource for _, resource, _ in cluster_rules} == {"customresourcedefinitions", "namespaces",
                                                              "clusterkopfpeerings"}
    roles = {r["metadata"]["namespace"]: r for r in objects(docs, "Role")}
    assert sorted(roles) == ["team-a", "team-b"]
    for namespace, role in roles.items():
        assert cluster_rules | rule_set(role["rules"]) == rule_set(REQUIRED_RULES), namespace
    bindings = {b["metadata"]["namespace"]: b for b in objects(docs, "RoleBinding")}
    assert sorted(bindings) == ["team-a", "team-b"]
    for binding in bindings.values():
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": one(docs, "ClusterRole")["metadata"]["name"]}
        assert binding["subjects"][0]["namespace"] == RELEASE_NAMESPACE


def test_rbac_grants_the_scale_out_children_exactly_and_no_wildcards(rendered: dict[str, dict[str, Any]]) -> None:
    for case in ("defaults", "namespaced"):
        docs = rendered[case]["docs"]
        rules = [rule for d in docs if d["kind"] in ("ClusterRole", "Role") for rule in d["rules"]]
        assert not [r for r in rules if "*" in r["apiGroups"] + r["resources"] + r["verbs"]], case
        granted = rule_set(rules)
        for group, resource in (("keda.sh", "scaledobjects"), ("autoscaling", "horizontalpodautoscalers"),
                                ("policy", "poddisruptionbudgets")):
            assert {v for g, r, v in granted if (g, r) == (group, resource)} == {"get", "create", "patch", "delete"}


def test_prometheus_address_reaches_the_operator(rendered: dict[str, dict[str, Any]]) -> None:
    from bowline_operator import autoscaling
    from bowline_operator.__main__ import parse_args

    assert parse_args(operator_container(rendered["autoscaling"]["docs"])["args"]).prometheus_url == \
        "http://prometheus.obs.svc:9090"
    assert parse_args(operator_container(rendered["defaults"]["docs"])["args"]).prometheus_url == \
        autoscaling.DEFAULT_PROMETHEUS_URL


def test_rbac_grants_the_cache_and_gateway_verbs_and_no_wildcards(rendered: dict[str, dict[str, Any]]) -> None:
    for case in ("defaults", "namespaced"):
        docs = rendered[case]["docs"]
        rules = [rule for role in objects(docs, "ClusterRole") + objects(docs, "Role") for rule in role["rules"]]
        assert rules and not [r for r in rules if "*" in r["apiGroups"] + r["resources"] + r["verbs"]], case
    granted = rule_set(one(rendered["defaults"]["docs"], "ClusterRole")["rules"])
    for group, resource, verbs in (("", "persistentvolumeclaims", {"get", "create", "delete"}),
                                   ("batch", "jobs", {"get", "list", "watch", "create", "delete"}),
                                   ("inference.networking.k8s.io", "inferencepools", {"get", "list", "create", "patch", "delete"}),
                                   ("inference.networking.x-k8s.io", "inferenceobjectives",
                                    {"get", "list", "create", "patch", "delete"})):
        assert {v for g, r, v in granted if (g, r) == (group, resource)} == verbs, resource


def test_endpoint_picker_values_reach_the_operator(rendered: dict[str, dict[str, Any]]) -> None:
    def env(case: str) -> dict[str, str]:
        return {e["name"]: e.get("value") for e in operator_container(rendered[case]["docs"])["env"]}

    assert {k: v for k, v in env("defaults").items() if k.startswith("BOWLINE_OPERATOR_EPP_")} == {
        "BOWLINE_OPERATOR_EPP_NAME": "{pool}-epp", "BOWLINE_OPERATOR_EPP_PORT": "9002",
        "BOWLINE_OPERATOR_EPP_FAILURE_MODE": "FailClose"}
    assert env("gateway")["BOWLINE_OPERATOR_EPP_NAME"] == "shared-epp"
    assert env("gateway")["BOWLINE_OPERATOR_EPP_PORT"] == "9100"
    assert env("gateway")["BOWLINE_OPERATOR_EPP_FAILURE_MODE"] == "FailOpen"


def test_rbac_and_service_account_can_be_brought_by_the_user(rendered: dict[str, dict[str, Any]]) -> None:
    docs = rendered["no-rbac"]["docs"]
    assert not [d for d in docs if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role")]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing-sa"


# --- the operator Deployment -----------------------------------------------------------------------


def test_operator_pod_is_locked_down(rendered: dict[str, dict[str, Any]]) -> None:
    docs = rendered["defaults"]["docs"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = operator_container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


@pytest.mark.parametrize("case", ["defaults", "namespaced", "standalone", "custom"])
def test_operator_accepts_its_args_and_probes_hit_its_health_endpoint(
        rendered: dict[str, dict[str, Any]], case: str) -> None:
    from urllib.parse import urlsplit

    from bowline_operator.__main__ import parse_args

    container = operator_container(rendered[case]["docs"])
    args = parse_args(container["args"])  # argparse exits on a flag the operator does not know
    assert args.namespaces == GOOD_CASES[case].get("watchNamespaces", [])
    liveness = urlsplit(args.liveness)
    [port] = container["ports"]
    assert port["containerPort"] == liveness.port
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": liveness.path, "port": port["name"]}


@pytest.mark.parametrize(("case", "level", "log_format"), [("defaults", "info", "plain"), ("quiet-logs", "warning", "plain"),
                                                         ("custom", "debug", "json")])
def test_log_settings_become_operator_flags(rendered: dict[str, dict[str, Any]], case: str, level: str,
                                            log_format: str) -> None:
    from bowline_operator.__main__ import parse_args

    container_args = operator_container(rendered[case]["docs"])["args"]
    assert f"--log-level={level}" in container_args and f"--log-format={log_format}" in container_args
    args = parse_args(container_args)
    assert (args.log_level, args.log_format) == (level, log_format)


def test_leader_election_creates_the_peering_the_operator_joins(rendered: dict[str, dict[str, Any]]) -> None:
    from bowline_operator.__main__ import parse_args

    ha = rendered["ha"]["docs"]
    args = parse_args(operator_container(ha)["args"])
    assert one(ha, "Deployment")["spec"]["replicas"] == 2
    assert not args.standalone
    assert one(ha, "ClusterKopfPeering")["metadata"]["name"] == args.peering == "bowline-ha"

    namespaced = rendered["namespaced"]["docs"]
    assert sorted(p["metadata"]["namespace"] for p in objects(namespaced, "KopfPeering")) == ["team-a", "team-b"]
    assert not objects(namespaced, "ClusterKopfPeering")

    standalone = rendered["standalone"]["docs"]
    assert parse_args(operator_container(standalone)["args"]).standalone
    assert not objects(standalone, "ClusterKopfPeering") and not objects(standalone, "KopfPeering")


def test_user_settings_reach_the_operator_pod(rendered: dict[str, dict[str, Any]]) -> None:
    from bowline_operator.__main__ import parse_args

    values = GOOD_CASES["custom"]
    docs = rendered["custom"]["docs"]
    template = one(docs, "Deployment")["spec"]["template"]
    pod, container = template["spec"], operator_container(docs)
    assert container["image"] == "registry.example.com/bowline-operator:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    args = parse_args(container["args"])
    assert (args.log_level, args.log_format) == ("debug", "json")
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert pod[key] == values[key]
    assert template["metadata"]["annotations"] == values["podAnnotations"]
    assert template["metadata"]["labels"]["example.com/tier"] == "control"
    account = one(docs, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"] == "bowline-op"
    assert account["metadata"]["annotations"] == {"example.com/role": "op"}


def test_image_tag_defaults_to_the_chart_app_version(rendered: dict[str, dict[str, Any]]) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert operator_container(rendered["defaults"]["docs"])["image"].endswith(f":{chart['appVersion']}")


# --- monitoring ----------------------------------------------------------------------------------


def test_pod_monitor_scrapes_runtime_pods(rendered: dict[str, dict[str, Any]]) -> None:
    from bowline_operator import render

    monitor = one(rendered["monitoring"]["docs"], "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    runtime_pod_labels = render.common_labels(render.Owner(name="tiny", namespace="team-a", uid="u"))
    assert monitor["spec"]["selector"]["matchLabels"].items() <= runtime_pod_labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == render.PORT_NAME
    assert endpoint["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    scoped = one(rendered["monitoring-namespaced"]["docs"], "PodMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}


def test_grafana_dashboard_charts_the_runtime_metrics(rendered: dict[str, dict[str, Any]]) -> None:
    config_map = one(rendered["monitoring"]["docs"], "ConfigMap")
    assert config_map["metadata"]["namespace"] == "grafana"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    [dashboard_json] = config_map["data"].values()
    dashboard = json.loads(dashboard_json)
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    for metric in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds",
                   "vllm:time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
                   "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:kv_cache_usage_perc"):
        assert metric in exprs, metric
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Time to first token (TTFT)", "Time per output token (TPOT)", "Tokens per second",
            "KV-cache usage"} <= titles


# --- InferenceServices from values -----------------------------------------------------------------


def test_inference_services_from_values(rendered: dict[str, dict[str, Any]]) -> None:
    services = {s["metadata"]["name"]: s for s in objects(rendered["isvcs"]["docs"], "InferenceService")}
    assert sorted(services) == ["tiny", "tiny-b"]
    assert services["tiny"]["spec"] == _EXAMPLE["spec"]
    assert services["tiny"]["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert services["tiny-b"]["metadata"]["namespace"] == "team-b"
    assert services["tiny-b"]["metadata"]["labels"]["example.com/app"] == "chat"
    assert "tiny, tiny-b" in rendered["isvcs"]["notes"]


# --- refusing bad values, and telling the user what to do next -----------------------------------


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_values_are_refused_with_a_readable_message(rendered: dict[str, dict[str, Any]], case: str) -> None:
    result = rendered[case]
    assert "manifest" not in result
    for fragment in BAD_CASES[case][1]:
        assert fragment in result["error"]


def test_notes_tell_how_to_apply_and_call_an_inference_service(rendered: dict[str, dict[str, Any]]) -> None:
    notes = rendered["defaults"]["notes"]
    assert f"installed in namespace {RELEASE_NAMESPACE}" in notes
    assert "kubectl apply -f -" in notes and "kind: InferenceService" in notes
    assert "{.status.url}" in notes and "/chat/completions" in notes
    # The InferenceService in the NOTES is one the CRD accepts.
    import jsonschema

    manifest = notes.split("cat <<'YAML' | kubectl apply -f -\n", 1)[1].split("  YAML\n", 1)[0]
    isvc = yaml.safe_load("\n".join(line[2:] for line in manifest.splitlines()))
    jsonschema.Draft4Validator(crd_schemas()[("serving.bowline.dev/v1alpha1", "InferenceService")]).validate(isvc)
    assert "team-a, team-b" in rendered["namespaced"]["notes"]


def test_grafana_dashboard_queries_only_series_the_runtime_exports(rendered: dict[str, dict[str, Any]]) -> None:
    import re

    from bowline_runtime.api.metrics import ServerMetrics

    exposed = set()
    for line in ServerMetrics("tiny", lambda: None).render().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total")
            series = {"counter": {f"{base}_total"}, "histogram": {f"{name}_bucket", f"{name}_count", f"{name}_sum"}}
            exposed |= series.get(kind, {name})
    [dashboard_json] = one(rendered["monitoring"]["docs"], "ConfigMap")["data"].values()
    queried = set(re.findall(r"vllm:[a-z0-9_]+", dashboard_json))
    assert len(queried) >= 8
    assert queried <= exposed, queried - exposed
