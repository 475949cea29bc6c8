"""Request fields → SamplingParams: every spelling of a knob lands where the engine reads it,
and what cannot be honoured is refused with the field named."""

from __future__ import annotations

import pytest
from bowline_runtime.api.errors import APIError, to_api_error
from bowline_runtime.api.protocol import ChatCompletionRequest, CompletionRequest
from bowline_runtime.api.sampling import ServerLimits, build_sampling_params, check_stream_compatible
from bowline_runtime.engine.errors import RequestRejected
from bowline_runtime.engine.request_checks import check_request

LIMITS = ServerLimits(vocab_size=2048, max_model_len=256, enable_logprob=True)


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def params_of(req, **kw):
    kw.setdefault("max_tokens", getattr(req, "output_limit", None))
    kw.setdefault("logprobs", None)
    return build_sampling_params(req, LIMITS, **kw)


def refused(req, param: str | None = None) -> APIError:
    """Refused by the API's conversion, SamplingParams' ranges or the engine-side check, whichever
    owns the rule, and answered as a 400 naming the field."""
    with pytest.raises((APIError, RequestRejected)) as info:
        check_request([1, 2], params_of(req), LIMITS.request_limits)
    error = to_api_error(info.value)
    assert error.status_code == 400
    if param is not None:
        assert error.param == param
    return error


def test_openai_defaults_are_kept():
    p = params_of(chat())
    assert (p.temperature, p.top_p, p.top_k, p.n, p.max_tokens) == (1.0, 1.0, 0, 1, None)


def test_extra_sampling_fields_reach_the_engine():
    p = params_of(
        chat(
            top_k=-1, min_p=0.1, min_tokens=3, repetition_penalty=1.2, ignore_eos=True, stop="x",
            stop_token_ids=[5], include_stop_str_in_output=True, bad_words=["foo"], seed=7,
            presence_penalty=0.5, frequency_penalty=-0.5, temp_scaled_logprobs=True,
            top_p_normalized_logprobs=True, reasoning_max_tokens=4, max_completion_tokens=9, max_tokens=20,
        )
    )
    assert p.top_k == 0 and p.min_p == 0.1 and p.min_tokens == 3 and p.repetition_penalty == 1.2
    assert p.ignore_eos and p.stop == ["x"] and p.stop_token_ids == [5] and p.include_stop_str_in_output
    assert p.bad_words == ["foo"] and p.seed == 7 and p.presence_penalty == 0.5 and p.frequency_penalty == -0.5
    assert p.temp_scaled_logprobs and p.top_p_normalized_logprobs and p.reasoning_max_tokens == 4
    assert p.max_tokens == 9  # max_completion_tokens wins over the deprecated max_tokens


def test_bad_words_token_ids_accept_fastdeploy_flat_and_vllm_nested_lists():
    assert params_of(chat(bad_words_token_ids=[3, 4])).bad_words_token_ids == [[3], [4]]
    assert params_of(chat(bad_words_token_ids=[[3, 4]])).bad_words_token_ids == [[3, 4]]
    refused(chat(bad_words_token_ids=[99999]), "bad_words_token_ids")


def test_logit_bias_keys_are_token_ids_in_range():
    assert params_of(chat(logit_bias={"5": -100})).logit_bias == {5: -100.0}
    refused(chat(logit_bias={"five": 1}), "logit_bias")
    refused(chat(logit_bias={"5": 101}), "logit_bias")
    refused(chat(logit_bias={"4096": 1}), "logit_bias")


@pytest.mark.parametrize(
    ("fields", "kind", "value"),
    [
        ({"guided_json": {"type": "object"}}, "json", {"type": "object"}),
        ({"guided_json": '{"type": "object"}'}, "json", '{"type": "object"}'),
        ({"guided_regex": "[a-z]+"}, "regex", "[a-z]+"),
        ({"guided_choice": ["yes", "no"]}, "choice", ["yes", "no"]),
        ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"'),
        ({"structural_tag": {"triggers": ["<f"]}}, "structural_tag", {"triggers": ["<f"]}),
        ({"structured_outputs": {"regex": "a+"}}, "regex", "a+"),
        ({"structured_outputs": {"json": {"type": "string"}}}, "json", {"type": "string"}),
        ({"response_format": {"type": "json_object"}}, "json_object", None),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}}, "json", {"type": "integer"}),
    ],
)
def test_every_guided_spelling_maps_to_one_constraint(fields, kind, value):
    guided = params_of(chat(**fields)).guided
    assert guided is not None and guided.kind() == kind
    if value is not None:
        assert getattr(guided, kind) == value


def test_response_format_text_means_no_constraint():
    assert params_of(chat(response_format={"type": "text"})).guided is None


def test_two_constraints_are_refused():
    err = refused(chat(guided_regex="a", guided_choice=["b"]))
    assert "guided_regex" in err.message and "guided_choice" in err.message


def test_guided_json_string_must_be_json():
    refused(chat(guided_json="{not json"), "guided_json")


def test_num_beams_is_best_of():
    req = CompletionRequest(prompt="x", num_beams=4, temperature=0.7, top_k=40)
    p = params_of(req)
    assert p.best_of == 4 and p.num_candidates == 4 and p.n == 1 and not p.use_beam_search
    refused(CompletionRequest(prompt="x", num_beams=4, best_of=3), "num_beams")


def test_beam_search_is_deterministic():
    p = params_of(CompletionRequest(prompt="x", use_beam_search=True, best_of=2, length_penalty=2, temperature=0))
    assert p.use_beam_search and p.best_of == 2 and p.length_penalty == 2 and p.temperature == 0
    refused(CompletionRequest(prompt="x", use_beam_search=True, best_of=2, temperature=0.7), "temperature")
    refused(CompletionRequest(prompt="x", length_penalty=2.0), "length_penalty")


def test_best_of_below_n_is_refused():
    refused(CompletionRequest(prompt="x", n=3, best_of=2), "best_of")


def test_best_of_cannot_stream_but_beam_search_can():
    req = CompletionRequest(prompt="x", n=1, best_of=3, stream=True)
    with pytest.raises(APIError):
        check_stream_compatible(req, params_of(req))
    beam = CompletionRequest(prompt="x", n=1, best_of=3, stream=True, use_beam_search=True)
    check_stream_compatible(beam, params_of(beam))


def test_logprobs_need_the_enable_logprob_flag():
    from bowline_runtime.api.sampling import check_logprobs

    off = ServerLimits(vocab_size=10, max_model_len=10, enable_logprob=False)
    with pytest.raises(APIError) as info:
        check_logprobs(0, off, "logprobs")
    assert "--enable-logprob" in info.value.message
    check_logprobs(21, LIMITS, "logprobs")  # the ceiling is the engine's rule, checked below
    with pytest.raises(RequestRejected) as rejected:
        check_request([1], build_sampling_params(chat(), LIMITS, max_tokens=None, logprobs=21), LIMITS.request_limits)
    assert rejected.value.param == "logprobs"
    check_request([1], build_sampling_params(chat(), LIMITS, max_tokens=None, logprobs=20), LIMITS.request_limits)
