"""A kmock Kubernetes emulator with the few API-server behaviours the operator relies on, run in a thread.

kmock 0.8 stores objects but stamps no uid/resourceVersion/generation; kopf's JSON-patch `test` on
resourceVersion and the owner references need them, and observedGeneration needs generation to move on
spec changes. The emulator runs its own event loop in a background thread so tests (and the benchmark)
can use the ordinary synchronous `kubernetes` client while the operator runs as a real subprocess.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import kmock
import yaml
from kmock._internal import enums
from kmock._internal.k8s import KubernetesError

REPO_ROOT = Path(__file__).resolve().parents[3]
ISVC = "serving.bowline.dev/v1alpha1/inferenceservices"
PEERING_GROUP = "kopf.dev/v1"


class BowlineEmulator(kmock.KubernetesEmulator):
    """Stamps metadata like an API server: uid, creationTimestamp, resourceVersion, generation."""

    _counter = itertools.count(1)

    async def _handle(self, request: Any) -> Any:
        if request.resource is not None and request.data is not None:
            if request.action == enums.action.CREATE and isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
                meta["resourceVersion"] = str(next(self._counter))
                meta["generation"] = 1
                if request.namespace and "namespace" not in meta:
                    meta["namespace"] = request.namespace
            elif request.action == enums.action.UPDATE and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                live = self.objects[key] if key in self.objects else None
                if live is not None and not live.deleted:
                    self._refuse_failed_tests(request, live)
                    self._stamp_update(request, live)
        if request.resource is not None and request.action == enums.action.DELETE and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            live = self.objects[key] if key in self.objects else None
            if live is not None and not live.deleted and live.get("metadata", {}).get("finalizers"):
                # Marking for deletion is a write: a new resourceVersion, as on a real API server.
                live.patch({"metadata": {"resourceVersion": str(next(self._counter))}})
        return await super()._handle(request)

    @staticmethod
    def _refuse_failed_tests(request: Any, live: Any) -> None:
        """A JSON patch whose `test` on resourceVersion fails is 422 Unprocessable, as on a real API
        server (kmock answers 500, which kopf retries with the same stale test instead of re-reading)."""
        if not isinstance(request.data, list):
            return
        current = live.get("metadata", {}).get("resourceVersion")
        for op in request.data:
            if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion" and op.get("value") != current:
                raise KubernetesError(status=422, reason="Invalid",
                                      message=f"the test operation failed: resourceVersion is {current}, not {op.get('value')}")

    def _stamp_update(self, request: Any, live: Any) -> None:
        rv = str(next(self._counter))
        generation = live.get("metadata", {}).get("generation", 1)
        is_status = getattr(request, "subresource", None) == "status"
        if isinstance(request.data, dict):
            spec_changes = "spec" in request.data and not is_status and request.data["spec"] != live.get("spec")
            meta = request.data.setdefault("metadata", {})
            meta["resourceVersion"] = rv
            if spec_changes:
                meta["generation"] = generation + 1
        elif isinstance(request.data, list):  # JSON patch: stamp after the client's own `test` ops
            spec_changes = any(str(op.get("path", "")).startswith("/spec") for op in request.data) and not is_status
            request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
            if spec_changes:
                request.data.append({"op": "add", "path": "/metadata/generation", "value": generation + 1})


class ForgetfulEmulator(BowlineEmulator):
    """Keeps no request history: kmock matches each request against all past ones (quadratic), which
    at benchmark scale measures kmock instead of the operator. Request assertions are unavailable."""

    async def _handle(self, request: Any) -> Any:
        try:
            return await super()._handle(request)
        finally:
            self._requests.clear()


class EmulatorThread:
    """Owns the emulator's event loop and HTTP server on a background thread."""

    def __init__(self, emulator_cls: type[BowlineEmulator] = BowlineEmulator) -> None:
        self.emulator_cls = emulator_cls
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stopping: asyncio.Event | None = None
        self.kmock: BowlineEmulator | None = None
        self.url = ""
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self.stopping = asyncio.Event()
        async with self.emulator_cls() as emulator, kmock.Server(emulator) as server:
            emulator.resources.load_bundled()
            emulator.resources[ISVC] = kmock.ResourceInfo(
                kind="InferenceService", namespaced=True, subresources={"status", "scale"},
                shortnames={"infsvc"}, categories={"bowline"},
                verbs={"get", "list", "watch", "create", "patch", "update", "delete"})
            # kopf's peering resources (crds/kopf.dev_peerings.yaml): no status subresource, as there.
            for plural, kind, namespaced in (("clusterkopfpeerings", "ClusterKopfPeering", False),
                                             ("kopfpeerings", "KopfPeering", True)):
                emulator.resources[f"{PEERING_GROUP}/{plural}"] = kmock.ResourceInfo(
                    kind=kind, namespaced=namespaced, verbs={"get", "list", "watch", "create", "patch", "update", "delete"})
            self.kmock, self.url = emulator, str(server.url).rstrip("/")
            self.ready.set()
            await self.stopping.wait()

    def start(self) -> EmulatorThread:
        self.thread.start()
        if not self.ready.wait(15):
            raise RuntimeError("kmock emulator did not start")
        return self

    def stop(self) -> None:
        if self.stopping is not None:
            self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(10)

    def call(self, fn: Any) -> Any:
        """Run `fn()` on the emulator's loop (kmock's reaction DSL is not thread-safe)."""
        async def wrapper() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(10)

    def watch_requests(self, resource_fragment: str) -> int:
        """How many watch requests for a resource the emulator has received so far."""
        assert self.kmock is not None
        return sum(1 for r in list(self.kmock)
                   if "watch=" in str(r.url) and resource_fragment in str(r.url.path))

    def write_kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {"token": "test"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}],
        }
        path.write_text(yaml.safe_dump(config))
        return path


def start_operator(kubeconfig: Path, log_path: Path, *extra: str, standalone: bool = True) -> subprocess.Popen[bytes]:
    """`python -m bowline_operator` as a real process against the emulator, cluster-wide; no peering
    unless standalone=False (then pass --peering=NAME in `extra`, or it joins "bowline")."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.Popen(
        [sys.executable, "-m", "bowline_operator", *(["--standalone"] if standalone else []), "--liveness", "", *extra],
        env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT)


def stop_operator(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll until `predicate()` returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # the object may not exist yet
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))
