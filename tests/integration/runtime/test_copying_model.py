"""The copying model (tools.copying_model) continues a prompt by copying it, as transformers runs it and as
Bowline serves it, and n-gram speculation on it accepts what it proposes while giving the same tokens."""

from __future__ import annotations

import pytest
import torch
from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.llm_engine import LLMEngine
from bowline_runtime.engine.sampling_params import SamplingParams
from bowline_runtime.tools.copying_model import build_copying_model, copying_state_dict

NEW = 40


@pytest.fixture(scope="module")
def copying_dir(tmp_path_factory):
    return build_copying_model(tmp_path_factory.mktemp("copying") / "small", preset="small")


def _repeated_prompt(seed: int, length: int = 60, again: int = 6) -> tuple[list[int], list[int]]:
    """Distinct random tokens, then their first `again` once more: (prompt, the rest of the text)."""
    gen = torch.Generator().manual_seed(seed)
    text = (torch.randperm(1900, generator=gen)[:length] + 100).tolist()
    return text + text[:again], text[again:]


def _generate(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), engine.check_request(ids, params))
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] += o.outputs[0].new_token_ids
    return [out[str(i)] for i in range(len(prompts))]


def test_transformers_continues_the_prompt_by_copying_it(copying_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(copying_dir, dtype=torch.float32).eval()
    for seed in range(3):
        prompt, rest = _repeated_prompt(seed)
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False)
        assert out[0, len(prompt):].tolist() == rest[:NEW]


def test_bowline_serves_the_same_copy_and_ngram_lookup_accepts_it(copying_dir):
    prompts = [_repeated_prompt(seed)[0] for seed in range(4)]
    expected = [_repeated_prompt(seed)[1][:NEW] for seed in range(4)]
    plain = LLMEngine(EngineConfig(model=str(copying_dir), device="cpu"))
    try:
        assert _generate(plain, prompts) == expected
    finally:
        plain.shutdown()
    spec = LLMEngine(EngineConfig(model=str(copying_dir), device="cpu", speculative_model="[ngram]",
                                  num_speculative_tokens=4))
    try:
        assert _generate(spec, prompts) == expected
        stats = spec.stats().spec_decode
        assert stats is not None and stats.num_draft_tokens > 0
        # Every token from the second one on continues a match in the prompt: nearly all proposals hold.
        assert stats.num_accepted_tokens / stats.num_draft_tokens > 0.9
    finally:
        spec.shutdown()


def test_shapes_too_small_for_the_circuit_are_refused(tiny_model_dir):
    from transformers import AutoConfig

    with pytest.raises(ValueError, match="hidden size >= 225, head size 64"):
        copying_state_dict(AutoConfig.from_pretrained(tiny_model_dir))
