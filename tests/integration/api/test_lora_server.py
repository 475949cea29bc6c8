"""Multi-LoRA through the real server and the official client, against PEFT under transformers' generate().

One server serves the tiny model with two PEFT adapters (one on every projection, one on q/v/down
by PEFT's regex with rsLoRA) and prefix caching on, so a request for an adapter whose prompt the
base model cached before must not reuse the base model's blocks.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from api_server import ServerProcess, error_of
from bowline_runtime.tools.tiny_lora import write_lora_adapter

PROMPTS = [  # token ids; the first is longer than two KV blocks, so the prefix cache holds it
    [(7 * i + 3) % 1500 + 100 for i in range(40)],
    [(11 * i + 5) % 1500 + 100 for i in range(9)],
    [(13 * i + 1) % 1500 + 100 for i in range(23)],
]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "sql": write_lora_adapter(tiny_model_dir, root / "sql", rank=8, alpha=16, seed=1),
        "chat": write_lora_adapter(tiny_model_dir, root / "chat", rank=4, alpha=8, seed=2, use_rslora=True,
                                   targets=r".*\.(q_proj|v_proj|down_proj)"),
        "late": write_lora_adapter(tiny_model_dir, root / "late", rank=16, alpha=16, seed=3,
                                   targets=["gate_proj", "up_proj", "o_proj"]),
        "root": root,
    }


@pytest.fixture(scope="module")
def lora_server(tiny_model_dir, adapters, tmp_path_factory):
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # vLLM's variable turns the load routes on
    try:
        server = ServerProcess(
            tiny_model_dir, "--enable-lora", "--lora-modules", f"sql={adapters['sql']}",
            f'{{"name": "chat", "path": "{adapters["chat"]}", "base_model_name": "tiny"}}',
            "--max-lora-rank", "16", "--max-loras", "2", "--max-cpu-loras", "3", "--enable-prefix-caching",
            "--max-model-len", "256", log_dir=tmp_path_factory.mktemp("logs"),
        )
    finally:
        del os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]
    try:
        server.wait_ready(180)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(lora_server):
    import openai

    return openai.OpenAI(base_url=lora_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapters):
    """Greedy tokens of the base model and of each adapter under PEFT, for every prompt."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def generate(model, prompt):
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                             min_new_tokens=MAX_TOKENS, do_sample=False)
        return out[0, len(prompt):].tolist()

    refs = {}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    refs[None] = [generate(base, p) for p in PROMPTS]
    for name in ("sql", "chat", "late"):
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), str(adapters[name])
        ).eval()
        refs[name] = [generate(model, p) for p in PROMPTS]
    return refs


def _complete(client, model, prompt):
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    assert reply.model == model
    return reply.choices[0].completion_token_ids


def test_models_lists_each_adapter_with_parent_and_root(client, adapters):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "sql", "chat"}
    assert cards["sql"].parent == "tiny" and cards["sql"].root == str(adapters["sql"])
    assert cards["chat"].parent == "tiny" and cards["chat"].root == str(adapters["chat"])


def test_adapter_greedy_equals_peft_and_base_is_unchanged(client, reference):
    # The base model first, so its blocks of the long prompt are in the prefix cache when the adapters run.
    for model in ("tiny", "sql", "chat"):
        key = None if model == "tiny" else model
        for prompt, want in zip(PROMPTS, reference[key], strict=True):
            assert _complete(client, model, prompt) == want, model
    assert reference["sql"] != reference[None] and reference["chat"] != reference[None]


def test_twelve_concurrent_mixed_requests_equal_their_one_at_a_time_output(client, reference, lora_server):
    jobs = [(model, i % len(PROMPTS)) for i in range(4) for model in ("tiny", "sql", "chat")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: _complete(client, job[0], PROMPTS[job[1]]), jobs))
    for (model, i), tokens in zip(jobs, got, strict=True):
        assert tokens == reference[None if model == "tiny" else model][i], (model, i)
    metrics = httpx.get(lora_server.url + "/metrics").text
    assert 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}' in metrics


def test_load_use_unload_then_404(client, lora_server, adapters, reference):
    http = httpx.Client(base_url=lora_server.url, timeout=60)
    loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(adapters["late"])})
    assert loaded.status_code == 200, loaded.text
    assert "late" in {m.id for m in client.models.list().data}
    assert _complete(client, "late", PROMPTS[1]) == reference["late"][1]
    again = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(adapters["late"])})
    assert "already been loaded" in error_of(again, 400)["message"]
    # Unloading while a request of the adapter streams: that request finishes, then the unload answers.
    stream = client.completions.create(model="late", prompt=PROMPTS[0], max_tokens=200, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    metrics = http.get("/metrics").text  # the gauge the inference gateway reads for adapter affinity
    assert 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="late",waiting_lora_adapters=""}' in metrics
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, "/v1/unload_lora_adapter", json={"lora_name": "late"})
        rest = list(chunks)
        unloaded = pending.result()
    assert unloaded.status_code == 200, unloaded.text
    finals = [c.choices[0].finish_reason for c in [first, *rest] if c.choices]
    assert finals[-1] == "length" and len(finals) >= 2
    assert "late" not in {m.id for m in client.models.list().data}
    gone = http.post("/v1/completions", json={"model": "late", "prompt": "hi", "max_tokens": 2})
    assert error_of(gone, 404)["param"] == "model"
    assert error_of(http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}), 404)


def test_bad_adapters_are_400_naming_the_problem_and_serving_goes_on(client, lora_server, tiny_model_dir, adapters, reference):
    from safetensors.torch import load_file, save_file

    root = adapters["root"]
    write_lora_adapter(tiny_model_dir, root / "big", rank=32, seed=4)
    wrong = write_lora_adapter(tiny_model_dir, root / "wrong", rank=8, seed=5, targets=["q_proj"])
    tensors = load_file(str(wrong / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = tensors[key][:, :48].contiguous()  # a different hidden size than the base model's
    save_file(tensors, str(wrong / "adapter_model.safetensors"))
    missing = write_lora_adapter(tiny_model_dir, root / "missing", rank=8, seed=6)
    (missing / "adapter_model.safetensors").unlink()
    http = httpx.Client(base_url=lora_server.url, timeout=60)
    cases = {"big": ("rank 32", "--max-lora-rank 16"), "wrong": ("q_proj", "do not fit"),
             "missing": ("adapter_model.safetensors not found",)}
    for name, words in cases.items():
        reply = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(root / name)})
        message = error_of(reply, 400)["message"]
        assert all(w in message for w in words), message
    assert {m.id for m in client.models.list().data} == {"tiny", "sql", "chat"}
    assert _complete(client, "sql", PROMPTS[2]) == reference["sql"][2]
