"""spec.adapters and spec.lora: the CRD's schema and CEL rules agree with the operator, and every
source scheme renders a valid pod serving the adapter at the path the flags name."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
from bowline_operator.render import Owner, render_children
from bowline_operator.validation import validate_spec
from operator_crd_tools import apply_defaults, cel_failures, example, load_crd, schema, schema_errors

OWNER = Owner(name="svc", namespace="ml", uid="u")


def _spec(adapters, lora=None, served=None):
    obj = copy.deepcopy(example("cpu-tiny"))
    obj["spec"]["adapters"] = adapters
    if lora is not None:
        obj["spec"]["lora"] = lora
    if served is not None:
        obj["spec"]["model"]["servedModelName"] = served
    return obj


def test_every_source_scheme_renders_a_valid_pod_with_matching_flags():
    obj = _spec([{"name": "a", "source": "pvc://claim/x/y"}, {"name": "b", "source": "hostPath:///srv/b"},
                 {"name": "org/c", "source": "hf://org/c-lora"}, {"name": "d", "source": "/in/image"}],
                {"maxRank": 64})
    assert schema_errors(obj) == [] and cel_failures(obj) == []
    spec = validate_spec(apply_defaults(schema(), obj)["spec"], "svc").spec
    _, deployment = render_children(OWNER, spec)
    kubernetes_validate.validate(deployment, "1.33", strict=True)
    pod = deployment["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    i = args.index("--lora-modules")
    assert args[i + 1 : i + 5] == ["a=/mnt/adapters/0/x/y", "b=/mnt/adapters/1", "org/c=/mnt/adapters/hf/2", "d=/in/image"]
    assert args[args.index("--max-lora-rank") + 1] == "64" and "--max-loras" not in args
    (download,) = pod["initContainers"]
    assert download["command"][-3:] == ["org/c-lora", "main", "/mnt/adapters/hf/2"]


def test_no_adapters_no_lora_flags():
    spec = validate_spec(apply_defaults(schema(), example("cpu-tiny"))["spec"]).spec
    _, deployment = render_children(OWNER, spec)
    assert "--enable-lora" not in deployment["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize(("obj", "message"), [
    (_spec([{"name": "a", "source": "/x"}, {"name": "a", "source": "/y"}]), "adapters[].name must be unique"),
    (_spec([{"name": "tiny", "source": "/x"}], served="tiny"), "adapters[].name must differ from the served model name"),
    (_spec([], {"maxAdapters": 4, "maxCpuAdapters": 2}), "lora.maxCpuAdapters must be at least lora.maxAdapters"),
])
def test_cel_rules_and_operator_agree(obj, message):
    assert message in cel_failures(obj)
    checked = validate_spec(apply_defaults(schema(), obj)["spec"], "svc")
    assert not checked.ok and any(p.startswith(message) for p in checked.problems)


def test_an_adapter_named_after_the_service_is_refused_when_it_is_the_served_name():
    obj = _spec([{"name": "svc", "source": "/x"}])
    obj["spec"]["model"].pop("servedModelName", None)  # then metadata.name is the served name
    checked = validate_spec(obj["spec"], "svc")
    assert "adapters[].name must differ from the served model name" in checked.problems


@pytest.mark.parametrize(("field", "value"), [("name", "has space"), ("name", "a=b"), ("source", "s3://x/y")])
def test_schema_and_operator_refuse_bad_names_and_sources(field, value):
    adapter = {"name": "a", "source": "/x", field: value}
    obj = _spec([adapter])
    assert any(e.startswith("spec.adapters.0") for e in schema_errors(obj))
    assert not validate_spec(obj["spec"]).ok


def test_schema_takes_vllms_ranks_only():
    assert schema_errors(_spec([], {"maxRank": 24}))
    assert not validate_spec(_spec([], {"maxRank": 24})["spec"]).ok


def test_wide_output_shows_the_adapter_count():
    columns = load_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    (column,) = [c for c in columns if c["name"] == "Adapters"]
    assert column["priority"] == 1 and column["jsonPath"] == ".status.adapterCount"


def test_changing_the_adapter_list_changes_the_pod_template_so_the_deployment_rolls():
    def template(adapters):
        spec = validate_spec(apply_defaults(schema(), _spec(adapters))["spec"], "svc").spec
        return render_children(OWNER, spec)[1]["spec"]["template"]

    one = template([{"name": "a", "source": "/x"}])
    assert one == template([{"name": "a", "source": "/x"}])
    assert one != template([{"name": "a", "source": "/x"}, {"name": "b", "source": "/y"}])
