"""The engine itself on the tiny llava: both forwards (the packed decoder and transformers' own) and a
prefill chunked through the middle of an image give transformers' greedy tokens."""

from __future__ import annotations

import io

import pytest
from bowline_runtime.api.protocol import ChatCompletionRequest
from bowline_runtime.api.vision_prompts import build_prompt, load_processor
from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.sampling_params import SamplingParams
from vision_helpers import image_bytes

TEXT = "What is in the picture?"


def run(engine, ids, images, max_tokens: int) -> list[int]:
    engine.add_request("r", engine.check_request(ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), images))
    out: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.extend(o.outputs[0].new_token_ids)
    return out


@pytest.mark.parametrize(
    ("packed", "chunk"), [(True, 8), (False, None)], ids=["packed-decoder-chunked-through-the-image", "transformers-forward"]
)
def test_engine_greedy_equals_transformers(tiny_llava_dir, reference, monkeypatch, packed, chunk):
    from bowline_runtime.engine.llm_engine import LLMEngine
    from PIL import Image

    monkeypatch.setenv("BOWLINE_PACKED_DECODER", "1" if packed else "0")
    extra = {"max_num_batched_tokens": chunk, "max_num_seqs": 4} if chunk else {}
    engine = LLMEngine(EngineConfig(model=str(tiny_llava_dir), device="cpu", max_model_len=256, **extra))
    try:
        assert (engine.runner.decoder is not None) == packed
        pictures = [image_bytes(70), image_bytes(71)]
        parts = [{"type": "image_url", "image_url": {"url": "data:,"}}] * 2 + [{"type": "text", "text": TEXT}]
        req = ChatCompletionRequest(messages=[{"role": "user", "content": parts}])
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in pictures]
        processor = load_processor(str(tiny_llava_dir), False)
        ids, images = build_prompt(req, engine.tokenizer, processor, None, pil, engine.image_token_id)
        want_prompt, want = reference.greedy(pictures, TEXT, 12)
        assert ids == want_prompt
        assert run(engine, ids, images, 12) == want
        if chunk:  # 8-token chunks: each 16-token image is encoded once and its features reused
            assert engine.runner.vision.num_encoded == 2
    finally:
        engine.shutdown()
