"""--kv-cache-dtype float16 / bfloat16 under a float32 model: greedy tokens equal transformers' generate()
with its keys and values rounded the same way, twice the tokens fit the same cache memory, and what the
engine cannot store is refused by name."""

from __future__ import annotations

import asyncio

import pytest
import torch
from bowline_runtime.config import EngineConfig, build_parser, config_from_args
from bowline_runtime.engine.async_engine import AsyncEngine
from bowline_runtime.engine.outputs import OutputAccumulator
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.models.loader import resolve_kv_cache_dtype

from tests.integration.runtime.test_engine import PROMPTS, assert_same_greedy, hf_greedy

MAX_NEW = 24
# float32 sums in another order; rounding the cache to float16 moves these by ~1e-3 (bfloat16 ~1e-2)
LOGPROB_TOLERANCE = 1e-4
KV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def rounded_kv_reference(model_dir, kv_dtype: torch.dtype):
    """transformers' model whose attention reads every key and value rounded to `kv_dtype` and back: what
    a cache of that dtype holds (its own cache stays float32, so rounding at read time is the same)."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    name = f"sdpa_rounded_kv_{str(kv_dtype).removeprefix('torch.')}"

    def attention(module, query, key, value, *args, **kwargs):
        return sdpa_attention_forward(module, query, key.to(kv_dtype).float(), value.to(kv_dtype).float(), *args,
                                      **kwargs)

    AttentionInterface.register(name, attention)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=name).eval()


async def generate_all(engine: AsyncEngine, prompts: list[list[int]]):
    """Each prompt's greedy tokens and their log-probabilities."""
    async def one(ids):
        acc = OutputAccumulator()
        params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)
        async for out in engine.generate(ids, params):
            acc.add(out)
        done = acc.latest.outputs[0]
        return done.token_ids, [lp.logprob for lp in done.logprobs]

    return await asyncio.gather(*(one(ids) for ids in prompts))


@pytest.mark.parametrize("name", list(KV_DTYPES))
@pytest.mark.parametrize("kernels", ["1", "0"], ids=["c-kernels", "torch-path"])
def test_greedy_matches_transformers_with_the_cache_rounded_alike(tiny_model_dir, monkeypatch, name, kernels):
    monkeypatch.setenv("BOWLINE_CPU_KERNELS", kernels)
    from bowline_runtime.kernels import cpu as cpu_kernels

    cpu_kernels.load.cache_clear()
    engine = AsyncEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", kv_cache_dtype=name))
    try:
        runner = engine.engine.runner
        assert runner.kv_dtype == KV_DTYPES[name] and runner.kv_caches[0][0].dtype == KV_DTYPES[name]
        assert (runner.decode_kernel is not None) == (kernels == "1")
        prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
        # one at a time, then all eight in one batch (prefills beside decodes, one decode group)
        alone = [asyncio.run(generate_all(engine, [ids]))[0] for ids in prompts]
        together = asyncio.run(generate_all(engine, prompts))
    finally:
        asyncio.run(engine.shutdown())
        cpu_kernels.load.cache_clear()
    reference = rounded_kv_reference(tiny_model_dir, KV_DTYPES[name])
    for ids, ours_alone, ours_together in zip(prompts, alone, together, strict=True):
        theirs, logits = hf_greedy(reference, ids, MAX_NEW)
        for tokens, logprobs in (ours_alone, ours_together):
            assert_same_greedy(tokens, theirs, logits)
            # the numbers too, up to the first divergence: the cache holds what the reference rounded to
            for i, (ours, token) in enumerate(zip(tokens, theirs, strict=False)):
                if ours != token:
                    break
                expected = float(torch.log_softmax(logits[i].float(), -1)[token])
                assert abs(logprobs[i] - expected) < LOGPROB_TOLERANCE, (i, logprobs[i], expected)


def test_a_half_precision_cache_holds_twice_the_tokens_in_the_same_memory(tiny_model_dir):
    blocks = {}
    for name in ("auto", "float16"):
        engine = AsyncEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", kv_cache_dtype=name,
                                          kv_cache_memory=8 * 2**20))
        try:
            blocks[name] = engine.stats().num_free_blocks
            per_token = engine.engine.runner.kv_bytes_per_token(engine.engine.tp.num_kv_heads_local)
            blocks[name, "bytes"] = per_token
        finally:
            asyncio.run(engine.shutdown())
    assert blocks["auto", "bytes"] == 2 * blocks["float16", "bytes"]
    assert blocks["float16"] in (2 * blocks["auto"], 2 * blocks["auto"] + 1)


def test_the_flag_and_its_variable_take_vllm_names_and_refuse_the_rest():
    def parse(*argv: str):
        return build_parser().parse_args(["--model", "m", *argv])

    assert config_from_args(parse("--kv-cache-dtype", "bfloat16"), {}).kv_cache_dtype == "bfloat16"
    assert config_from_args(parse(), {"BOWLINE_KV_CACHE_DTYPE": "float16"}).kv_cache_dtype == "float16"
    assert config_from_args(parse(), {}).kv_cache_dtype == "auto"
    with pytest.raises(ValueError, match=r"BOWLINE_KV_CACHE_DTYPE.*'fp8'.*auto.*float16.*bfloat16"):
        config_from_args(parse(), {"BOWLINE_KV_CACHE_DTYPE": "fp8"})
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert resolve_kv_cache_dtype("float16", torch.float32) is torch.float16
    with pytest.raises(ValueError, match="fp8_e5m2"):
        resolve_kv_cache_dtype("fp8_e5m2", torch.float32)
