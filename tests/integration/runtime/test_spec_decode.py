"""Speculative decoding against the same engine without it: identical greedy tokens (draft model and
n-gram, one at a time and batched, tp=1 and tp=2), the target's sampling distribution (a chi-square test
on a top-k slice, so exactness is measured, not assumed), stops, limits, grammars, preemption, prefix
caching and the KV blocks all as without speculation, and counters that count."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.llm_engine import LLMEngine
from bowline_runtime.engine.sampling_params import GuidedDecodingParams, SamplingParams

PROMPTS = [
    "Hello, world! Hello, world! Hello,",
    "你好，世界",
    "write a short story about a boat",
    "one two three four five six seven eight nine ten one two three four five",
    "json schema object array string number true false null name value key list function call tool",
    "k",
    "the model serves tokens on a cluster of nodes and every request streams text back to the client",
    "人工智能机器学习深度学习",
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def drafts(tiny_model_dir, tmp_path_factory):
    from bowline_runtime.tools.tiny_model import build_draft_model

    root = tmp_path_factory.mktemp("drafts")
    return {
        "layer1": str(build_draft_model(tiny_model_dir, root / "layer1", num_layers=1)),
        "copy": str(build_draft_model(tiny_model_dir, root / "copy", num_layers=None)),
    }


def make(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), device="cpu", **kw))


def run_all(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, dict]:
    """Add every request, step until all finish: {id: {ids, text, finish_reason}} (candidate 0)."""
    results: dict[str, dict] = {}
    for i, (ids, params) in enumerate(requests):
        engine.add_request(str(i), engine.check_request(ids, params))
        results[str(i)] = {"ids": [], "text": "", "finish_reason": None, "logprobs": [], "prompt_logprobs": None}
    while engine.has_unfinished_requests():
        for out in engine.step():
            entry, cand = results[out.request_id], out.outputs[0]
            entry["ids"] += cand.new_token_ids
            entry["text"] += cand.new_text
            entry["finish_reason"] = cand.finish_reason
            entry["logprobs"] += cand.new_logprobs or []
            entry["prompt_logprobs"] = entry["prompt_logprobs"] or out.prompt_logprobs
            entry["cached"] = out.num_cached_tokens
    return results


def one_at_a_time(engine, requests):
    return [run_all(engine, [r])["0"] for r in requests]


def concurrently(engine, requests):
    results = run_all(engine, requests)
    return [results[str(i)] for i in range(len(requests))]


def greedy_requests(engine, max_new=MAX_NEW):
    return [(engine.tokenizer.encode(p), SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True))
            for p in PROMPTS]


@pytest.fixture(scope="module")
def baseline(tiny_model_dir):
    engine = make(tiny_model_dir)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def baseline_greedy(baseline):
    return [r["ids"] for r in concurrently(baseline, greedy_requests(baseline))]


@pytest.fixture(scope="module")
def ngram(tiny_model_dir):
    engine = make(tiny_model_dir, speculative_model="[ngram]", num_speculative_tokens=3, enable_prefix_caching=True)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def draft(tiny_model_dir, drafts):
    engine = make(tiny_model_dir, speculative_config=json.dumps(
        {"method": "draft_model", "model": drafts["layer1"], "num_speculative_tokens": 3}), enable_prefix_caching=True)
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("which", ["ngram", "draft"])
def test_greedy_is_token_for_token_the_same_one_at_a_time_and_batched(which, request, baseline_greedy):
    engine = request.getfixturevalue(which)
    start_free = engine.block_manager.num_free_blocks
    reqs = greedy_requests(engine)
    assert [r["ids"] for r in one_at_a_time(engine, reqs)] == baseline_greedy
    assert [r["ids"] for r in concurrently(engine, reqs)] == baseline_greedy
    stats = engine.stats().spec_decode
    assert stats.num_drafts > 0 and stats.num_draft_tokens > 0
    assert engine.block_manager.num_free_blocks == start_free


def test_copy_of_target_accepts_every_draft_and_counts_it(tiny_model_dir, drafts, baseline_greedy):
    engine = make(tiny_model_dir, speculative_model=drafts["copy"], num_speculative_tokens=4)
    try:
        reqs = greedy_requests(engine)
        assert [r["ids"] for r in concurrently(engine, reqs)] == baseline_greedy
        stats = engine.stats().spec_decode
        # 24 tokens: 1 from the prefill, 4 steps of 4 accepted + 1 bonus, then 2 + 1 (capped by max_tokens).
        assert stats.num_draft_tokens == stats.num_accepted_tokens == len(PROMPTS) * (4 * 4 + 2)
        assert stats.num_drafts == len(PROMPTS) * 5
        assert stats.accepted_per_pos == [len(PROMPTS) * 5] * 2 + [len(PROMPTS) * 4] * 2
    finally:
        engine.shutdown()


def test_counters_are_consistent_for_a_weak_draft(draft):
    stats = draft.stats().spec_decode
    assert stats.num_accepted_tokens == sum(stats.accepted_per_pos) <= stats.num_draft_tokens
    assert all(a >= b for a, b in zip(stats.accepted_per_pos, stats.accepted_per_pos[1:], strict=False))
    assert stats.accepted_per_pos[0] <= stats.num_drafts


def test_stop_strings_max_tokens_guided_json_and_sampling_mixed_hold_and_free_every_block(ngram, draft, baseline):
    ids = [baseline.tokenizer.encode(p) for p in PROMPTS]
    texts = [r["text"] for r in concurrently(baseline, greedy_requests(baseline))]
    stop = texts[3][10:13]  # a string the greedy output reaches after a few tokens
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["boat", "rope"]}},
              "required": ["ok", "kind"]}
    requests = [
        (ids[3], SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, stop=[stop])),
        (ids[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)),
        (ids[0], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, min_tokens=7)),
        (ids[2], SamplingParams(temperature=0, max_tokens=60, guided=GuidedDecodingParams(json=schema))),
        (ids[4], SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=5, logprobs=2,
                                repetition_penalty=1.2, logit_bias={5: 3.0})),
        (ids[6], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, frequency_penalty=1.0,
                                bad_words=["the"])),
        (ids[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2, prompt_logprobs=1)),
    ]
    expected = concurrently(baseline, requests)
    for engine in (ngram, draft):
        start_free = engine.block_manager.num_free_blocks
        got = concurrently(engine, requests)
        assert got[0]["text"] == expected[0]["text"] and got[0]["finish_reason"] == "stop"
        assert not got[0]["text"].endswith(stop) and stop not in got[0]["text"]
        assert len(got[1]["ids"]) == 5 and got[1]["finish_reason"] == "length"
        assert len(got[2]["ids"]) == 7
        assert set(json.loads(got[3]["text"])) == {"ok", "kind"} and got[3]["finish_reason"] == "stop"
        assert got[3]["ids"] == expected[3]["ids"]
        assert len(got[4]["ids"]) <= 12
        assert got[5]["ids"] == expected[5]["ids"]  # penalties and bad words on the accepted prefix
        assert got[6]["ids"] == expected[6]["ids"]
        for ours, theirs in zip(got[6]["logprobs"], expected[6]["logprobs"], strict=True):
            assert ours.token_id == theirs.token_id and ours.rank == theirs.rank
            assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)
            assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
        assert [lp and lp.token_id for lp in got[6]["prompt_logprobs"]] == \
            [lp and lp.token_id for lp in expected[6]["prompt_logprobs"]]
        assert engine.block_manager.num_free_blocks == start_free


@pytest.mark.parametrize("which", ["ngram", "draft"])
def test_prefix_cache_hits_give_the_same_greedy_tokens(which, request, baseline):
    engine = request.getfixturevalue(which)
    long = baseline.tokenizer.encode(PROMPTS[6] * 3)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = one_at_a_time(baseline, [(long, params)])[0]["ids"]
    first, second = (one_at_a_time(engine, [(long, params)])[0] for _ in range(2))
    assert second["cached"] > 0 and first["ids"] == second["ids"] == expected


def test_a_seed_gives_the_same_sample_again_under_speculation(ngram):
    ids = ngram.tokenizer.encode(PROMPTS[0])
    params = SamplingParams(temperature=0.9, max_tokens=16, ignore_eos=True, seed=11)
    first, again = (one_at_a_time(ngram, [(ids, params)])[0]["ids"] for _ in range(2))
    assert first == again and len(first) == 16


def test_disable_by_batch_size_stops_proposals_while_the_batch_is_large(tiny_model_dir, baseline_greedy):
    engine = make(tiny_model_dir, speculative_model="[ngram]", num_speculative_tokens=3,
                  speculative_disable_by_batch_size=4)
    try:
        reqs = greedy_requests(engine)
        engine.add_request("big", engine.check_request(*reqs[0]))
        for i, r in enumerate(reqs[1:]):
            engine.add_request(str(i), engine.check_request(*r))
        engine.step()  # the prefills
        engine.step()  # eight decodes: no proposals
        assert engine.stats().spec_decode.num_drafts == 0
        while engine.has_unfinished_requests():
            engine.step()
        assert [r["ids"] for r in one_at_a_time(engine, reqs[:1])] == baseline_greedy[:1]
        assert engine.stats().spec_decode.num_drafts > 0  # alone, it speculates again
    finally:
        engine.shutdown()


def test_preemption_under_a_small_kv_cache_keeps_greedy_tokens(tiny_model_dir, drafts):
    kw = dict(max_model_len=256, kv_cache_memory=18 * 16 * 768, enable_prefix_caching=True)
    plain = make(tiny_model_dir, **kw)
    spec = make(tiny_model_dir, speculative_model=drafts["layer1"], num_speculative_tokens=3, **kw)
    try:
        reqs = greedy_requests(plain, max_new=40)
        expected = [r["ids"] for r in concurrently(plain, reqs)]
        start_free = spec.block_manager.num_free_blocks
        assert [r["ids"] for r in concurrently(spec, reqs)] == expected
        assert spec.scheduler.num_preemptions > 0
        assert spec.block_manager.num_free_blocks == start_free
        # Prefix caching: the same prompts again reuse cached blocks (draft KV included) and agree.
        assert [r["ids"] for r in one_at_a_time(spec, reqs[:2])] == expected[:2]
    finally:
        plain.shutdown()
        spec.shutdown()


# --- sampling exactness ---------------------------------------------------------------------------------

TOP_K = 4
DRAWS = 600


def _chi_square_p_value(observed: Counter, expected: dict, total: int) -> float:
    """Pearson's test, cells with an expected count under 5 pooled; Wilson-Hilferty for the tail."""
    stat, pooled_obs, pooled_exp, df = 0.0, 0, 0.0, -1
    for cell, prob in expected.items():
        e = prob * total
        if e < 5:
            pooled_obs += observed.get(cell, 0)
            pooled_exp += e
            continue
        stat += (observed.get(cell, 0) - e) ** 2 / e
        df += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        df += 1
    stat += sum(n for cell, n in observed.items() if cell not in expected) * 1e6  # impossible outcomes
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _top_k_probs(model, ids: list[int], vocab: int) -> dict[int, float]:
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1].float()[:vocab]
    values, idx = torch.topk(logits, TOP_K)
    return dict(zip(idx.tolist(), torch.softmax(values, -1).tolist(), strict=True))


def test_seeded_sampling_with_a_draft_follows_the_targets_distribution(tiny_model_dir, drafts):
    from transformers import AutoModelForCausalLM

    engine = make(tiny_model_dir, speculative_model=drafts["layer1"], num_speculative_tokens=2, max_num_seqs=128,
                  enable_prefix_caching=True)
    try:
        prompt = engine.tokenizer.encode(PROMPTS[2])
        params = [SamplingParams(temperature=1.0, top_k=TOP_K, max_tokens=3, ignore_eos=True, seed=s)
                  for s in range(DRAWS)]
        results = run_all(engine, [(prompt, p) for p in params])
        stats = engine.stats().spec_decode
    finally:
        engine.shutdown()
    samples = [tuple(r["ids"]) for r in results.values()]
    # Both accepted and rejected drafts happened: the rejection rule and the residual were exercised.
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    vocab = engine.sampler.vocab_size
    # Exact law of (t0, t1) — t1 is the first verified position — and of t2 given them (the second).
    first = _top_k_probs(ref, prompt, vocab)
    pairs = {(a, b): pa * pb for a, pa in first.items() for b, pb in _top_k_probs(ref, prompt + [a], vocab).items()}
    third: dict[int, float] = {}
    for (a, b), pab in pairs.items():
        for c, pc in _top_k_probs(ref, prompt + [a, b], vocab).items():
            third[c] = third.get(c, 0.0) + pab * pc
    assert _chi_square_p_value(Counter(s[:2] for s in samples), pairs, DRAWS) > 1e-3
    assert _chi_square_p_value(Counter(s[2] for s in samples), third, DRAWS) > 1e-3

    # The test can tell: the draft's own law (what accepting every draft would give) is rejected by it.
    draft_model = AutoModelForCausalLM.from_pretrained(drafts["layer1"], dtype=torch.float32).eval()
    with torch.inference_mode():
        dl = draft_model(torch.tensor([prompt + [max(first, key=first.get)]])).logits[0, -1].float()[:vocab]
    q = torch.softmax(dl, -1)
    top_b = max(first, key=first.get)
    p_next = _top_k_probs(ref, prompt + [top_b], vocab)
    tv = 0.5 * sum(abs(p_next.get(t, 0.0) - float(q[t])) for t in set(p_next) | set(torch.topk(q, 20).indices.tolist()))
    assert tv > 0.3, "the draft is too close to the target for this test to detect a wrong rule"


def test_tensor_parallel_two_ranks_greedy_is_the_same_with_a_draft_beside_rank_0_a_sharded_draft_and_ngram(
        tiny_model_dir, drafts, baseline_greedy):
    """Target sharded over two ranks, the draft beside rank 0 or sharded over the same two ranks
    (--speculative-draft-tensor-parallel-size 2), against the unspeculated engine (tp=2 gives tp=1's
    tokens: test_engine checks that). The sharded draft is a copy of the target: it accepts every
    proposal only if its shards compute what the target's do."""
    expected = [ids[:16] for ids in baseline_greedy]
    for kw in ({"speculative_model": drafts["layer1"], "num_speculative_tokens": 3},
               {"speculative_model": drafts["copy"], "num_speculative_tokens": 3,
                "speculative_draft_tensor_parallel_size": 2},
               {"speculative_model": "[ngram]", "num_speculative_tokens": 3}):
        engine = make(tiny_model_dir, tensor_parallel_size=2, **kw)
        try:
            start_free = engine.block_manager.num_free_blocks
            reqs = greedy_requests(engine, max_new=16)
            assert [r["ids"] for r in one_at_a_time(engine, reqs[:1])] == expected[:1]
            assert [r["ids"] for r in concurrently(engine, reqs)] == expected
            stats = engine.stats().spec_decode
            assert stats.num_draft_tokens > 0
            assert engine.block_manager.num_free_blocks == start_free
            if "speculative_draft_tensor_parallel_size" in kw:
                assert engine.speculator.draft.runner.tp_size == 2
                assert stats.num_accepted_tokens == stats.num_draft_tokens
        finally:
            engine.shutdown()


def test_lora_adapters_under_speculation_give_the_same_tokens(tiny_model_dir, drafts, tmp_path):
    """Verify rows carry the sequence's adapter; the draft proposes with its own base weights."""
    from bowline_runtime.tools.tiny_lora import write_lora_adapter

    adapter = write_lora_adapter(tiny_model_dir, tmp_path / "full", rank=8, seed=11)
    lora = dict(enable_lora=True, lora_modules=[f"full={adapter}"], max_loras=1, max_model_len=128)
    prompts = [[(5 * i + 2) % 1500 + 100 for i in range(n)] * 2 for n in (7, 12)]
    reqs = [(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, lora_name=name))
            for p in prompts for name in (None, "full")]
    results = []
    for kw in ({}, {"speculative_model": drafts["layer1"], "num_speculative_tokens": 3},
               {"speculative_model": "[ngram]", "num_speculative_tokens": 3}):
        engine = make(tiny_model_dir, **lora, **kw)
        try:
            results.append([r["ids"] for r in concurrently(engine, reqs)])
            if kw:
                assert engine.stats().spec_decode.num_draft_tokens > 0
        finally:
            engine.shutdown()
    assert results[1] == results[0] and results[2] == results[0]
    assert results[0][0] != results[0][1]  # the adapter changes the tokens
