"""Real Helm (Helm 4's Go library through helm-sdkpy) without a helm binary or a cluster.

Runs under the Python >= 3.12 tool environment `.venv-helm` (`make .venv-helm`):

    .venv-helm/bin/python hack/helm.py lint charts/bowline
    .venv-helm/bin/python hack/helm.py render charts/bowline -f my-values.yaml      # prints the manifests
    .venv-helm/bin/python hack/helm.py batch charts/bowline < cases.json            # JSON in, JSON out (tests)
    .venv-helm/bin/python hack/helm.py install charts/bowline --release bowline --namespace bowline-system

Helm has no client-only render in this library, so `render` and `batch` install into kmock's in-memory
Kubernetes emulator, with Helm's release storage in memory (HELM_DRIVER=memory, which the Go library
reads once at load: this script re-executes itself with it set). `install`/`uninstall` talk to the
cluster of the current kubeconfig, like `helm install --wait=false`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

# Resources the chart may create that kmock's bundled (built-in only) discovery lacks.
EXTRA_RESOURCES = {
    "serving.bowline.dev/v1alpha1/inferenceservices": ("InferenceService", True),
    "monitoring.coreos.com/v1/podmonitors": ("PodMonitor", True),
    "kopf.dev/v1/kopfpeerings": ("KopfPeering", True),
    "kopf.dev/v1/clusterkopfpeerings": ("ClusterKopfPeering", False),
}
# The Kubernetes version the emulator claims; the tests validate against the same version's schemas.
KUBE_VERSION = "1.33"
# A lint message at or above this severity (helm's support.WarningSev) fails, like `helm lint --strict`.
WARNING = 2


def _ensure_memory_driver() -> None:
    if os.environ.get("HELM_DRIVER") != "memory":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "HELM_DRIVER": "memory"})


@asynccontextmanager
async def emulated_cluster() -> AsyncIterator[str]:
    """A kmock Kubernetes emulator on a local port; yields a kubeconfig (YAML text) pointing at it."""
    import kmock

    class Emulator(kmock.KubernetesEmulator):
        async def _serve_version(self, request):  # type: ignore[no-untyped-def]
            # kmock says groupVersion "/v1" for the core group; client-go's REST mapper then loses every
            # core kind ("no matches for kind ConfigMap in version v1").
            payload = await super()._serve_version(request)
            payload["groupVersion"] = payload["groupVersion"].lstrip("/")
            return payload

        async def _serve_server_version(self, request):  # type: ignore[no-untyped-def]
            # kmock says v1.26; the chart needs >= 1.29 (Chart.yaml kubeVersion).
            major, minor = KUBE_VERSION.split(".")
            return {**await super()._serve_server_version(request), "major": major, "minor": minor,
                    "gitVersion": f"v{KUBE_VERSION}.0"}

    async with Emulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources.load_bundled()
        for key, (kind, namespaced) in EXTRA_RESOURCES.items():
            emulator.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=namespaced,
                                                         verbs={"get", "list", "watch", "create", "patch", "delete"})
        yield (
            "apiVersion: v1\nkind: Config\ncurrent-context: emulator\n"
            f"clusters: [{{name: emulator, cluster: {{server: '{server.url}'}}}}]\n"
            "contexts: [{name: emulator, context: {cluster: emulator, user: emulator}}]\n"
            "users: [{name: emulator, user: {token: emulator}}]\n"
        )


def lint(chart: str) -> list[str]:
    """Problems found by `helm lint` (Helm's messages come back empty through the library: paths only)."""
    import helm_sdkpy as helm

    config = helm.Configuration(kubeconfig="apiVersion: v1\nkind: Config\n")
    result = asyncio.run(helm.Lint(config).run(chart))
    return [f"severity {m['Severity']} in {m['Path']}" for m in result.get("Messages") or []
            if m["Severity"] >= WARNING]


async def render_cases(chart: str, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Install each case {release, namespace, values}: its manifest and notes, or Helm's error."""
    import helm_sdkpy as helm

    results = []
    for case in cases:
        # A fresh emulator per case: kmock's "already exists" answer (reason `Object Already Exists`) is not
        # one Helm recognises, so a second install of the same CRDs would fail.
        async with emulated_cluster() as kubeconfig:
            config = helm.Configuration(namespace=case["namespace"], kubeconfig=kubeconfig)
            try:
                release = await helm.Install(config).run(case["release"], chart, values=case.get("values") or None,
                                                         wait=False, timeout=60)
            except helm.HelmError as exc:
                results.append({"error": str(exc)})
            else:
                results.append({"manifest": release.get("manifest", ""),
                                "notes": (release.get("info") or {}).get("notes", "")})
    return results


def _values(files: list[str]) -> dict[str, Any]:
    import yaml

    merged: dict[str, Any] = {}
    for name in files:
        merged.update(yaml.safe_load(Path(name).read_text()) or {})
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("lint").add_argument("chart")
    render = sub.add_parser("render")
    batch = sub.add_parser("batch")
    install = sub.add_parser("install")
    uninstall = sub.add_parser("uninstall")
    for p in (render, batch, install):
        p.add_argument("chart")
    for p in (render, install):
        p.add_argument("-f", "--values", action="append", default=[], help="values YAML file (repeatable)")
    for p in (render, install, uninstall):
        p.add_argument("--release", default="bowline")
        p.add_argument("--namespace", default="bowline-system")
    args = parser.parse_args(argv)

    if args.command in ("lint", "render", "batch"):
        _ensure_memory_driver()
    import helm_sdkpy as helm

    if args.command == "lint":
        problems = lint(args.chart)
        print("\n".join(problems) or f"{args.chart}: lint passed")
        return 1 if problems else 0
    if args.command == "batch":
        json.dump(asyncio.run(render_cases(args.chart, json.load(sys.stdin))), sys.stdout)
        return 0
    if args.command == "render":
        case = {"release": args.release, "namespace": args.namespace, "values": _values(args.values)}
        [result] = asyncio.run(render_cases(args.chart, [case]))
        if "error" in result:
            print(result["error"], file=sys.stderr)
            return 1
        print(result["manifest"])
        print(result["notes"], file=sys.stderr)
        return 0

    config = helm.Configuration(namespace=args.namespace)
    if args.command == "install":
        release = asyncio.run(helm.Install(config).run(args.release, args.chart, values=_values(args.values) or None,
                                                       create_namespace=True, wait=False))
        print((release.get("info") or {}).get("notes", ""))
    else:
        asyncio.run(helm.Uninstall(config).run(args.release, wait=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
