"""Inference gateway rendering: the InferencePool and InferenceObjective against the extension's CRD schemas.

The schemas below are the subset of fields Bowline renders, written down from the Gateway API
Inference Extension v1.5.0 CRDs (kubernetes-sigs/gateway-api-inference-extension, config/crd/bases/
inference.networking.k8s.io_inferencepools.yaml, version v1, and
inference.networking.x-k8s.io_inferenceobjectives.yaml, version v1alpha2): types, bounds, patterns,
enums and required fields as the CRDs state them, plus `additionalProperties: false` so a field the
CRDs do not have (which an API server would silently prune) fails here.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from bowline_operator import gateway
from bowline_operator.gateway import EndpointPicker
from bowline_operator.render import Owner, render_children
from bowline_operator.validation import validate_spec
from operator_crd_tools import apply_defaults, cel_failures, example, schema, schema_errors

EXTENSION_VERSION = "v1.5.0"
OWNER = Owner(name="llama", namespace="ml", uid="1234-abcd")
BOTH = frozenset({gateway.POOL_CRD, gateway.OBJECTIVE_CRD})

_DNS_SUBDOMAIN = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_KIND = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_METADATA = {"type": "object", "required": ["name", "namespace"],
             "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}}}

INFERENCE_POOL_V1 = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "inference.networking.k8s.io/v1"},
        "kind": {"const": "InferencePool"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["endpointPickerRef", "selector", "targetPorts"],
            "properties": {
                "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
                "endpointPickerRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "failureMode": {"enum": ["FailOpen", "FailClose"]},
                        "group": {"type": "string", "maxLength": 253, "pattern": _DNS_SUBDOMAIN},
                        "kind": {"type": "string", "minLength": 1, "maxLength": 63, "pattern": _KIND},
                        "name": {"type": "string", "minLength": 1, "maxLength": 253},
                        "port": {"type": "object", "additionalProperties": False, "required": ["number"],
                                 "properties": {"number": _PORT}},
                    },
                    # CEL: port is required when kind is 'Service' or unspecified
                    "if": {"not": {"properties": {"kind": {"not": {"const": "Service"}}}, "required": ["kind"]}},
                    "then": {"required": ["port"]},
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["matchLabels"],
                    "properties": {"matchLabels": {
                        "type": "object", "minProperties": 1, "maxProperties": 64,
                        "additionalProperties": {"type": "string", "maxLength": 63,
                                                 "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}}},
                },
                "targetPorts": {
                    "type": "array", "minItems": 1, "maxItems": 8, "uniqueItems": True,  # CEL: port number must be unique
                    "items": {"type": "object", "additionalProperties": False, "required": ["number"],
                              "properties": {"number": _PORT}},
                },
            },
        },
    },
}

INFERENCE_OBJECTIVE_V1ALPHA2 = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "inference.networking.x-k8s.io/v1alpha2"},
        "kind": {"const": "InferenceObjective"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["poolRef"],
            "properties": {
                "poolRef": {
                    "type": "object", "additionalProperties": False, "required": ["name"],
                    "properties": {"group": {"type": "string", "maxLength": 253, "pattern": _DNS_SUBDOMAIN},
                                   "kind": {"type": "string", "minLength": 1, "maxLength": 63, "pattern": _KIND},
                                   "name": {"type": "string", "minLength": 1, "maxLength": 253}},
                },
                "priority": {"type": "integer"},
            },
        },
    },
}

SCHEMAS = {"InferencePool": INFERENCE_POOL_V1, "InferenceObjective": INFERENCE_OBJECTIVE_V1ALPHA2}


def _spec(**gateway_fields: Any) -> Any:
    obj = apply_defaults(schema(), example("inference-gateway"))
    obj["spec"]["gateway"].update(gateway_fields)
    checked = validate_spec(obj["spec"])
    assert checked.ok, checked.problems
    return checked.spec


def test_example_passes_schema_cel_and_operator() -> None:
    obj = example("inference-gateway")
    assert schema_errors(obj) == [] and cel_failures(obj) == []
    assert validate_spec(obj["spec"]).ok


@pytest.mark.parametrize("fields", [{}, {"poolName": None, "priority": None}, {"priority": -3}])
def test_rendered_objects_match_the_extension_crds(fields: dict[str, Any]) -> None:
    rendered = gateway.render(OWNER, _spec(**fields), EndpointPicker(), BOTH)
    assert [o["kind"] for o in rendered] == ["InferencePool", "InferenceObjective"]
    for obj in rendered:
        jsonschema.Draft7Validator(SCHEMAS[obj["kind"]]).validate(obj)


def test_schemas_catch_what_a_cluster_would_refuse_or_prune() -> None:
    pool = gateway.render_pool(OWNER, _spec(), EndpointPicker())
    validator = jsonschema.Draft7Validator(INFERENCE_POOL_V1)
    for broken in ({**pool["spec"], "targetPortNumber": 8000},  # the v1alpha2 field name
                   {**pool["spec"], "targetPorts": [{"number": 8000}, {"number": 8000}]},
                   {**pool["spec"], "endpointPickerRef": {"name": "epp"}}):  # a Service needs its port
        assert not validator.is_valid({**pool, "spec": broken})


def test_pool_selects_the_runtime_pods_on_the_runtime_port() -> None:
    spec = _spec()
    service, deployment = render_children(OWNER, spec)
    pool, objective = gateway.render(OWNER, spec, EndpointPicker(name="shared-epp", port=9100, failure_mode="FailOpen"), BOTH)
    assert pool["metadata"]["name"] == "llama-pool"
    assert pool["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"] == {"kind": "Service", "name": "shared-epp", "port": {"number": 9100},
                                                 "failureMode": "FailOpen"}
    assert objective["metadata"]["name"] == "llama"
    assert objective["spec"] == {"poolRef": {"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                             "name": "llama-pool"}, "priority": 10}
    for obj in (pool, objective):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["uid"] == "1234-abcd" and ref["controller"] is True


def test_defaults_pool_named_after_the_service_and_epp_after_the_pool() -> None:
    pool, objective = gateway.render(OWNER, _spec(poolName=None, priority=None), EndpointPicker(), BOTH)
    assert pool["metadata"]["name"] == "llama"
    assert pool["spec"]["endpointPickerRef"]["name"] == "llama-epp"
    assert pool["spec"]["endpointPickerRef"]["port"] == {"number": 9002}
    assert "priority" not in objective["spec"]


def test_endpoint_picker_from_the_chart_environment() -> None:
    assert EndpointPicker.from_env({}) == EndpointPicker()
    env = {"BOWLINE_OPERATOR_EPP_NAME": "epp", "BOWLINE_OPERATOR_EPP_PORT": "9100", "BOWLINE_OPERATOR_EPP_FAILURE_MODE": "FailOpen"}
    assert EndpointPicker.from_env(env) == EndpointPicker("epp", 9100, "FailOpen")


def test_what_is_rendered_depends_on_the_installed_crds() -> None:
    spec = _spec()
    picker = EndpointPicker()
    assert gateway.render(OWNER, spec, picker, frozenset()) == []
    assert [o["kind"] for o in gateway.render(OWNER, spec, picker, frozenset({gateway.POOL_CRD}))] == ["InferencePool"]
    assert gateway.render(OWNER, _spec(enabled=False), picker, BOTH) == []
    ok, reason, message = gateway.condition_args(OWNER, spec, picker, frozenset())
    assert (ok, reason) == (False, "InferenceExtensionMissing") and gateway.POOL_CRD in message
    ok, reason, message = gateway.condition_args(OWNER, spec, picker, frozenset({gateway.POOL_CRD}))
    assert ok and gateway.OBJECTIVE_CRD in message
    assert gateway.condition_args(OWNER, _spec(enabled=False), picker, BOTH) is None


def test_stale_objects_are_only_this_services_leftovers() -> None:
    spec = _spec()
    desired = gateway.render(OWNER, spec, EndpointPicker(), BOTH)
    old_pool = {**desired[0], "metadata": {**desired[0]["metadata"], "name": "old-pool"}}
    foreign = {**desired[0], "metadata": {**desired[0]["metadata"], "name": "theirs",
                                          "ownerReferences": [{"uid": "someone-else"}]}}
    unlabeled = {"kind": "InferencePool", "metadata": {"name": "manual"}}
    assert gateway.stale(OWNER, [*desired, old_pool, foreign, unlabeled], desired) == [old_pool]
    assert gateway.stale(OWNER, desired, []) == desired
