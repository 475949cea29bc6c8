"""The CRD, the examples and every rendered object against the official schemas and the CRD's own rules."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
from bowline_operator.render import Owner, render_children
from bowline_operator.validation import validate_spec
from operator_crd_tools import EXAMPLES, apply_defaults, cel_failures, example, load_crd, schema, schema_errors

K8S_VERSION = "1.33"


def test_crd_is_a_valid_customresourcedefinition() -> None:
    kubernetes_validate.validate(load_crd(), K8S_VERSION, strict=True)


def test_crd_names_columns_and_subresources() -> None:
    version = load_crd()["spec"]["versions"][0]
    names = load_crd()["spec"]["names"]
    assert "isvc" not in names["shortNames"] and "infsvc" in names["shortNames"]
    assert names["categories"] == ["bowline"]
    assert [c["name"].upper() for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0] == [
        "MODEL", "DEVICE", "TP", "MAX-LEN", "READY", "URL", "AGE"]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert "status" in version["subresources"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_pass_schema_and_cel(name: str) -> None:
    obj = example(name)
    assert schema_errors(obj) == []
    assert cel_failures(obj) == []
    assert validate_spec(obj["spec"]).ok


@pytest.mark.parametrize("name", EXAMPLES)
def test_rendered_children_are_valid_kubernetes_objects(name: str) -> None:
    spec = validate_spec(apply_defaults(schema(), example(name))["spec"]).spec
    for child in render_children(Owner(name="x", namespace="ns", uid="0000-1111"), spec):
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)


def test_hf_source_renders_valid_download_init_container() -> None:
    obj = example("nvidia-gpu")
    obj["spec"]["model"] = {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct", "hfTokenSecretName": "hf", "cacheSizeLimit": "20Gi"}
    spec = validate_spec(obj["spec"]).spec
    for child in render_children(Owner(name="x", namespace="ns", uid="u"), spec):
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)


# (mutation of the nvidia-gpu example, the CRD rule message the API server would answer with)
CROSS_FIELD_CASES = [
    (lambda s: s.update(tensorParallelSize=4), "tensorParallelSize must not exceed accelerator.count"),
    (lambda s: (s["accelerator"].update(count=6), s.update(tensorParallelSize=4)), "tensorParallelSize must divide accelerator.count"),
    (lambda s: s["accelerator"].pop("count"), "accelerator.count is required when accelerator.type is gpu or npu"),
    (lambda s: s["accelerator"].update(type="cpu", resourceName="nvidia.com/gpu"), "accelerator.resourceName applies to gpu and npu only"),
    (lambda s: s["accelerator"].update(vendor="ascend"), "accelerator.vendor must be nvidia or amd for gpu, ascend for npu, and unset for cpu"),
    (lambda s: s["engine"].update(maxNumSeqs=512, maxNumBatchedTokens=256), "engine.maxNumBatchedTokens must be at least engine.maxNumSeqs"),
    (lambda s: s["engine"].update(extraArgs=["--max-model-len=8"]), "engine.extraArgs must not set flags the operator manages; use the matching spec field"),
]


@pytest.mark.parametrize(("mutate", "message"), CROSS_FIELD_CASES)
def test_cel_rules_and_operator_agree(mutate, message: str) -> None:
    obj = copy.deepcopy(example("nvidia-gpu"))
    mutate(obj["spec"])
    assert message in cel_failures(obj)
    checked = validate_spec(apply_defaults(schema(), obj)["spec"])
    assert not checked.ok and message in checked.problems


def test_cpu_needs_no_count() -> None:
    obj = example("cpu-tiny")
    assert "count" not in obj["spec"]["accelerator"]
    assert cel_failures(obj) == [] and validate_spec(obj["spec"]).ok


@pytest.mark.parametrize("source", ["s3://bucket/model", "pvc://", "hf://only-org", "relative/path"])
def test_schema_and_operator_refuse_unknown_sources(source: str) -> None:
    obj = example("cpu-tiny")
    obj["spec"]["model"]["source"] = source
    assert any(e.startswith("spec.model.source") for e in schema_errors(obj))
    assert not validate_spec(obj["spec"]).ok
