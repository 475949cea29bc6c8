"""Pod placement defaults: runtime replicas spread across nodes, so one node failure takes one copy.

`ScheduleAnyway` keeps this a preference: a cluster with one accelerator node still schedules every
replica. `matchLabelKeys: [pod-template-hash]` counts only pods of the same rollout, so the old
ReplicaSet's pods do not skew where the new ones go.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .spec import InferenceServiceSpec

NODE_TOPOLOGY_KEY = "kubernetes.io/hostname"


def topology_spread_constraints(spec: InferenceServiceSpec, selector: Mapping[str, str]) -> list[dict[str, Any]]:
    """The user's `runtime.topologySpreadConstraints` when set ([] turns spreading off), else one across nodes."""
    if spec.runtime.topology_spread_constraints is not None:
        return [dict(c) for c in spec.runtime.topology_spread_constraints]
    return [{
        "maxSkew": 1,
        "topologyKey": NODE_TOPOLOGY_KEY,
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": dict(selector)},
        "matchLabelKeys": ["pod-template-hash"],
    }]
