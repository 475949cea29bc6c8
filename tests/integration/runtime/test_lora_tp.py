"""LoRA in the engine: tensor-parallel shards of A/B match the base weights (tp=2 = tp=1), and the update composes with quantized Linear kernels."""

from __future__ import annotations

import pytest
from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.llm_engine import LLMEngine
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.tools.tiny_lora import write_lora_adapter

PROMPTS = [[(5 * i + 2) % 1500 + 100 for i in range(n)] for n in (7, 30, 18)]


def _run_mixed(engine: LLMEngine) -> dict[str, list[int]]:
    """Base and both adapters' requests added together, so every step mixes them."""
    jobs = {f"{name}-{i}": (name, p) for i, p in enumerate(PROMPTS) for name in (None, "full", "qv")}
    for request_id, (name, prompt) in jobs.items():
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, lora_name=name)
        engine.add_request(request_id, engine.check_request(prompt, params))
    tokens: dict[str, list[int]] = {rid: [] for rid in jobs}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].new_token_ids
    return tokens


@pytest.mark.timeout(300)
def test_tp2_with_adapters_equals_tp1(tiny_model_dir, tmp_path):
    full = write_lora_adapter(tiny_model_dir, tmp_path / "full", rank=8, seed=11)
    qv = write_lora_adapter(tiny_model_dir, tmp_path / "qv", rank=4, seed=12, targets=["q_proj", "v_proj", "down_proj"])
    results = []
    for tp in (1, 2):
        engine = LLMEngine(EngineConfig(
            model=str(tiny_model_dir), served_model_name="tiny", device="cpu", tensor_parallel_size=tp,
            enable_lora=True, lora_modules=[f"full={full}", f"qv={qv}"], max_loras=2, max_model_len=128,
            kv_cache_memory=1 << 24,
        ))
        try:
            results.append(_run_mixed(engine))
        finally:
            engine.shutdown()
    assert results[0] == results[1]
    assert results[0]["full-1"] != results[0]["None-1"] != results[0]["qv-1"]


def test_adapters_compose_with_int8_weights(tiny_model_dir, tmp_path):
    """The update is added after whatever Linear the quantized format uses: mixed steps equal one-at-a-time."""
    full = write_lora_adapter(tiny_model_dir, tmp_path / "full", rank=8, seed=11)
    qv = write_lora_adapter(tiny_model_dir, tmp_path / "qv", rank=4, seed=12, targets=["q_proj", "v_proj", "down_proj"])
    engine = LLMEngine(EngineConfig(
        model=str(tiny_model_dir), served_model_name="tiny", device="cpu", quantization="int8", enable_lora=True,
        lora_modules=[f"full={full}", f"qv={qv}"], max_loras=2, max_model_len=128, kv_cache_memory=1 << 24,
    ))
    try:
        mixed = _run_mixed(engine)
        for request_id, tokens in mixed.items():
            name, i = request_id.rsplit("-", 1)
            params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, lora_name=None if name == "None" else name)
            engine.add_request("alone", engine.check_request(PROMPTS[int(i)], params))
            alone: list[int] = []
            while engine.has_unfinished_requests():
                for out in engine.step():
                    alone += out.outputs[0].new_token_ids
            assert alone == tokens, request_id
    finally:
        engine.shutdown()
    assert mixed["full-1"] != mixed["None-1"]
