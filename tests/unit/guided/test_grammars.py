"""The spec → grammar translation: what users send is either honoured or refused with a reason."""

from __future__ import annotations

import json

import pytest
from bowline_runtime.engine.sampling_params import GuidedDecodingParams
from bowline_runtime.guided.grammars import canonical_key, close_objects, grammar_for


def test_close_objects_forbids_unlisted_keys_but_keeps_explicit_choices():
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}},
        "$defs": {"d": {"properties": {"x": {}}}},
        "anyOf": [{"properties": {"y": {}}}],
        "items": {"properties": {"z": {}}},
    }
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert closed["items"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is not modified
    explicit = close_objects({"properties": {"a": {}}, "additionalProperties": {"type": "integer"}})
    assert explicit["additionalProperties"] == {"type": "integer"}
    all_of = close_objects({"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]})
    assert all("additionalProperties" not in member for member in all_of["allOf"])


def test_same_schema_as_string_or_object_shares_a_cache_key():
    schema = {"type": "object", "properties": {"b": {}, "a": {}}}
    as_obj = canonical_key(GuidedDecodingParams(json=schema))
    assert as_obj == canonical_key(GuidedDecodingParams(json=json.dumps(schema)))
    assert as_obj != canonical_key(GuidedDecodingParams(json=schema, any_whitespace=True))
    # Property order is the output's order, so a reordered schema is a different grammar.
    assert as_obj != canonical_key(GuidedDecodingParams(json={"type": "object", "properties": {"a": {}, "b": {}}}))


@pytest.mark.parametrize(
    ("guided", "message"),
    [
        (GuidedDecodingParams(choice=[]), "guided_choice: needs at least one choice"),
        (GuidedDecodingParams(choice=["a", 1]), "every choice must be a string"),
        (GuidedDecodingParams(json="{not json"), "guided_json: the schema is not valid JSON"),
        (GuidedDecodingParams(json="[1, 2]"), "must be a JSON object"),
        (GuidedDecodingParams(regex=""), "guided_regex"),
        (GuidedDecodingParams(grammar="  "), "guided_grammar"),
        (GuidedDecodingParams(structural_tag={"structures": [], "triggers": ["<f"]}), "`structures` must be"),
        (
            GuidedDecodingParams(structural_tag={"structures": [{"begin": "<g>", "end": ""}], "triggers": ["<f"]}),
            "starts with none of the triggers",
        ),
        (GuidedDecodingParams(structural_tag={"type": "structural_tag", "format": {}}), "nested `format`"),
        (GuidedDecodingParams(), "no constraint given"),
    ],
)
def test_malformed_specs_are_refused_with_the_field_named(guided, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        grammar_for(guided)


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#/definitions/a", "definitions": {"a": {"$ref": "#/definitions/a"}}},
        {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
        json.dumps({"type": "object", "properties": {"x": {"$ref": "#/$defs/x"}}, "$defs": {"x": {"$ref": "#/$defs/x"}}}),
    ],
)
def test_a_ref_that_only_refers_to_itself_is_refused(schema):
    """Issue 17, defect 6: such a schema admits no JSON value; compiled, it produced an empty 200."""
    from bowline_runtime.engine.errors import RequestRejected

    with pytest.raises(RequestRejected) as info:
        grammar_for(GuidedDecodingParams(json=schema))
    assert info.value.param == "guided_json" and "refers to itself" in info.value.message


def test_a_recursive_schema_that_describes_values_is_kept():
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}
    assert grammar_for(GuidedDecodingParams(json=tree))
