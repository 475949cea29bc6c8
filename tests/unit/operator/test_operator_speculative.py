"""spec.speculative: schema, CEL rule and operator agree; rendered into the runtime's flags, the draft
mounted like the main model (an hf:// draft downloaded by its own init container)."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
from bowline_operator.render import Owner, render_children, render_deployment
from bowline_operator.validation import validate_spec
from operator_crd_tools import apply_defaults, cel_failures, example, schema, schema_errors
from test_operator_schemas import K8S_VERSION

MESSAGE = "speculative.model is required for the draft_model method and must be unset for ngram"


def _with(speculative: dict) -> dict:
    obj = copy.deepcopy(example("nvidia-gpu"))
    obj["spec"]["speculative"] = speculative
    return obj


def _container(obj: dict) -> tuple[dict, dict]:
    spec = validate_spec(apply_defaults(schema(), obj)["spec"]).spec
    deployment = render_deployment(Owner(name="x", namespace="ns", uid="u"), spec)
    pod = deployment["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_draft_model_from_a_pvc_is_mounted_and_passed_as_speculative_model():
    obj = _with({"model": {"source": "pvc://drafts/qwen-0.5b"}, "numSpeculativeTokens": 4})
    assert schema_errors(obj) == [] and cel_failures(obj) == []
    pod, container = _container(obj)
    assert _flag(container["args"], "--speculative-model") == "/mnt/draft-model/qwen-0.5b"
    assert _flag(container["args"], "--num-speculative-tokens") == "4"
    assert {"name": "draft-model", "persistentVolumeClaim": {"claimName": "drafts", "readOnly": True}} in pod["volumes"]
    assert {"name": "draft-model", "mountPath": "/mnt/draft-model", "readOnly": True} in container["volumeMounts"]


def test_hf_draft_gets_its_own_download_and_valid_children():
    obj = _with({"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"}, "numSpeculativeTokens": 3, "method": "draft_model"})
    pod, container = _container(obj)
    downloads = [c for c in pod["initContainers"] if c["name"] == "draft-model-download"]
    assert downloads and downloads[0]["command"][-1] == "/mnt/draft-model/Qwen/Qwen2.5-0.5B-Instruct"
    assert _flag(container["args"], "--speculative-model") == "/mnt/draft-model/Qwen/Qwen2.5-0.5B-Instruct"
    spec = validate_spec(apply_defaults(schema(), obj)["spec"]).spec
    for child in render_children(Owner(name="x", namespace="ns", uid="u"), spec):
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)


def test_ngram_renders_prompt_lookup_flags_and_no_volume():
    obj = _with({"method": "ngram", "numSpeculativeTokens": 5, "promptLookupMax": 3, "disableByBatchSize": 16})
    pod, container = _container(obj)
    args = container["args"]
    assert _flag(args, "--speculative-model") == "[ngram]" and _flag(args, "--num-speculative-tokens") == "5"
    assert _flag(args, "--ngram-prompt-lookup-max") == "3" and _flag(args, "--speculative-disable-by-batch-size") == "16"
    assert not any(v["name"].startswith("draft-model") for v in pod["volumes"])


@pytest.mark.parametrize("speculative", [
    {"numSpeculativeTokens": 4},  # draft_model by default, without a model
    {"method": "ngram", "model": {"source": "/models/d"}, "numSpeculativeTokens": 4},
])
def test_cel_rule_and_operator_agree_on_method_and_model(speculative):
    obj = _with(speculative)
    assert MESSAGE in cel_failures(obj)
    checked = validate_spec(apply_defaults(schema(), obj)["spec"])
    assert not checked.ok and MESSAGE in checked.problems


def test_schema_bounds_num_speculative_tokens():
    obj = _with({"method": "ngram", "numSpeculativeTokens": 0})
    assert any(e.startswith("spec.speculative.numSpeculativeTokens") for e in schema_errors(obj))
    assert not validate_spec(obj["spec"]).ok


DRAFT_TP = "speculative.draftTensorParallelSize must be 1 or tensorParallelSize (1 with pipelineParallelSize above 1)"


def test_draft_tensor_parallel_size_is_rendered_and_checked_against_tensor_parallel_size():
    """vLLM's rule, in the CEL rule and the operator alike: 1 or tensorParallelSize; ignored for ngram."""
    obj = _with({"model": {"source": "pvc://drafts/qwen-0.5b"}, "numSpeculativeTokens": 4, "draftTensorParallelSize": 2})
    obj["spec"]["tensorParallelSize"] = 2
    assert schema_errors(obj) == [] and cel_failures(obj) == []
    _, container = _container(obj)
    assert _flag(container["args"], "--speculative-draft-tensor-parallel-size") == "2"
    for tp, pp in ((4, 1), (2, 2)):
        bad = copy.deepcopy(obj)
        bad["spec"]["tensorParallelSize"], bad["spec"]["pipelineParallelSize"] = tp, pp
        assert DRAFT_TP in cel_failures(bad)
        checked = validate_spec(apply_defaults(schema(), bad)["spec"])
        assert not checked.ok and DRAFT_TP in checked.problems
    ngram = _with({"method": "ngram", "numSpeculativeTokens": 4, "draftTensorParallelSize": 3})
    assert DRAFT_TP not in cel_failures(ngram)
    _, container = _container(ngram)
    assert "--speculative-draft-tensor-parallel-size" not in container["args"]
