"""LoRA with the engine core in its own process (BOWLINE_ENGINE_PROCESS=1): adapters from the flag
and loaded at run time answer PEFT's tokens; unload and refusals cross the process boundary intact."""

from __future__ import annotations

import os

import httpx
import pytest
from api_server import ServerProcess, error_of
from bowline_runtime.tools.tiny_lora import write_lora_adapter

PROMPT = [(3 * i + 7) % 1500 + 100 for i in range(20)]


def _peft_tokens(model_dir, adapter) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), str(adapter))
    ids = torch.tensor([PROMPT])
    out = model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                                do_sample=False)
    return out[0, len(PROMPT):].tolist()


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    static = write_lora_adapter(tiny_model_dir, root / "static", rank=8, seed=21)
    late = write_lora_adapter(tiny_model_dir, root / "late", rank=4, seed=22, targets=["q_proj", "down_proj"])
    env = {"BOWLINE_ENGINE_PROCESS": "1", "BOWLINE_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        server = ServerProcess(tiny_model_dir, "--enable-lora", "--lora-modules", f"static={static}",
                               "--max-loras", "2", "--max-model-len", "128", log_dir=root)
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    try:
        server.wait_ready(180)
        yield server, {"static": static, "late": late, "root": root}
    finally:
        server.stop()


def _complete(http: httpx.Client, model: str) -> list[int]:
    reply = http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                               "ignore_eos": True, "return_token_ids": True})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["completion_token_ids"]


def test_load_use_unload_through_the_engine_core_process(setup, tiny_model_dir):
    server, paths = setup
    http = httpx.Client(base_url=server.url, timeout=120)
    assert _complete(http, "static") == _peft_tokens(tiny_model_dir, paths["static"])
    loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(paths["late"])})
    assert loaded.status_code == 200, loaded.text
    assert {m["id"] for m in http.get("/v1/models").json()["data"]} == {"tiny", "static", "late"}
    assert _complete(http, "late") == _peft_tokens(tiny_model_dir, paths["late"])
    missing = http.post("/v1/load_lora_adapter", json={"lora_name": "nope", "lora_path": str(paths["root"] / "nope")})
    assert "does not exist" in error_of(missing, 400)["message"]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    assert {m["id"] for m in http.get("/v1/models").json()["data"]} == {"tiny", "static"}
    error_of(http.post("/v1/completions", json={"model": "late", "prompt": "hi", "max_tokens": 2}), 404)
    error_of(http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}), 404)
