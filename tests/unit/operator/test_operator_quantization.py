"""spec.engine.quantization: the CRD's enum, the operator's check and the rendered --quantization flag agree."""

from __future__ import annotations

import copy

import pytest
from bowline_operator.validation import validate_spec
from operator_crd_tools import example, runtime_args, schema_errors


@pytest.mark.parametrize("method", ["awq", "w8a8", "smoothquant", "int8", "auto"])
def test_quantization_is_rendered_into_the_flag(method: str) -> None:
    obj = copy.deepcopy(example("nvidia-gpu"))
    obj["spec"]["engine"]["quantization"] = method
    assert schema_errors(obj) == []
    args = runtime_args(obj)
    assert args[args.index("--quantization") + 1] == method


def test_unset_quantization_renders_no_flag() -> None:
    obj = copy.deepcopy(example("cpu-tiny"))
    obj["spec"].setdefault("engine", {}).pop("quantization", None)
    assert "--quantization" not in runtime_args(obj)


def test_an_unknown_method_is_refused_by_schema_and_operator() -> None:
    obj = copy.deepcopy(example("nvidia-gpu"))
    obj["spec"]["engine"]["quantization"] = "gptq"
    assert any(e.startswith("spec.engine.quantization") for e in schema_errors(obj))
    assert not validate_spec(obj["spec"]).ok
