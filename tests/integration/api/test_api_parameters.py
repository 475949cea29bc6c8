"""Each request parameter, through the official OpenAI SDK (extras in extra_body), shown to take effect."""

from __future__ import annotations

import json
import re

import pytest
from api_server import MODEL

PROMPT = "the model serves tokens on a cluster"
MESSAGES = [{"role": "user", "content": "hello world how are you today"}]


@pytest.fixture(scope="module")
def tok(http):
    """Tokenise/detokenise through the server itself."""

    class Tok:
        def encode(self, text: str) -> list[int]:
            return http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]

        def decode(self, ids: list[int]) -> str:
            return http.post("/detokenize", json={"tokens": ids}).json()["prompt"]

    return Tok()


def complete(client, prompt=PROMPT, max_tokens=24, **extra):
    std = {k: extra.pop(k) for k in list(extra) if k in {"n", "stop", "seed", "temperature", "top_p", "logprobs", "echo", "best_of", "logit_bias", "stream", "stream_options", "presence_penalty", "frequency_penalty"}}
    std.setdefault("temperature", 0)
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, extra_body=extra or None, **std)


def extra_of(obj, name):
    """An extra response field (the SDK keeps unknown fields as attributes via model_extra)."""
    return getattr(obj, name, None) if getattr(obj, name, None) is not None else (obj.model_extra or {}).get(name)


@pytest.fixture(scope="module")
def greedy(openai_client):
    out = complete(openai_client, max_tokens=24, return_token_ids=True, ignore_eos=True)
    return out.choices[0]


@pytest.fixture(scope="module")
def eos_id(tok):
    return tok.encode("<|im_end|>")[0]


def test_greedy_is_deterministic_and_stream_matches(openai_client, greedy):
    again = complete(openai_client, max_tokens=24, ignore_eos=True).choices[0].text
    assert again == greedy.text
    stream = complete(openai_client, max_tokens=24, ignore_eos=True, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == greedy.text


def test_chat_stream_matches_and_usage_chunk(openai_client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    plain = openai_client.chat.completions.create(**kw)
    chunks = list(openai_client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_return_token_ids_decode_to_the_text(greedy, tok):
    ids = extra_of(greedy, "completion_token_ids")
    assert len(ids) == 24 and tok.decode(ids) == greedy.text
    assert extra_of(greedy, "prompt_token_ids") == tok.encode(PROMPT)


def test_prompt_token_ids_and_token_list_prompts_skip_tokenising(openai_client, greedy, tok):
    ids = tok.encode(PROMPT)
    as_list = openai_client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    assert as_list.choices[0].text == greedy.text
    via_field = complete(openai_client, prompt=None, prompt_token_ids=ids, ignore_eos=True)
    assert via_field.choices[0].text == greedy.text


def test_stop_cuts_across_token_boundaries(openai_client, greedy):
    text = greedy.text
    stop = text[5:9]
    cut = complete(openai_client, stop=[stop], ignore_eos=True).choices[0]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
    kept = complete(openai_client, stop=[stop], include_stop_str_in_output=True, ignore_eos=True).choices[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_stop_token_ids(openai_client, greedy):
    ids = extra_of(greedy, "completion_token_ids")
    out = complete(openai_client, stop_token_ids=[ids[3]], ignore_eos=True).choices[0]
    assert out.finish_reason == "stop" and extra_of(out, "stop_reason") == ids[3]
    assert len(out.text) < len(greedy.text)


def test_bad_words_never_appear(openai_client, greedy, tok):
    ids = extra_of(greedy, "completion_token_ids")
    banned = ids[0]
    out = complete(openai_client, bad_words_token_ids=[banned], return_token_ids=True, ignore_eos=True).choices[0]
    assert banned not in extra_of(out, "completion_token_ids")
    word = tok.decode([ids[1]]).strip()
    out = complete(openai_client, bad_words=[word], return_token_ids=True, ignore_eos=True).choices[0]
    assert word not in out.text.split()


def test_logit_bias_forces_a_token(openai_client, tok):
    target = tok.encode(" hello")[0]
    out = complete(openai_client, max_tokens=5, logit_bias={str(target): 100}, return_token_ids=True, ignore_eos=True).choices[0]
    assert extra_of(out, "completion_token_ids") == [target] * 5


def test_min_tokens_holds_back_eos_and_ignore_eos_runs_on(openai_client, eos_id):
    force_eos = {str(eos_id): 100}
    stopped = complete(openai_client, logit_bias=force_eos).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == ""
    held = complete(openai_client, logit_bias=force_eos, min_tokens=5, return_token_ids=True).choices[0]
    assert held.finish_reason == "stop" and len(extra_of(held, "completion_token_ids")) >= 5
    ignored = complete(openai_client, max_tokens=6, logit_bias=force_eos, ignore_eos=True, return_token_ids=True).choices[0]
    assert ignored.finish_reason == "length" and len(extra_of(ignored, "completion_token_ids")) == 6


def test_top_k_one_min_p_one_and_tiny_top_p_are_greedy(openai_client, greedy):
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        assert complete(openai_client, temperature=1.0, seed=3, ignore_eos=True, **extra).choices[0].text == greedy.text
    assert complete(openai_client, temperature=1.0, top_p=1e-6, seed=3, ignore_eos=True).choices[0].text == greedy.text


def test_seed_makes_sampling_reproducible(openai_client):
    runs = [complete(openai_client, temperature=1.0, seed=s, ignore_eos=True).choices[0].text for s in (11, 11, 12)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_penalties_change_a_repetitive_greedy_output(openai_client, greedy):
    for extra in ({"repetition_penalty": 2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        assert complete(openai_client, ignore_eos=True, **extra).choices[0].text != greedy.text, extra


def test_n_returns_n_choices(openai_client):
    out = complete(openai_client, n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 24


def test_best_of_and_beam_search(openai_client):
    best = complete(openai_client, best_of=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    assert len(best.choices) == 1
    beams = complete(openai_client, n=2, max_tokens=8, use_beam_search=True, best_of=2, length_penalty=1.0)
    assert len(beams.choices) == 2 and beams.choices[0].text != beams.choices[1].text
    again = complete(openai_client, n=2, max_tokens=8, use_beam_search=True, best_of=2, length_penalty=1.0)
    assert [c.text for c in again.choices] == [c.text for c in beams.choices]


def test_echo_returns_the_prompt(openai_client, greedy):
    out = complete(openai_client, echo=True, ignore_eos=True).choices[0]
    assert out.text == PROMPT + greedy.text


def test_completion_logprobs_shape(openai_client, tok):
    out = complete(openai_client, max_tokens=6, logprobs=3, ignore_eos=True).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for chosen, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and all(v <= 0 for v in top.values())
        assert max(top.values()) == pytest.approx(value, abs=1e-4)  # greedy picks the most likely
        assert chosen in top
    assert "".join(lp.tokens) == out.text
    echoed = complete(openai_client, max_tokens=2, logprobs=1, echo=True, ignore_eos=True).choices[0].logprobs
    assert echoed.token_logprobs[0] is None and len(echoed.tokens) == len(tok.encode(PROMPT)) + 2


def test_chat_logprobs_sorted_alternatives(openai_client):
    out = openai_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=5)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        alts = [t.logprob for t in entry.top_logprobs]
        assert len(alts) == 5 and alts == sorted(alts, reverse=True) and all(a <= 0 for a in alts)
        assert entry.logprob == pytest.approx(alts[0], abs=1e-4) and entry.token == entry.top_logprobs[0].token


def test_logprob_shaping_flags(openai_client):
    def lps(**extra):
        out = complete(openai_client, max_tokens=4, logprobs=2, temperature=0.5, seed=9, ignore_eos=True, **extra)
        return out.choices[0].logprobs.token_logprobs

    plain, scaled = lps(), lps(temp_scaled_logprobs=True)
    assert plain != scaled
    normalized = complete(openai_client, max_tokens=4, logprobs=2, temperature=1.0, top_p=0.5, seed=9, ignore_eos=True, top_p_normalized_logprobs=True)
    raw = complete(openai_client, max_tokens=4, logprobs=2, temperature=1.0, top_p=0.5, seed=9, ignore_eos=True)
    for a, b in zip(normalized.choices[0].logprobs.token_logprobs, raw.choices[0].logprobs.token_logprobs, strict=True):
        assert a >= b - 1e-6


def chat(client, **extra):
    std = {k: extra.pop(k) for k in list(extra) if k in {"messages", "max_tokens", "response_format", "n", "stream"}}
    std.setdefault("messages", MESSAGES)
    std.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=MODEL, temperature=0, extra_body=extra or None, **std)


def test_chat_template_kwargs_reach_the_template(openai_client):
    plain = chat(openai_client).usage.prompt_tokens
    no_think = chat(openai_client, chat_template_kwargs={"enable_thinking": False}).usage.prompt_tokens
    assert no_think > plain  # the tiny model's template pre-fills an empty <think></think> block


def test_chat_template_override_and_disable(openai_client, tok):
    custom = chat(openai_client, chat_template="{% for m in messages %}{{ m.content }}{% endfor %}", return_token_ids=True)
    assert extra_of(custom.choices[0].message, "prompt_token_ids") == tok.encode(MESSAGES[0]["content"])
    raw = chat(openai_client, disable_chat_template=True, return_token_ids=True)
    assert extra_of(raw.choices[0].message, "prompt_token_ids") == tok.encode(MESSAGES[0]["content"])


def test_messages_as_token_ids_and_prompt_token_ids(openai_client, tok):
    ids = tok.encode("hello world")
    a = openai_client.chat.completions.create(model=MODEL, messages=ids, max_tokens=6, temperature=0, extra_body={"return_token_ids": True})
    assert extra_of(a.choices[0].message, "prompt_token_ids") == ids
    b = chat(openai_client, prompt_token_ids=ids, max_tokens=6)
    assert b.choices[0].message.content == a.choices[0].message.content


def test_multi_part_text_content(openai_client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello world"}, {"type": "text", "text": "how are you"}]}]
    joined = [{"role": "user", "content": "hello world\nhow are you"}]
    assert chat(openai_client, messages=parts).choices[0].message.content == chat(openai_client, messages=joined).choices[0].message.content


def test_tools_are_shown_to_the_template(openai_client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    plain = chat(openai_client).usage.prompt_tokens
    with_tools = openai_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, tools=tools, tool_choice="none")
    assert with_tools.usage.prompt_tokens > plain + 10


def test_guided_decoding_fields(openai_client):
    choice = chat(openai_client, guided_choice=["yes", "no"], max_tokens=8).choices[0].message.content
    assert choice in {"yes", "no"}
    regex = chat(openai_client, guided_regex="[0-9]{3}", max_tokens=8).choices[0].message.content
    assert re.fullmatch("[0-9]{3}", regex)
    structured = chat(openai_client, structured_outputs={"choice": ["a", "b"]}).choices[0].message.content
    assert structured in {"a", "b"}
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    out = chat(openai_client, max_tokens=40, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content)["n"], int)
    grammar = chat(openai_client, guided_grammar='root ::= "ab" | "cd"').choices[0].message.content
    assert grammar in {"ab", "cd"}


def test_max_completion_tokens_and_user_metadata(openai_client):
    out = openai_client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=3, temperature=0, user="u1", metadata={"k": "v"},
        extra_body={"ignore_eos": True},
    )
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_arrival_time_on_every_chunk(openai_client):
    stream = complete(openai_client, max_tokens=5, ignore_eos=True, stream=True)
    times = [extra_of(c.choices[0], "arrival_time") for c in stream if c.choices]
    assert times and all(t is not None and t >= 0 for t in times) and times == sorted(times)
