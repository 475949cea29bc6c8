"""Operator benchmark (not a test): 200 InferenceServices against the emulated API.

Starts kmock's Kubernetes emulation and the real `python -m bowline_operator` process, creates N
objects at once, and reports the time until every one has its Deployment, its Service and a status
with a URL, plus the operator process's peak resident memory (VmHWM).

    make bench-operator            # or: python bench/operator_bench.py --count 200
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import kubernetes
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "integration" / "operator"))
from operator_emulator import EmulatorThread, ForgetfulEmulator, start_operator, stop_operator, wait_for  # noqa: E402

NS = "bench"


def _counts(emulator: EmulatorThread) -> tuple[int, int, int]:
    """(deployments, services, InferenceServices with status.url), read on the emulator's own loop."""
    def count() -> tuple[int, int, int]:
        deps = svcs = ready = 0
        for (resource, namespace, _), obj in emulator.kmock.objects.items():
            if namespace != NS or obj.deleted:
                continue
            if resource.plural == "deployments":
                deps += 1
            elif resource.plural == "services":
                svcs += 1
            elif resource.plural == "inferenceservices" and obj.get("status", {}).get("url"):
                ready += 1
        return deps, svcs, ready
    return emulator.call(count)


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    emulator = EmulatorThread(ForgetfulEmulator).start()
    workdir = Path(tempfile.mkdtemp(prefix="bowline-operator-bench-"))
    kubeconfig = emulator.write_kubeconfig(workdir / "kubeconfig")
    custom = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(str(kubeconfig)))
    template = yaml.safe_load((REPO_ROOT / "examples" / "cpu-tiny.yaml").read_text())
    proc = start_operator(kubeconfig, workdir / "operator.log")
    try:
        # The forgetful emulator keeps no request log to look for the watch requests in: wait for startup.
        wait_for(lambda: "Initial authentication has finished" in (workdir / "operator.log").read_text(), 30,
                 what="operator start")
        time.sleep(1.5)
        start = time.monotonic()
        for i in range(args.count):
            obj = json.loads(json.dumps(template))
            obj["metadata"] = {"name": f"tiny-{i:04d}", "namespace": NS}
            custom.create_namespaced_custom_object("serving.bowline.dev", "v1alpha1", NS, "inferenceservices", obj)
        created = time.monotonic() - start
        wait_for(lambda: _counts(emulator) == (args.count,) * 3, args.timeout, interval=0.1, what="all children and status")
        elapsed = time.monotonic() - start
        time.sleep(2)  # let trailing Deployment events settle before reading the peak
        result = {"objects": args.count, "create_calls_s": round(created, 2),
                  "all_children_and_status_s": round(elapsed, 2),
                  "per_object_ms": round(1000 * elapsed / args.count, 1),
                  "operator_peak_rss_mib": round(_peak_rss_mib(proc.pid), 1)}
        print(json.dumps(result, indent=2))
    finally:
        stop_operator(proc)
        emulator.stop()


if __name__ == "__main__":
    main()
