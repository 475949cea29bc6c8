"""Pure diffing: the smallest JSON merge patch that makes a live object match its rendered form.

The API server fills in defaults (e.g. a container's terminationMessagePath), so "equal" means the live
object *covers* the rendered one: every rendered field is present with the same value. Comparing this
way keeps a second reconcile from patching anything, on a real cluster as on an emulator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Path = tuple[str, ...]

# Keys the operator sets only sometimes: when the rendered object drops one (e.g. the hf:// download init
# container after switching to a pvc:// source), the patch must delete it, since a merge patch never
# removes a key by omission.
DEPLOYMENT_PRUNE: Mapping[Path, frozenset[str]] = {
    ("spec", "template", "spec"): frozenset({"initContainers", "nodeSelector", "tolerations", "affinity", "runtimeClassName"}),
}


def covers(live: Any, want: Any) -> bool:
    """True when `live` has every field of `want` with equal values (extra server defaults allowed)."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(k in live and covers(live[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(live, list) and len(live) == len(want) and all(covers(h, w) for h, w in zip(live, want, strict=True))
    return live == want


def merge_patch(want: dict[str, Any], live: dict[str, Any], prune: Mapping[Path, frozenset[str]] | None = None,
                _path: Path = ()) -> dict[str, Any]:
    """The merge patch turning `live` into something that covers `want`; empty when nothing differs.

    Lists are replaced whole when they differ (merge-patch semantics); dicts are descended into.
    """
    patch: dict[str, Any] = {}
    for key, value in want.items():
        current = live.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            sub = merge_patch(value, current, prune, (*_path, key))
            if sub:
                patch[key] = sub
        elif not covers(current, value) or key not in live:
            patch[key] = value
    for key in (prune or {}).get(_path, ()):
        if key not in want and live.get(key) is not None:
            patch[key] = None
    return patch
