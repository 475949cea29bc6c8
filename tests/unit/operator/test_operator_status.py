"""Status from the child Deployment: phases, conditions and their transition times."""

from __future__ import annotations

from bowline_operator.render import Owner
from bowline_operator.status import compute_status, invalid_status, status_changed
from bowline_operator.validation import validate_spec
from operator_crd_tools import apply_defaults, example, schema

OWNER = Owner(name="tiny", namespace="ml", uid="u")
SPEC = validate_spec(apply_defaults(schema(), example("cpu-tiny"))["spec"]).spec


def _dep(generation: int = 1, **status: int) -> dict:
    return {"metadata": {"generation": generation}, "status": {"observedGeneration": generation, **status}}


def _cond(status: dict, ctype: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == ctype)


def test_phases_follow_the_deployment() -> None:
    assert compute_status(OWNER, SPEC, 1, None, "t0")["phase"] == "Pending"
    assert compute_status(OWNER, SPEC, 1, _dep(), "t0")["phase"] == "Pending"
    assert compute_status(OWNER, SPEC, 1, _dep(replicas=1, readyReplicas=0), "t0")["phase"] == "Loading"
    ready = compute_status(OWNER, SPEC, 1, _dep(replicas=1, readyReplicas=1, updatedReplicas=1), "t0")
    assert ready["phase"] == "Ready" and ready["ready"] == "1/1" and ready["readyReplicas"] == 1
    assert _cond(ready, "Ready")["status"] == "True" and _cond(ready, "Progressing")["status"] == "False"
    assert ready["url"] == "http://tiny.ml.svc.cluster.local:8000/v1"


def test_stale_deployment_status_is_not_ready() -> None:
    dep = _dep(generation=2, replicas=1, readyReplicas=1, updatedReplicas=1)
    dep["status"]["observedGeneration"] = 1  # the controller has not seen the new template yet
    assert compute_status(OWNER, SPEC, 2, dep, "t0")["phase"] != "Ready"


def test_rollout_failure_is_failed() -> None:
    dep = _dep(replicas=1)
    dep["status"]["conditions"] = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                    "message": "deadline exceeded"}]
    status = compute_status(OWNER, SPEC, 1, dep, "t0")
    assert status["phase"] == "Failed" and _cond(status, "Ready")["message"] == "deadline exceeded"


def test_transition_time_kept_while_status_unchanged() -> None:
    first = compute_status(OWNER, SPEC, 1, _dep(replicas=1), "t0")
    again = compute_status(OWNER, SPEC, 1, _dep(replicas=1), "t1", first["conditions"])
    assert not status_changed(first, again)
    ready = compute_status(OWNER, SPEC, 1, _dep(replicas=1, readyReplicas=1, updatedReplicas=1), "t2", again["conditions"])
    assert _cond(ready, "Ready")["lastTransitionTime"] == "t2"
    assert _cond(ready, "Valid")["lastTransitionTime"] == "t0"


def test_invalid_status_carries_every_problem() -> None:
    status = invalid_status(["a is wrong", "b is wrong"], 3, "t0")
    valid = _cond(status, "Valid")
    assert status["phase"] == "Failed" and valid["status"] == "False"
    assert valid["message"] == "a is wrong; b is wrong" and valid["observedGeneration"] == 3
