"""Pure diffing: the smallest JSON merge patch that makes a live object match its rendered form.

The API server fills in defaults (e.g. a container's terminationMessagePath), so "equal" means the live
object *covers* the rendered one: every rendered field is present with the same value. Comparing this
way keeps a second reconcile from patching anything, on a real cluster as on an emulator.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

Path = tuple[str, ...]

# What the operator applied last, on the child itself: a key it set then but renders no more (a removed
# podLabel, nodeSelector entry, serviceAccountName...) is deleted, while keys that others added (e.g.
# kubectl rollout restart's annotation) were never in it and are left alone. Like kubectl's
# last-applied-configuration, because a merge patch never removes a key by omission.
LAST_APPLIED = "serving.bowline.dev/last-applied"

# Deprecated twins the API server fills in from a field: deleting the field alone would let the server
# copy the twin back (pod specs turn `serviceAccount` into `serviceAccountName` when the latter is empty).
TWINS: Mapping[str, str] = {"serviceAccountName": "serviceAccount"}

# Keys the operator sets only sometimes: when the rendered object drops one (e.g. the hf:// download init
# container after switching to a pvc:// source), the patch must delete it, since a merge patch never
# removes a key by omission. This covers children created before LAST_APPLIED existed. (Not schedulerName:
# the API server defaults it, so deleting it on sight would patch forever.)
DEPLOYMENT_PRUNE: Mapping[Path, frozenset[str]] = {
    ("spec", "template", "spec"): frozenset({"initContainers", "nodeSelector", "tolerations", "affinity",
                                             "runtimeClassName", "serviceAccountName"}),
}


# Keys the operator stops rendering when someone else takes them over: never deleted by omission.
# `spec.replicas` belongs to the scaler once spec.autoscaling is set; deleting it would reset the
# Deployment to 1 replica on the way.
HANDED_OVER: Mapping[Path, frozenset[str]] = {("spec",): frozenset({"replicas"})}


def covers(live: Any, want: Any) -> bool:
    """True when `live` has every field of `want` with equal values (extra server defaults allowed)."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(k in live and covers(live[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(live, list) and len(live) == len(want) and all(covers(h, w) for h, w in zip(live, want, strict=True))
    return live == want


def with_last_applied(desired: dict[str, Any]) -> dict[str, Any]:
    """`desired` plus the LAST_APPLIED annotation recording it (canonical JSON, so re-rendering matches)."""
    record = json.dumps(desired, sort_keys=True, separators=(",", ":"))
    meta = desired["metadata"]
    return {**desired, "metadata": {**meta, "annotations": {**meta.get("annotations", {}), LAST_APPLIED: record}}}


def last_applied(live: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the operator applied to `live` last time, or None (created before the annotation existed)."""
    record = (live.get("metadata", {}).get("annotations") or {}).get(LAST_APPLIED)
    try:
        previous = json.loads(record) if record else None
    except ValueError:
        return None
    return previous if isinstance(previous, dict) else None


def merge_patch(want: dict[str, Any], live: dict[str, Any], prune: Mapping[Path, frozenset[str]] | None = None,
                last: dict[str, Any] | None = None, _path: Path = ()) -> dict[str, Any]:
    """The merge patch turning `live` into something that covers `want`; empty when nothing differs.

    Lists are replaced whole when they differ (merge-patch semantics); dicts are descended into. Keys
    that `last` (the previous apply) had and `want` lacks are deleted, as are `prune` keys at their path.
    """
    patch: dict[str, Any] = {}
    for key, value in want.items():
        current = live.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            previous = last.get(key) if isinstance(last, dict) else None
            sub = merge_patch(value, current, prune, previous if isinstance(previous, dict) else None, (*_path, key))
            if sub:
                patch[key] = sub
        elif not covers(current, value) or key not in live:
            patch[key] = value
    gone = (set((prune or {}).get(_path, ())) | set(last or ())) - HANDED_OVER.get(_path, frozenset())
    for key in sorted(gone - want.keys()):
        if live.get(key) is not None:
            patch[key] = None
            twin = TWINS.get(key)
            if twin and twin not in want and live.get(twin) is not None:
                patch[twin] = None
    return patch
