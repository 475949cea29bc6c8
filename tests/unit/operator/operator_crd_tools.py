"""Helpers that treat the CRD file as the API server would: schema, defaults and CEL rules."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import cel
import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
CRD_PATH = REPO_ROOT / "crds" / "serving.bowline.dev_inferenceservices.yaml"
EXAMPLES = ("cpu-tiny", "nvidia-gpu", "ascend-npu", "autoscaling", "model-cache", "inference-gateway", "llava-gpu")


def load_crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def schema() -> dict[str, Any]:
    return load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "examples" / f"{name}.yaml").read_text())


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Structural defaulting, as the API server does before validation."""
    if isinstance(value, dict) and node.get("type") == "object":
        value = dict(value)
        for key, sub in node.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    return value


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """openAPIV3Schema violations (OpenAPI v3.0 is JSON Schema draft 4 for the parts CRDs use)."""
    validator = jsonschema.Draft4Validator(schema())
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]


def _rules(node: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str, str]]:
    found = [(path, r["rule"], r["message"]) for r in node.get("x-kubernetes-validations", [])]
    for key, sub in node.get("properties", {}).items():
        found += _rules(sub, (*path, key))
    return found


def cel_failures(obj: dict[str, Any]) -> list[str]:
    """Messages of the CRD's x-kubernetes-validations rules that the (defaulted) object breaks."""
    root = schema()
    obj = apply_defaults(root, obj)
    failures = []
    for path, rule, message in _rules(root):
        if "oldSelf" in rule:
            continue  # transition rules run on updates only (transition_failures)
        value: Any = obj
        for key in path:
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            if cel.evaluate(rule, {"self": value}) is not True:
                failures.append(message)
    return failures


def transition_failures(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Messages of the transition rules (those using oldSelf) that updating `old` to `new` breaks;
    like the API server, a rule runs only where both the old and the new object have the field."""
    root = schema()
    old, new = apply_defaults(root, old), apply_defaults(root, new)
    failures = []
    for path, rule, message in _rules(root):
        if "oldSelf" not in rule:
            continue
        values = []
        for obj in (new, old):
            value: Any = obj
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            values.append(value)
        if values[0] is not None and values[1] is not None:
            if cel.evaluate(rule, {"self": values[0], "oldSelf": values[1]}) is not True:
                failures.append(message)
    return failures


def runtime_args(obj: dict[str, Any]) -> list[str]:
    """The runtime container's args the operator renders for `obj` (schema defaults applied, spec checked)."""
    from bowline_operator.render import Owner, render_children
    from bowline_operator.validation import validate_spec

    checked = validate_spec(apply_defaults(schema(), obj)["spec"])
    assert checked.ok, checked.problems
    _, deployment = render_children(Owner(name="svc", namespace="ml", uid="1234-abcd"), checked.spec)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container["args"]
