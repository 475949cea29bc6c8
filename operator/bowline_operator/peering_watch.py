"""Says why the operator waits: a missing kopf peering object pauses every watch, and kopf says so only
at DEBUG level ("blockers: bowline@None").

Without `--standalone`, kopf joins the peering object named by `--peering` (a ClusterKopfPeering, or a
KopfPeering in each watched namespace) and handles nothing until it exists. The Helm chart creates it;
`python -m bowline_operator` against any other cluster does not. This module checks for the object at
start-up and every minute, logs a WARNING that names what is missing and how to fix it while it is
missing, and reports the same in the health endpoint (`/healthz`, the `peering` key).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from . import kube

PEERING_GROUP_VERSION = "kopf.dev/v1"
CHECK_INTERVAL_ENV = "BOWLINE_OPERATOR_PEERING_CHECK_SECONDS"
DEFAULT_CHECK_SECONDS = 60.0

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PeeringConfig:
    """What `__main__` asked kopf for: peering name (None when standalone) and watched namespaces."""

    name: str | None = None
    namespaces: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PeeringTarget:
    """One peering object the operator needs."""

    kind: str
    plural: str
    name: str
    namespace: str | None = None

    def describe(self) -> str:
        return f"{self.kind} {self.name!r}" + (f" in namespace {self.namespace!r}" if self.namespace else "")

    def path(self) -> str:
        base = f"/apis/{PEERING_GROUP_VERSION}"
        if self.namespace:
            return f"{base}/namespaces/{self.namespace}/{self.plural}/{self.name}"
        return f"{base}/{self.plural}/{self.name}"

    def manifest(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name}
        if self.namespace:
            meta["namespace"] = self.namespace
        return {"apiVersion": PEERING_GROUP_VERSION, "kind": self.kind, "metadata": meta}


@dataclass
class PeeringState:
    """The latest check, as the health endpoint reports it."""

    ok: bool = True
    message: str = "not checked yet"
    missing: list[str] = field(default_factory=list)


_config = PeeringConfig()
_state = PeeringState()
_task: asyncio.Task[None] | None = None


def configure(name: str | None, namespaces: list[str] | tuple[str, ...]) -> None:
    global _config
    _config = PeeringConfig(name=name, namespaces=tuple(namespaces))


def targets(config: PeeringConfig) -> list[PeeringTarget]:
    """The peering objects kopf joins: one cluster-wide, or one per watched namespace (globs are
    resolved by kopf at run time, so only plain names can be checked here)."""
    if config.name is None:
        return []
    if not config.namespaces:
        return [PeeringTarget("ClusterKopfPeering", "clusterkopfpeerings", config.name)]
    return [PeeringTarget("KopfPeering", "kopfpeerings", config.name, ns)
            for ns in config.namespaces if not any(c in ns for c in "*?[!")]


def missing_message(missing: list[PeeringTarget], crd_installed: bool) -> str:
    """The WARNING text: what is missing, what the operator is doing meanwhile, and the three ways out."""
    what = ", ".join(t.describe() for t in missing)
    plural = missing[0].plural if missing else "clusterkopfpeerings"
    steps = [] if crd_installed else [
        f"install the peering CRDs (kubectl apply -f crds/kopf.dev_peerings.yaml; {plural}.kopf.dev is not served)"]
    steps += [f"kubectl apply -f - <<< '{json.dumps(t.manifest())}'" for t in missing]
    return (f"Paused, reconciling nothing: the kopf peering object {what} does not exist, and kopf waits for it "
            f"before handling any InferenceService. The Helm chart creates it (leaderElection.enabled=true); "
            f"otherwise create it: {'; '.join(steps)}. Or run a single replica without peering: --standalone.")


def _exists(target: PeeringTarget) -> bool:
    try:
        kube.with_retries(lambda: kube.request("GET", target.path()))
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def check(config: PeeringConfig) -> PeeringState:
    """One look at the cluster (blocking I/O): which peering objects are missing."""
    wanted = targets(config)
    if not wanted:
        return PeeringState(True, "standalone: no peering" if config.name is None else "namespace globs: not checked")
    missing = [t for t in wanted if not _exists(t)]
    if not missing:
        return PeeringState(True, "peering object present: " + ", ".join(t.describe() for t in wanted))
    crd_installed = wanted[0].plural in kube.served_resources(PEERING_GROUP_VERSION)
    return PeeringState(False, missing_message(missing, crd_installed), [t.describe() for t in missing])


def interval() -> float:
    try:
        return max(0.1, float(os.environ.get(CHECK_INTERVAL_ENV, DEFAULT_CHECK_SECONDS)))
    except ValueError:
        return DEFAULT_CHECK_SECONDS


async def watch(config: PeeringConfig) -> None:
    """Check now and every interval(); WARNING on each check that finds the object missing."""
    global _state
    while True:
        try:
            state = await asyncio.to_thread(check, config)
        except Exception as error:  # an unreachable API server is kopf's to report; keep the last state
            log.debug("Could not check the peering object: %s", error)
        else:
            if not state.ok:
                log.warning("%s", state.message)
            elif not _state.ok:
                log.info("Peering object found (%s); kopf resumes handling InferenceServices.", state.message)
            _state = state
        await asyncio.sleep(interval())


@kopf.on.startup()
async def start_peering_watch(**_: Any) -> None:
    global _task, _state
    if _config.name is None:
        _state = PeeringState(True, "standalone: no peering")
        return
    _task = asyncio.get_running_loop().create_task(watch(_config), name="bowline peering watch")


@kopf.on.cleanup()
async def stop_peering_watch(**_: Any) -> None:
    if _task is not None:
        _task.cancel()


@kopf.on.probe(id="peering")
def peering_probe(**_: Any) -> dict[str, Any]:
    """In /healthz: ok=false with the reason while the peering object is missing (the endpoint still
    answers 200: a restart would not create the object, and followers of a healthy leader wait too)."""
    return {"ok": _state.ok, "message": _state.message, "missing": list(_state.missing)}
