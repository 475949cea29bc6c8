"""spec.engine.kvCacheDtype: the CRD's enum, the runtime's --kv-cache-dtype choices and the rendered flag agree."""

from __future__ import annotations

import copy
from typing import get_args

import pytest
from bowline_operator.validation import validate_spec
from bowline_runtime.config import KVCacheDType
from operator_crd_tools import example, runtime_args, schema, schema_errors


def test_the_crd_offers_what_the_runtime_accepts() -> None:
    engine = schema()["properties"]["spec"]["properties"]["engine"]["properties"]
    assert engine["kvCacheDtype"]["enum"] == list(get_args(KVCacheDType))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "auto"])
def test_kv_cache_dtype_is_rendered_into_the_flag(dtype: str) -> None:
    obj = copy.deepcopy(example("cpu-tiny"))
    obj["spec"].setdefault("engine", {})["kvCacheDtype"] = dtype
    assert schema_errors(obj) == []
    args = runtime_args(obj)
    assert args[args.index("--kv-cache-dtype") + 1] == dtype


def test_unset_kv_cache_dtype_renders_no_flag() -> None:
    obj = copy.deepcopy(example("cpu-tiny"))
    obj["spec"].setdefault("engine", {}).pop("kvCacheDtype", None)
    assert "--kv-cache-dtype" not in runtime_args(obj)


def test_an_fp8_cache_is_refused_by_schema_and_operator() -> None:
    obj = copy.deepcopy(example("cpu-tiny"))
    obj["spec"].setdefault("engine", {})["kvCacheDtype"] = "fp8"
    assert any(e.startswith("spec.engine.kvCacheDtype") for e in schema_errors(obj))
    assert not validate_spec(obj["spec"]).ok
