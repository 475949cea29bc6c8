"""Pure translation of a `GuidedDecodingParams` into an llguidance grammar string.

Nothing here touches a tokenizer or compiles anything: every function maps a user's spec to the
grammar text llguidance takes, and raises ValueError (which the API turns into HTTP 400) when the
spec itself is malformed. Whether the grammar compiles is checked later, against the tokenizer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from typing import Any

from llguidance import LLMatcher
from llguidance.gbnf_to_lark import any_to_lark

from bowline_runtime.engine.errors import RequestRejected
from bowline_runtime.engine.sampling_params import GuidedDecodingParams

# JSON layout when whitespace is not free: json.dumps' default separators, as xgrammar's
# any_whitespace=False produces. One fixed layout means a weak model cannot spend its token budget
# on spaces and newlines, and it is the layout models see most in training data.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
FLEXIBLE_JSON = {"whitespace_flexible": True}


def json_options(any_whitespace: bool) -> dict[str, Any]:
    return dict(FLEXIBLE_JSON if any_whitespace else COMPACT_JSON)


def load_schema(schema: dict[str, Any] | str, field: str = "guided_json") -> dict[str, Any]:
    """A schema given as a string is parsed; anything but a JSON object is refused."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise RequestRejected(f"{field}: the schema is not valid JSON ({exc})", field) from None
    if not isinstance(schema, dict):
        raise RequestRejected(f"{field}: a JSON Schema must be a JSON object, got {type(schema).__name__}", field)
    reject_ref_cycles(schema, field)
    return schema


def _resolve_pointer(root: dict[str, Any], ref: str) -> Any:
    """The node a local `$ref` ("#/a/b") names, or None when it names nothing here."""
    node: Any = root
    for part in ref.removeprefix("#").split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _refs(node: Any) -> Iterable[tuple[dict[str, Any], str]]:
    """Every (schema node, local $ref) pair anywhere in `node`."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            yield node, ref
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def reject_ref_cycles(schema: dict[str, Any], field: str) -> None:
    """A `$ref` chain that comes back to itself without describing any value (`a` is `a`) admits
    no JSON document; llguidance compiles it to a grammar whose only sentence is empty, and the
    client would get an empty, non-JSON answer with a 200. Refuse it instead."""
    for _, ref in _refs(schema):
        chain = [ref]
        target = _resolve_pointer(schema, ref)
        while isinstance(target, dict) and isinstance(target.get("$ref"), str):
            nxt = target["$ref"]
            if nxt in chain:
                raise RequestRejected(
                    f"{field}: the $ref {ref!r} only refers to itself ({' -> '.join([*chain, nxt])}), so no JSON "
                    "value matches the schema; give the definition a type or properties",
                    field,
                )
            chain.append(nxt)
            target = _resolve_pointer(schema, nxt)


_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalItems", "not", "if", "then", "else", "contains", "additionalProperties")


def close_objects(schema: Any, _in_all_of: bool = False) -> Any:
    """Return a copy where objects that list `properties` but say nothing about extra keys get
    `additionalProperties: false` — xgrammar's strict mode, vLLM's default.

    Without this a grammar must allow any number of made-up keys after the listed ones, and a weak
    model wanders off into them until max_tokens. Every output still validates against the original
    schema, which is all a client can rely on anyway. Members of `allOf` are left open: closing them
    would make the conjunction unsatisfiable.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if (
        "properties" in out
        and "additionalProperties" not in out
        and "unevaluatedProperties" not in out
        and "patternProperties" not in out
        and not _in_all_of
    ):
        out["additionalProperties"] = False
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: close_objects(v) for k, v in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(v) for v in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [close_objects(v, _in_all_of=True) for v in out["allOf"]]
    for key in _SUBSCHEMA_ONE:
        if isinstance(out.get(key), (dict, list)):
            out[key] = (
                [close_objects(v) for v in out[key]] if isinstance(out[key], list) else close_objects(out[key])
            )
    return out


def with_json_options(schema: dict[str, Any], any_whitespace: bool) -> dict[str, Any]:
    """The schema closed (see close_objects) and carrying llguidance's layout options; a user's own
    `x-guidance` keys win, so an expert can still ask for something else."""
    closed = close_objects(copy.deepcopy(schema))
    closed["x-guidance"] = {**json_options(any_whitespace), **(schema.get("x-guidance") or {})}
    return closed


def json_schema_grammar(schema: dict[str, Any] | str, any_whitespace: bool, field: str = "guided_json") -> str:
    return LLMatcher.grammar_from_json_schema(with_json_options(load_schema(schema, field), any_whitespace))


def regex_grammar(regex: str) -> str:
    if not isinstance(regex, str) or not regex:
        raise RequestRejected("guided_regex: must be a non-empty regular expression", "guided_regex")
    return LLMatcher.grammar_from_regex(regex)


def choice_grammar(choices: Iterable[Any]) -> str:
    items = list(choices) if choices is not None else []
    if not items:
        raise RequestRejected("guided_choice: needs at least one choice", "guided_choice")
    if not all(isinstance(c, str) for c in items):
        raise RequestRejected("guided_choice: every choice must be a string", "guided_choice")
    if any(c == "" for c in items):
        raise RequestRejected("guided_choice: choices must not be empty strings", "guided_choice")
    return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in items))


def ebnf_grammar(grammar: str) -> str:
    """GBNF (llama.cpp's `root ::= ...`), EBNF in that style, or Lark (`start: ...`) are all accepted."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise RequestRejected("guided_grammar: must be a non-empty grammar", "guided_grammar")
    try:
        lark = any_to_lark(grammar)
    except Exception as exc:  # the converter raises bare Exceptions with useful text
        raise RequestRejected(f"guided_grammar: cannot read the grammar as GBNF/EBNF or Lark ({exc})", "guided_grammar") from None
    return LLMatcher.grammar_from_lark(lark)


def structural_tag_grammar(spec: dict[str, Any] | str, any_whitespace: bool, special_tokens: frozenset[str]) -> str:
    """vLLM's structural-tag request: free text in which each trigger opens a tagged, schema-bound
    section — `{"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers": [...]}`."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise RequestRejected(f"structural_tag: not valid JSON ({exc})", "structural_tag") from None
    if not isinstance(spec, dict):
        raise RequestRejected("structural_tag: must be a JSON object with `structures` and `triggers`", "structural_tag")
    if "format" in spec and "structures" not in spec:
        raise RequestRejected(
            "structural_tag: the nested `format` form is not supported; send "
            '{"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers": [...]}'
        )
    structures, triggers = spec.get("structures"), spec.get("triggers")
    if not isinstance(structures, list) or not structures:
        raise RequestRejected("structural_tag: `structures` must be a non-empty list", "structural_tag")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise RequestRejected("structural_tag: `triggers` must be a non-empty list of non-empty strings", "structural_tag")
    rules = []
    for i, s in enumerate(structures):
        if not isinstance(s, dict) or not isinstance(s.get("begin"), str) or not isinstance(s.get("end", ""), str):
            raise RequestRejected(f"structural_tag: structures[{i}] needs string `begin` and `end`", "structural_tag")
        trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
        if trigger is None:
            raise RequestRejected(f"structural_tag: structures[{i}].begin {s['begin']!r} starts with none of the triggers", "structural_tag")
        schema = with_json_options(load_schema(s.get("schema", {}), f"structural_tag.structures[{i}].schema"), any_whitespace)
        body = " ".join(
            part
            for part in (_lark_text(s["begin"][len(trigger):], special_tokens), "%json " + json.dumps(schema), _lark_text(s.get("end", ""), special_tokens))
            if part
        )
        if trigger in special_tokens:
            rules.append(f"tag_{i}: TAG_TEXT {trigger} {body}")
        else:
            # A text trigger is matched lazily: free text ends at the trigger's first occurrence.
            rules.append(f"tag_{i}_trigger[lazy]: TAG_TEXT {json.dumps(trigger)}")
            rules.append(f"tag_{i}: tag_{i}_trigger {body}")
    alternatives = " | ".join(f"tag_{i}" for i in range(len(structures)))
    head = ["%llguidance {}", f"start: ({alternatives})* tag_end", "tag_end: TAG_TEXT", r"TAG_TEXT: /(.|\n)*/"]
    return "\n".join(head + rules) + "\n"


def _lark_text(text: str, special_tokens: frozenset[str]) -> str:
    """A Lark literal; a string that is one special token (`</tool_call>`) is matched as that token,
    the only way a model can produce it."""
    if not text:
        return ""
    return text if text in special_tokens else json.dumps(text, ensure_ascii=False)


def grammar_for(guided: GuidedDecodingParams, special_tokens: frozenset[str] = frozenset()) -> str:
    """The llguidance grammar for one request's guided-decoding spec."""
    kind = guided.kind()
    if kind == "json":
        return json_schema_grammar(guided.json, guided.any_whitespace)
    if kind == "json_object":
        return json_schema_grammar({"type": "object"}, guided.any_whitespace, "response_format")
    if kind == "regex":
        return regex_grammar(guided.regex)
    if kind == "choice":
        return choice_grammar(guided.choice)
    if kind == "grammar":
        return ebnf_grammar(guided.grammar)
    if kind == "structural_tag":
        return structural_tag_grammar(guided.structural_tag, guided.any_whitespace, special_tokens)
    raise RequestRejected("guided decoding: no constraint given (set one of json, regex, choice, grammar, structural_tag)")


def canonical_key(guided: GuidedDecodingParams) -> str:
    """A stable string naming the spec, so equal specs share one compiled grammar whether the schema
    came as a string or an object. Keys are not sorted: property order is the output's order."""
    kind = guided.kind()
    value: Any = getattr(guided, kind) if kind != "json_object" else True
    if kind in ("json", "structural_tag") and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # left as text: grammar_for reports the error
    return json.dumps([kind, value, guided.any_whitespace], ensure_ascii=False)
