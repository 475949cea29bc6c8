"""compile_constraint and the constraints it makes, driven token by token with random logits on the
tiny model's tokenizer: whatever a model samples, the output satisfies the spec."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from bowline_runtime.engine.sampling_params import GuidedDecodingParams, SamplingParams
from bowline_runtime.guided import cache_info, compile_constraint
from guided_cases import SCHEMA
from guided_drive import VOCAB, drive, text_of


def make(tokenizer, vocab: int = VOCAB, **guided):
    return compile_constraint(SamplingParams(guided=GuidedDecodingParams(**guided)), tokenizer, vocab)


def test_no_constraint_when_nothing_asks_for_one(tokenizer):
    assert compile_constraint(SamplingParams(), tokenizer, VOCAB) is None


@pytest.mark.parametrize("seed", range(20))
def test_guided_json_always_validates_and_completes(tokenizer, seed):
    ids = drive(make(tokenizer, json=SCHEMA)(), seed)
    assert len(ids) < 400
    value = json.loads(text_of(tokenizer, ids))
    jsonschema.validate(value, SCHEMA)
    # Compact by default: exactly json.dumps' layout, keys in schema order, no free whitespace.
    assert text_of(tokenizer, ids) == json.dumps(value, ensure_ascii=False)


def test_flexible_whitespace_is_allowed_only_when_asked(tokenizer):
    newline = tokenizer.convert_tokens_to_ids("Ċ")  # byte-level BPE's "\n"
    allowed = {}
    for flexible in (False, True):
        constraint = make(tokenizer, json=SCHEMA, any_whitespace=flexible)()
        constraint.accept_token(tokenizer.encode("{")[0])
        logits = torch.zeros(VOCAB)
        constraint.mask_logits(logits)
        allowed[flexible] = bool(torch.isfinite(logits[newline]))
    assert allowed == {False: False, True: True}


def test_one_compilation_per_distinct_spec(tokenizer):
    schema = {"type": "object", "properties": {"unique_to_this_test": {"type": "integer"}}}
    before = cache_info()
    make(tokenizer, json=schema)
    make(tokenizer, json=json.dumps(schema))
    after = cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)


@pytest.mark.parametrize("seed", range(5))
def test_regex_choice_and_grammar_outputs_match(tokenizer, seed):
    regex = r"[a-z]{2,6}-[0-9]{1,3}(\.[0-9]{2})?"
    assert re.fullmatch(regex, text_of(tokenizer, drive(make(tokenizer, regex=regex)(), seed)))
    choices = ["yes", "no", "maybe later"]
    assert text_of(tokenizer, drive(make(tokenizer, choice=choices)(), seed)) in choices
    gbnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    out = text_of(tokenizer, drive(make(tokenizer, grammar=gbnf)(), seed, max_tokens=200))
    assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", out), out


def test_lark_grammar_and_json_object(tokenizer):
    out = text_of(tokenizer, drive(make(tokenizer, grammar='start: "a" B\nB: /[xyz]{3}/')(), 1))
    assert re.fullmatch("a[xyz]{3}", out)
    constraint = make(tokenizer, json_object=True)()
    logits = torch.zeros(VOCAB)
    constraint.mask_logits(logits)
    assert torch.isfinite(logits).nonzero().view(-1).tolist() == tokenizer.convert_tokens_to_ids(["{"])


def test_structural_tag_constrains_only_inside_the_tag(tokenizer):
    spec = {
        "type": "structural_tag",
        "structures": [{"begin": "<tool_call>", "schema": {"type": "object", "properties": {"n": {"enum": [7]}}, "required": ["n"]}, "end": "</tool_call>"}],
        "triggers": ["<tool_call>"],
    }
    for seed in range(3):
        copy = make(tokenizer, structural_tag=spec)()
        for token in tokenizer.encode("free text <tool_call>"):
            copy.accept_token(token)
        tail = text_of(tokenizer, drive(copy, seed, max_tokens=30))
        assert tail.startswith('{"n": 7}</tool_call>'), tail


@pytest.mark.parametrize(
    ("guided", "message"),
    [
        ({"json": {"type": "strin"}}, "guided_json: .*strin"),
        ({"regex": "a(b"}, "guided_regex: .*unclosed group"),
        ({"regex": "a(?=b)"}, "guided_regex: .*look-around"),
        ({"grammar": "start: undefined_rule"}, "guided_grammar: .*undefined_rule"),
    ],
)
def test_compile_errors_name_the_field_and_the_problem(tokenizer, guided, message):
    with pytest.raises(ValueError, match="(?s)" + message):
        make(tokenizer, **guided)


def test_ids_past_the_tokenizer_are_never_allowed(tokenizer):
    constraint = make(tokenizer, vocab=VOCAB + 64, regex="[a-z]+")()
    logits = torch.zeros(VOCAB + 64)
    constraint.mask_logits(logits)
    assert torch.isinf(logits[VOCAB:]).all() and torch.isfinite(logits[:VOCAB]).any()


def test_complete_output_allows_only_eos_then_finishes(tokenizer):
    constraint = make(tokenizer, regex="ab|abc")()
    for token in tokenizer.encode("abc"):
        constraint.accept_token(token)
    assert constraint.is_finished()
    constraint = make(tokenizer, regex="x[0-9]*")()
    constraint.accept_token(tokenizer.encode("x")[0])
    logits = torch.zeros(VOCAB)
    constraint.mask_logits(logits)
    assert torch.isfinite(logits[tokenizer.eos_token_id])  # complete, but digits may still follow
    constraint.accept_token(tokenizer.eos_token_id)
    assert constraint.is_finished()


def _allowed(constraint) -> list[int]:
    logits = torch.zeros(VOCAB)
    constraint.mask_logits(logits)
    return torch.isfinite(logits).nonzero().view(-1).tolist()


def test_reasoning_budget_forces_think_end(tokenizer):
    end = tokenizer.convert_tokens_to_ids("</think>")
    constraint = compile_constraint(SamplingParams(reasoning_max_tokens=5), tokenizer, VOCAB)()
    for token in tokenizer.encode("one two three four five")[:5]:
        assert len(_allowed(constraint)) > 1
        constraint.accept_token(token)
    assert _allowed(constraint) == [end]
    constraint.accept_token(end)
    assert len(_allowed(constraint)) == VOCAB and not constraint.is_finished()


def test_reasoning_ended_early_is_not_forced(tokenizer):
    end = tokenizer.convert_tokens_to_ids("</think>")
    constraint = compile_constraint(SamplingParams(reasoning_max_tokens=3), tokenizer, VOCAB)()
    constraint.accept_token(end)
    for token in tokenizer.encode("one two three four five"):
        assert len(_allowed(constraint)) == VOCAB
        constraint.accept_token(token)


@pytest.mark.parametrize("seed", range(3))
def test_guided_json_applies_after_reasoning(tokenizer, seed):
    params = SamplingParams(guided=GuidedDecodingParams(json=SCHEMA), reasoning_max_tokens=20)
    constraint = compile_constraint(params, tokenizer, VOCAB)()
    assert tokenizer.eos_token_id not in _allowed(constraint)  # reasoning may not end the answer
    ids = drive(constraint, seed)
    end = tokenizer.convert_tokens_to_ids("</think>")
    assert end in ids and ids.index(end) <= 20
    jsonschema.validate(json.loads(text_of(tokenizer, ids[ids.index(end) + 1 :])), SCHEMA)


def test_budget_needs_a_think_token():
    class NoThinkTokenizer:
        unk_token_id = 0
        eos_token_id = 1
        pad_token_id = None

        def convert_tokens_to_ids(self, token):
            return 0

        def get_added_vocab(self):
            return {}

    with pytest.raises(ValueError, match="reasoning_max_tokens: .*no </think> token"):
        compile_constraint(SamplingParams(reasoning_max_tokens=4), NoThinkTokenizer(), 16)


def test_fork_advances_independently_of_the_original(tokenizer):
    """A speculative draft advances a fork through its proposals; the sequence's state stays put."""
    original = make(tokenizer, choice=["boat", "rope"])()
    ids = tokenizer.encode("boat", add_special_tokens=False)
    fork = original.fork()
    fork.accept_token(ids[0])
    before, after = torch.zeros(VOCAB), torch.zeros(VOCAB)
    original.mask_logits(before)
    fork.mask_logits(after)
    assert torch.isfinite(before[ids[0]]) and not torch.equal(torch.isfinite(before), torch.isfinite(after))
    for token in ids:
        original.accept_token(token)
    assert original.is_finished()
