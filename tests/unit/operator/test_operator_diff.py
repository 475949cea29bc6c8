"""Level-triggered apply: the patch is exactly the difference, and empty when nothing changed."""

from __future__ import annotations

import copy

from bowline_operator.diff import DEPLOYMENT_PRUNE, LAST_APPLIED, last_applied, merge_patch, with_last_applied
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


def _runtime(settings: dict) -> dict:
    """The example Deployment with `settings` added to its runtime section."""
    spec = apply_defaults(schema(), example("nvidia-gpu"))["spec"]
    spec["runtime"] = {**spec.get("runtime", {}), **settings}
    return render_deployment(OWNER, validate_spec(spec).spec)


def _applied(desired: dict) -> dict:
    """The live object after the operator applied `desired` (annotation included) and the server defaulted it."""
    return _with_server_defaults(with_last_applied(desired))


def _pod(patch: dict) -> dict:
    return patch["spec"]["template"]["spec"]


def test_reapplying_with_the_record_is_a_no_op() -> None:
    desired = _runtime({"podLabels": {"team": "ml"}})
    live = _applied(desired)
    assert merge_patch(with_last_applied(desired), live, DEPLOYMENT_PRUNE, last_applied(live)) == {}


def test_removed_pod_label_annotation_and_node_selector_key_are_deleted() -> None:
    before = _runtime({"podLabels": {"team": "ml", "tier": "gold"},
                                  "podAnnotations": {"example.com/owner": "ml"},
                                  "nodeSelector": {"pool": "a100", "zone": "z1"}})
    live = _applied(before)
    # Others' keys on the same maps: never the operator's, so never deleted.
    live["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] = "2024-01-01T00:00:00Z"
    live["spec"]["template"]["metadata"]["labels"]["added-by-someone"] = "x"
    after = _runtime({"podLabels": {"team": "ml"}, "nodeSelector": {"pool": "a100"}})
    patch = merge_patch(with_last_applied(after), live, DEPLOYMENT_PRUNE, last_applied(live))
    template = patch["spec"]["template"]
    assert template["metadata"]["labels"] == {"tier": None}
    assert template["metadata"]["annotations"] == {"example.com/owner": None}
    assert template["spec"]["nodeSelector"] == {"zone": None}
    assert list(patch["metadata"]["annotations"]) == [LAST_APPLIED]  # the record moves with the change


def test_removed_service_account_and_scheduler_are_deleted_with_the_deprecated_twin() -> None:
    before = _runtime({"serviceAccountName": "runner", "schedulerName": "volcano"})
    live = _applied(before)
    live["spec"]["template"]["spec"]["serviceAccount"] = "runner"  # the API server's deprecated copy
    patch = merge_patch(with_last_applied(_runtime({})), live, DEPLOYMENT_PRUNE, last_applied(live))
    assert _pod(patch) == {"serviceAccountName": None, "serviceAccount": None, "schedulerName": None}


def test_server_defaulted_scheduler_is_left_alone_after_removal() -> None:
    desired = _runtime({})
    live = _applied(desired)
    live["spec"]["template"]["spec"]["schedulerName"] = "default-scheduler"  # defaulted after the null
    assert merge_patch(with_last_applied(desired), live, DEPLOYMENT_PRUNE, last_applied(live)) == {}


def test_without_a_record_only_prunable_fields_are_deleted() -> None:
    """Children made before the annotation existed: unknown keys may be anyone's, so they stay."""
    live = _with_server_defaults(_runtime({"podLabels": {"tier": "gold"}, "serviceAccountName": "runner"}))
    patch = merge_patch(with_last_applied(_runtime({})), live, DEPLOYMENT_PRUNE, last_applied(live))
    assert _pod(patch) == {"serviceAccountName": None}
    assert "labels" not in patch["spec"]["template"].get("metadata", {})


def test_a_garbled_record_is_ignored() -> None:
    live = _with_server_defaults(_runtime({}))
    live["metadata"]["annotations"] = {LAST_APPLIED: "{not json"}
    assert last_applied(live) is None
