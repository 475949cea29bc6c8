"""The engine, in process, against transformers' own generate() and under batching pressure."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.async_engine import AsyncEngine
from bowline_runtime.engine.outputs import OutputAccumulator
from bowline_runtime.engine.sampling_params import SamplingParams

PROMPTS = [
    "Hello, world!",
    "你好，世界",
    "write a short story about a boat",
    "one two three four five six seven eight nine ten first second third",
    "json schema object array string number true false null name value key list function call tool",
    "k",
    "the model serves tokens on a cluster of nodes and every request streams text back to the client "
    "kubernetes operator deployment service pod replica scale ready health metrics latency throughput",
    "人工智能机器学习深度学习",
]
MAX_NEW = 24
NEAR_TIE = 1e-4


def run(coro):
    return asyncio.run(coro)


async def generate(engine: AsyncEngine, ids: list[int], **kw):
    """The request's final cumulative state: the engine streams deltas, accumulated here."""
    acc = OutputAccumulator()
    async for out in engine.generate(ids, SamplingParams(**kw)):
        acc.add(out)
    return acc.latest


def make_engine(model_dir, **kw) -> AsyncEngine:
    return AsyncEngine(EngineConfig(model=str(model_dir), device="cpu", **kw))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = make_engine(tiny_model_dir)
    yield eng
    run(eng.shutdown())


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def hf_greedy(model, ids: list[int], max_new: int) -> tuple[list[int], list[torch.Tensor]]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, output_logits=True,
            return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
        )
    return out.sequences[0, len(ids) :].tolist(), [step[0] for step in out.logits]


def assert_same_greedy(ours: list[int], theirs: list[int], logits: list[torch.Tensor]) -> None:
    """Token for token, except from a step where transformers' own top two logits are a near-tie."""
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            top2 = torch.topk(logits[i].float(), 2).values
            gap = float(top2[0] - top2[1])
            assert gap < NEAR_TIE, f"diverged at output token {i}: {a} != {b} with a logit gap of {gap:.2e}"
            return
    assert len(ours) == len(theirs)


def test_greedy_matches_transformers_one_at_a_time(engine, reference):
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        out = run(generate(engine, ids, temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
        theirs, logits = hf_greedy(reference, ids, MAX_NEW)
        assert_same_greedy(out.outputs[0].token_ids, theirs, logits)


def test_greedy_matches_transformers_eight_in_one_batch(engine, reference):
    all_ids = [engine.tokenizer.encode(p) for p in PROMPTS]

    async def all_at_once():
        return await asyncio.gather(
            *(generate(engine, ids, temperature=0, max_tokens=MAX_NEW, ignore_eos=True) for ids in all_ids)
        )

    outs = run(all_at_once())
    for ids, out in zip(all_ids, outs, strict=True):
        theirs, logits = hf_greedy(reference, ids, MAX_NEW)
        assert_same_greedy(out.outputs[0].token_ids, theirs, logits)


def test_qwen2_architecture_matches_transformers(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    eng = make_engine(tiny_qwen2_dir)
    try:
        ref = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
        for prompt in PROMPTS[:4]:
            ids = eng.tokenizer.encode(prompt)
            out = run(generate(eng, ids, temperature=0, max_tokens=16, ignore_eos=True))
            theirs, logits = hf_greedy(ref, ids, 16)
            assert_same_greedy(out.outputs[0].token_ids, theirs, logits)
    finally:
        run(eng.shutdown())


def test_sixteen_concurrent_requests_complete_with_exact_counts_and_free_their_blocks(engine):
    start_free = engine.stats().num_free_blocks
    lengths = [1 + 3 * i for i in range(16)]

    async def many():
        return await asyncio.gather(
            *(
                generate(engine, engine.tokenizer.encode(PROMPTS[i % len(PROMPTS)] * (1 + i % 3)),
                         temperature=0.8, seed=i, max_tokens=n, ignore_eos=True)
                for i, n in enumerate(lengths)
            )
        )

    outs = run(many())
    assert [len(o.outputs[0].token_ids) for o in outs] == lengths
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert engine.stats().num_free_blocks == start_free


def test_aborted_request_frees_its_blocks(engine):
    start_free = engine.stats().num_free_blocks
    ids = engine.tokenizer.encode(PROMPTS[6] * 3)

    async def start_then_walk_away():
        stream = engine.generate(ids, SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                assert engine.stats().num_free_blocks < start_free  # it really holds blocks
                break
        await stream.aclose()
        for _ in range(100):
            if engine.stats().num_free_blocks == start_free and engine.stats().num_running == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    assert run(start_then_walk_away()), f"blocks not returned: {engine.stats()}"


def test_prompt_over_max_model_len_is_refused_naming_both_numbers(tiny_model_dir):
    eng = make_engine(tiny_model_dir, max_model_len=64)
    try:
        ids = list(range(10, 110))
        with pytest.raises(ValueError) as err:
            run(generate(eng, ids, max_tokens=4))
        assert "64" in str(err.value) and "100" in str(err.value)
        with pytest.raises(ValueError) as err:
            run(generate(eng, ids[:40], max_tokens=40))
        assert "64" in str(err.value) and "80" in str(err.value)
    finally:
        run(eng.shutdown())


def test_max_model_len_beyond_the_model_is_refused_at_start_up(tiny_model_dir):
    with pytest.raises(ValueError, match="exceeds the model's position limit of 2048"):
        make_engine(tiny_model_dir, max_model_len=4096)


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    ids = engine.tokenizer.encode(PROMPTS[2])
    alone = run(generate(engine, ids, temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True))

    async def with_neighbours():
        outs = await asyncio.gather(
            generate(engine, engine.tokenizer.encode(PROMPTS[0]), temperature=1.0, max_tokens=30, ignore_eos=True),
            generate(engine, ids, temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True),
            generate(engine, engine.tokenizer.encode(PROMPTS[3]), temperature=0.7, seed=9, max_tokens=5),
        )
        return outs[1]

    assert run(with_neighbours()).outputs[0].token_ids == alone.outputs[0].token_ids
    other = run(generate(engine, ids, temperature=1.0, seed=4321, max_tokens=20, ignore_eos=True))
    assert other.outputs[0].token_ids != alone.outputs[0].token_ids


def test_top_k_one_equals_greedy(engine):
    ids = engine.tokenizer.encode(PROMPTS[4])
    greedy = run(generate(engine, ids, temperature=0, max_tokens=20, ignore_eos=True))
    top1 = run(generate(engine, ids, temperature=1.3, top_k=1, max_tokens=20, ignore_eos=True))
    assert top1.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_stop_strings_cut_across_token_boundaries(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    full = run(generate(engine, ids, temperature=0, max_tokens=24, ignore_eos=True)).outputs[0]
    text = full.text
    assert len(text) > 12
    stop = text[5:9]  # four characters: very likely to straddle two tokens
    cut = run(generate(engine, ids, temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])).outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.index(stop)]
    kept = run(
        generate(engine, ids, temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    ).outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_n_candidates_differ_and_each_has_its_count(engine):
    ids = engine.tokenizer.encode(PROMPTS[1])
    out = run(generate(engine, ids, n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))
    assert [len(c.token_ids) for c in out.outputs] == [12, 12, 12]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3


def test_chunked_prefill_and_prefix_caching_give_the_same_tokens(tiny_model_dir, engine):
    ids = engine.tokenizer.encode(PROMPTS[6] * 2)
    expected = run(generate(engine, ids, temperature=0, max_tokens=16, ignore_eos=True)).outputs[0].token_ids
    eng = make_engine(tiny_model_dir, max_num_batched_tokens=16, max_num_seqs=4, enable_prefix_caching=True, block_size=8)
    try:
        first = run(generate(eng, ids, temperature=0, max_tokens=16, ignore_eos=True))
        second = run(generate(eng, ids, temperature=0, max_tokens=16, ignore_eos=True))
        assert first.outputs[0].token_ids == expected
        assert second.outputs[0].token_ids == expected
        assert first.num_cached_tokens == 0
        assert second.num_cached_tokens >= len(ids) - 8  # all full blocks but the last token's came from cache
    finally:
        run(eng.shutdown())


def test_requests_wait_for_memory_instead_of_failing(tiny_model_dir, engine):
    """A KV cache too small for all requests at once: they queue or get preempted, and all finish right."""
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    expected = [
        run(generate(engine, ids, temperature=0, max_tokens=40, ignore_eos=True)).outputs[0].token_ids for ids in prompts
    ]
    # 2 layers x 2 kv heads x 16 dims x 2 (k, v) x 4 bytes = 512 B per token: 48 KiB is 96 tokens, 6 blocks.
    small = make_engine(tiny_model_dir, kv_cache_memory=48 * 1024, max_model_len=96)
    try:
        async def crowd():
            return await asyncio.gather(
                *(generate(small, ids, temperature=0, max_tokens=40, ignore_eos=True) for ids in prompts)
            )

        outs = run(crowd())
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert small.engine.scheduler.num_preemptions > 0
        assert small.stats().num_free_blocks == small.stats().num_total_blocks
    finally:
        run(small.shutdown())


def test_tensor_parallel_two_ranks_equals_one(tiny_model_dir, engine):
    all_ids = [engine.tokenizer.encode(p) for p in PROMPTS[:4]]
    expected = [
        run(generate(engine, ids, temperature=0, max_tokens=16, ignore_eos=True)).outputs[0].token_ids for ids in all_ids
    ]
    tp2 = make_engine(tiny_model_dir, tensor_parallel_size=2)
    try:
        async def batch():
            return await asyncio.gather(
                *(generate(tp2, ids, temperature=0, max_tokens=16, ignore_eos=True) for ids in all_ids)
            )

        assert [o.outputs[0].token_ids for o in run(batch())] == expected
    finally:
        run(tp2.shutdown())


def test_dummy_weights_load_from_config_alone(tiny_model_dir, tmp_path):
    import shutil

    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    eng = make_engine(tmp_path, load_format="dummy")
    try:
        t0 = time.perf_counter()
        out = run(generate(eng, [5, 6, 7], temperature=0, max_tokens=8, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 8 and time.perf_counter() - t0 < 30
    finally:
        run(eng.shutdown())


def test_beam_search_beats_or_equals_greedy_likelihood(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    greedy = run(generate(engine, ids, temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)).outputs[0]
    beams = run(generate(engine, ids, use_beam_search=True, n=2, best_of=3, temperature=0, max_tokens=8, ignore_eos=True))
    assert len(beams.outputs) == 2
    best = beams.outputs[0]
    assert len(best.token_ids) == 8
    assert best.cumulative_logprob >= greedy.cumulative_logprob - 1e-4
    assert beams.outputs[0].cumulative_logprob >= beams.outputs[1].cumulative_logprob - 1e-6


def test_stop_strings_wait_for_min_tokens(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    full = run(generate(engine, ids, temperature=0, max_tokens=24, ignore_eos=True)).outputs[0]
    stop = full.text[1:4]
    early = full.text.index(stop)
    out = run(generate(engine, ids, temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], min_tokens=12)).outputs[0]
    assert len(out.token_ids) >= 12
    assert out.text.startswith(full.text[: early + len(stop)])  # the early occurrence was not cut


def test_greedy_matches_transformers_with_widely_different_context_lengths(engine, reference):
    """Short and long contexts decode in one batch; attention runs over length groups, not one padded block."""
    import random

    rng = random.Random(7)
    all_ids = [[rng.randrange(10, 2000) for _ in range(n)] for n in (5, 12, 700, 1300)]

    async def together():
        return await asyncio.gather(
            *(generate(engine, ids, temperature=0, max_tokens=12, ignore_eos=True) for ids in all_ids)
        )

    for ids, out in zip(all_ids, run(together()), strict=True):
        theirs, logits = hf_greedy(reference, ids, 12)
        assert_same_greedy(out.outputs[0].token_ids, theirs, logits)


def test_greedy_matches_transformers_over_long_decodes_as_the_batch_changes(engine, reference):
    """Decodes past the staged-context headroom while neighbours finish and join: still token-exact."""
    all_ids = [engine.tokenizer.encode(p) for p in PROMPTS[:4]]
    budgets = [150, 40, 90, 150]

    async def staggered():
        first = [generate(engine, ids, temperature=0, max_tokens=n, ignore_eos=True)
                 for ids, n in zip(all_ids[:3], budgets[:3], strict=True)]
        tasks = [asyncio.ensure_future(c) for c in first]
        await asyncio.sleep(0.05)  # the fourth joins while the others are decoding
        tasks.append(asyncio.ensure_future(generate(engine, all_ids[3], temperature=0, max_tokens=150, ignore_eos=True)))
        return await asyncio.gather(*tasks)

    for ids, n, out in zip(all_ids, budgets, run(staggered()), strict=True):
        theirs, logits = hf_greedy(reference, ids, n)
        assert_same_greedy(out.outputs[0].token_ids, theirs, logits)


def test_decode_attention_paths_give_the_same_tokens(tiny_model_dir, engine, monkeypatch):
    """The C paged kernels (default on CPU), torch with staged contexts, and torch gathering every
    step (what accelerators without a kernel do) produce the same greedy tokens."""
    import shutil

    from bowline_runtime.devices.cpu import CpuDevice
    from bowline_runtime.kernels import cpu as kernels

    if shutil.which("cc") or shutil.which("gcc"):
        runner = engine.engine.runner
        assert runner.decode_kernel is not None and runner.prefill_kernel is not None, "a C compiler is here: kernels must be in use"
    all_ids = [engine.tokenizer.encode(p) for p in PROMPTS[:3]]

    async def batch(eng):
        return await asyncio.gather(*(generate(eng, ids, temperature=0, max_tokens=80, ignore_eos=True) for ids in all_ids))

    expected = [o.outputs[0].token_ids for o in run(batch(engine))]
    monkeypatch.setenv(kernels.KERNELS_ENV, "0")
    kernels.load.cache_clear()
    try:
        for staging in (True, False):
            monkeypatch.setattr(CpuDevice, "stages_decode_context", staging)
            other = make_engine(tiny_model_dir)
            try:
                assert other.engine.runner.decode_kernel is None and other.engine.runner.prefill_kernel is None
                assert other.engine.runner.stage_decode_context is staging
                assert [o.outputs[0].token_ids for o in run(batch(other))] == expected
            finally:
                run(other.shutdown())
    finally:
        kernels.load.cache_clear()


def test_engine_seed_fixes_dummy_weights_and_unseeded_draws(tiny_model_dir, tmp_path):
    import shutil

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)

    def sample(seed: int) -> list[int]:
        eng = make_engine(tmp_path, load_format="dummy", seed=seed)
        try:
            return run(generate(eng, [5, 6, 7], temperature=1.0, max_tokens=12, ignore_eos=True)).outputs[0].token_ids
        finally:
            run(eng.shutdown())

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_step_token_budget_defaults_to_the_devices_chunk_and_to_max_model_len_without_chunking(tiny_model_dir, engine):
    from bowline_runtime.devices.cpu import CpuDevice

    assert engine.engine.scheduler.max_num_batched_tokens == CpuDevice.default_max_num_batched_tokens == 512
    whole = make_engine(tiny_model_dir, enable_chunked_prefill=False, max_model_len=1024)
    try:
        assert whole.engine.scheduler.max_num_batched_tokens == 1024
    finally:
        run(whole.shutdown())


def test_chunked_prefill_off_needs_a_step_budget_of_max_model_len(tiny_model_dir):
    with pytest.raises(ValueError, match="--max-num-batched-tokens \\(256\\) must be at least --max-model-len \\(512\\)"):
        make_engine(tiny_model_dir, enable_chunked_prefill=False, max_num_batched_tokens=256, max_model_len=512)


def test_a_failed_step_fails_its_requests_frees_their_blocks_and_the_engine_carries_on(tiny_model_dir, monkeypatch):
    from bowline_runtime.engine.async_engine import EngineStepError

    eng = make_engine(tiny_model_dir)
    try:
        start_free = eng.stats().num_free_blocks
        real_sampler = eng.engine.sampler
        calls = {"n": 0}

        def flaky(logits, seqs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected fault")
            return real_sampler(logits, seqs)

        monkeypatch.setattr(eng.engine, "sampler", flaky)
        with pytest.raises(EngineStepError, match="injected fault"):
            run(generate(eng, [5, 6, 7, 8], temperature=0, max_tokens=10, ignore_eos=True))
        assert eng.stats().num_free_blocks == start_free and eng.is_alive
        again = run(generate(eng, [5, 6, 7, 8], temperature=0, max_tokens=10, ignore_eos=True))
        assert len(again.outputs[0].token_ids) == 10
    finally:
        run(eng.shutdown())
