"""Level-triggered apply: the patch is exactly the difference, and empty when nothing changed."""

from __future__ import annotations

import copy

from bowline_operator.diff import DEPLOYMENT_PRUNE, merge_patch
from bowline_operator.render import Owner, render_deployment
from bowline_operator.validation import validate_spec
from operator_crd_tools import apply_defaults, example, schema

OWNER = Owner(name="svc", namespace="ml", uid="u")


def _deployment(**overrides) -> dict:
    spec = apply_defaults(schema(), example("nvidia-gpu"))["spec"]
    spec.update(overrides)
    return render_deployment(OWNER, validate_spec(spec).spec)


def _with_server_defaults(obj: dict) -> dict:
    live = copy.deepcopy(obj)
    live["metadata"].update(uid="x", resourceVersion="7", generation=3)
    live["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
    live["spec"]["template"]["spec"]["dnsPolicy"] = "ClusterFirst"
    live["status"] = {"replicas": 1}
    return live


def test_unchanged_object_needs_no_patch_despite_server_defaults() -> None:
    desired = _deployment()
    assert merge_patch(desired, _with_server_defaults(desired), DEPLOYMENT_PRUNE) == {}


def test_changed_arg_patches_only_the_containers() -> None:
    live = _with_server_defaults(_deployment())
    patch = merge_patch(_deployment(maxModelLen=4096), live, DEPLOYMENT_PRUNE)
    assert list(patch) == ["spec"] and list(patch["spec"]) == ["template"]
    assert list(patch["spec"]["template"]["spec"]) == ["containers"]
    assert "4096" in patch["spec"]["template"]["spec"]["containers"][0]["args"]


def test_dropped_optional_field_is_deleted() -> None:
    live = _with_server_defaults(_deployment(model={"source": "hf://org/name"}))
    patch = merge_patch(_deployment(), live, DEPLOYMENT_PRUNE)
    assert patch["spec"]["template"]["spec"]["initContainers"] is None


def test_replicas_change_is_a_one_field_patch() -> None:
    live = _with_server_defaults(_deployment())
    assert merge_patch(_deployment(replicas=3), live, DEPLOYMENT_PRUNE) == {"spec": {"replicas": 3}}
