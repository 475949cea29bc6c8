"""The reference documents' remaining surfaces against real server processes: vLLM's native
POST /generate with the Ascend document's two curl bodies, a server launched with that document's
whole flag list and environment, one launched as the Chinese-LLaMA-Alpaca-2 demo launches it, and
the offline `LLM` API giving the server's answers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest
from api_server import MODEL, ServerProcess, error_of
from bowline_runtime import LLM, SamplingParams

# The Ascend document's /generate bodies, as its curl lines send them.
ASCEND_GENERATE = {"prompt": "hello", "max_tokens": 100, "temperature": 0, "ignore_eos": False, "presence_penalty": 2}
ASCEND_GENERATE_BEAM = {
    "prompt": "hello", "max_tokens": 100, "top_p": 1, "temperature": 0, "ignore_eos": False, "top_k": -1,
    "use_beam_search": True, "best_of": 2, "length_penalty": 2,
}
# Its run_vllm.sh flags (both scripts of 方式一 and the 方式二 one) and the parameters it documents.
# Adapted: ${dtype} is float32 (greedy tokens compared across processes on a CPU), --host/--port and
# --served-model-name come from ServerProcess.
ASCEND_FLAGS = [
    "--max-num-seqs=256", "--max-model-len=4096", "--max-num-batched-tokens=4096", "--tensor-parallel-size=1",
    "--block-size=128", "--gpu-memory-utilization=0.9", "--num-scheduler-steps=8", "--multi-step-stream-outputs=false",
    "--trust-remote-code", "--enforce-eager", "--dtype", "float32", "--distributed-executor-backend", "mp",
    "--disable-async-output-proc", "--enable-prefix-caching",
]
ASCEND_ENV = {
    "ASCEND_RT_VISIBLE_DEVICES": "0", "VLLM_IMAGE_FETCH_TIMEOUT": "100", "VLLM_ENGINE_ITERATION_TIMEOUT_S": "600",
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True", "USE_PFA_HIGH_PRECISION_MODE": "1",
    "USE_IFA_HIGH_PRECISION_MODE": "1", "HCCL_OP_EXPANSION_MODE": "AIV",
}
ALPACA_NAME = "chinese-llama-alpaca-2"

PROMPTS = [f"{word} the model serves tokens {i}" for i, word in enumerate(
    "hello world json kubernetes 你好 boat rope knot schema object array string number true false null "
    "name value key list".split()
)][:20]


@pytest.fixture(scope="module")
def ascend_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with a 4096-token position limit, so --max-model-len=4096 stands as written,
    and its chat template as a file for --chat-template."""
    folder = tmp_path_factory.mktemp("ascend") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (folder / "config.json").write_text(json.dumps(config))
    template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    (folder.parent / "template.jinja").write_text(template)
    return folder


@pytest.fixture(scope="module")
def ascend_server(ascend_model, tmp_path_factory):
    template = str(ascend_model.parent / "template.jinja")
    server = ServerProcess(
        ascend_model, *ASCEND_FLAGS, "--chat-template", template, log_dir=tmp_path_factory.mktemp("logs"), env=ASCEND_ENV
    )
    try:
        server.wait_ready(timeout=240)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(ascend_server):
    with httpx.Client(base_url=ascend_server.url, timeout=180) as c:
        yield c


@pytest.fixture(scope="module")
def llm(ascend_model):
    with LLM(str(ascend_model), device="cpu", max_model_len=4096, max_num_seqs=32, kv_cache_memory=64 * 2**20) as model:
        yield model


def completion(client, **body) -> dict:
    resp = client.post("/v1/completions", json={"model": MODEL, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_the_ascend_flag_list_serves_and_logs_what_each_setting_does(ascend_server, client):
    assert client.get("/health").status_code == 200
    log = ascend_server.log()
    for line in (
        "--enforce-eager: accepted", "--disable-async-output-proc: accepted", "--distributed-executor-backend mp",
        "--num-scheduler-steps 8", "a run's tokens at once", "engine iteration timeout 600 s",
        "ASCEND_RT_VISIBLE_DEVICES=0: honoured by the NPU runtime", "PYTORCH_NPU_ALLOC_CONF=expandable_segments:True",
        "VLLM_IMAGE_FETCH_TIMEOUT=100: no effect", "HCCL_OP_EXPANSION_MODE=AIV",
    ):
        assert line in log, line
    assert "unrecognized arguments" not in log


def test_generate_greedy_body_equals_completions(client):
    resp = client.post("/generate", json=ASCEND_GENERATE)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"text"} and len(body["text"]) == 1
    reference = completion(client, prompt="hello", max_tokens=100, temperature=0, ignore_eos=False, presence_penalty=2)
    assert body["text"][0] == "hello" + reference["choices"][0]["text"]
    assert len(body["text"][0]) > len("hello")


def test_generate_beam_body_returns_best_of_beams_ranked_as_completions(client):
    resp = client.post("/generate", json=ASCEND_GENERATE_BEAM)
    assert resp.status_code == 200, resp.text
    texts = resp.json()["text"]
    assert len(texts) == ASCEND_GENERATE_BEAM["best_of"]
    reference = completion(
        client, prompt="hello", max_tokens=100, temperature=0, top_p=1, top_k=-1, ignore_eos=False,
        use_beam_search=True, n=2, best_of=2, length_penalty=2,
    )
    ranked = [c["text"] for c in sorted(reference["choices"], key=lambda c: c["index"])]
    assert texts == ["hello" + text for text in ranked]
    assert texts[0] != texts[1]


def test_generate_streams_cumulative_objects_ending_with_the_full_text(client):
    final = client.post("/generate", json=ASCEND_GENERATE).json()["text"]
    with client.stream("POST", "/generate", json={**ASCEND_GENERATE, "stream": True}) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line]
    objects = [json.loads(line) for line in lines]
    assert len(objects) > 1
    for before, after in zip(objects, objects[1:], strict=False):
        assert set(after) == {"text"} and after["text"][0].startswith(before["text"][0])
    assert objects[-1]["text"] == final


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"prompt": "hello", "max_tokenz": 5}, "max_tokenz", "not permitted"),
        ({"max_tokens": 5}, "prompt", "required"),
        ({"prompt": "hello", "temperature": -1}, "temperature", "greater than or equal"),
        ({"prompt": "hello", "best_of": 2, "stream": True}, "best_of", "cannot be streamed"),
        ({"prompt": "hello", "max_tokens": 5000}, None, "4096"),
        ({"prompt": "hello", "logprobs": 2}, "logprobs", "--enable-logprob"),
    ],
)
def test_generate_refuses_bad_bodies_with_a_400_naming_the_field(client, body, param, words):
    error = error_of(client.post("/generate", json=body), 400)
    if param is not None:
        assert param in (error["param"] or "") + error["message"]
    assert words in error["message"].lower()


def test_llm_generate_over_20_prompts_equals_the_servers_greedy_outputs(client, llm, capfd):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    assert "Processed prompts" in capfd.readouterr().err  # a batch this long shows its progress bar
    reference = completion(client, prompt=PROMPTS, temperature=0, max_tokens=12, return_token_ids=True)
    choices = sorted(reference["choices"], key=lambda c: c["index"])
    assert len(outs) == len(choices) == 20
    for prompt, out, choice in zip(PROMPTS, outs, choices, strict=True):
        assert out.prompt == prompt
        assert out.prompt_token_ids == choice["prompt_token_ids"]
        assert out.outputs[0].token_ids == choice["completion_token_ids"]
        assert out.outputs[0].text == choice["text"]
        assert out.outputs[0].finish_reason == choice["finish_reason"]


def test_llm_beam_search_ranks_the_beams_as_the_server_does(client, llm):
    params = SamplingParams(temperature=0, max_tokens=8, n=2, best_of=2, use_beam_search=True, length_penalty=2)
    out = llm.generate("hello", params)[0]
    served = completion(client, prompt="hello", temperature=0, max_tokens=8, n=2, best_of=2, use_beam_search=True,
                        length_penalty=2)
    assert [o.text for o in out.outputs] == [c["text"] for c in sorted(served["choices"], key=lambda c: c["index"])]


def test_llm_chat_applies_the_chat_template_as_the_server_does(client, llm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=10))[0]
    served = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 10})
    assert served.status_code == 200, served.text
    assert out.outputs[0].text == served.json()["choices"][0]["message"]["content"]
    tokenized = client.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert out.prompt_token_ids == tokenized["tokens"]
    kwargs = {"enable_thinking": False}
    thinking_off = llm.chat(messages, SamplingParams(temperature=0, max_tokens=2), chat_template_kwargs=kwargs)[0]
    assert thinking_off.prompt.endswith("<think>\n\n</think>\n\n")
    tokenized = client.post("/tokenize", json={"model": MODEL, "messages": messages, "chat_template_kwargs": kwargs}).json()
    assert thinking_off.prompt_token_ids == tokenized["tokens"]


def test_the_alpaca_demo_launch_serves(tiny_model_dir, tmp_path_factory):
    # The demo's command line; --model, --host and --port come from ServerProcess (a free port).
    server = ServerProcess(
        tiny_model_dir, "--tokenizer-mode", "slow", "--served-model-name", ALPACA_NAME,
        "--tokenizer", str(tiny_model_dir), "--tensor-parallel-size", "1", log_dir=tmp_path_factory.mktemp("alpaca"),
    )
    try:
        server.wait_ready(timeout=240)
        with httpx.Client(base_url=server.url, timeout=120) as c:
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [ALPACA_NAME]
            resp = c.post("/v1/completions", json={"model": ALPACA_NAME, "prompt": "告诉我中国的首都在哪里", "max_tokens": 8})
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["text"]
        assert "--tokenizer-mode slow:" in server.log()
    finally:
        server.stop()


def test_the_generate_batch_command_writes_the_servers_answers_in_input_order(client, ascend_model, tmp_path):
    lines = [
        {"id": "a", "prompt": PROMPTS[0]},
        {"id": "b", "messages": [{"role": "user", "content": "name a colour"}], "max_tokens": 6},
        {"id": "c", "prompt": PROMPTS[1], "max_tokens": 4, "stop": ["zzz"]},
    ]
    source, target = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "bowline_runtime", "generate", "--model", str(ascend_model), "--device", "cpu",
         "--max-model-len", "4096", "--kv-cache-memory", str(64 * 2**20), "--temperature", "0", "--max-tokens", "8",
         "--input", str(source), "--output", str(target)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == ["a", "b", "c"]
    first = completion(client, prompt=PROMPTS[0], temperature=0, max_tokens=8)["choices"][0]
    assert records[0]["outputs"][0]["text"] == first["text"] and len(records[0]["outputs"][0]["token_ids"]) == 8
    chat = client.post("/v1/chat/completions", json={"model": MODEL, "messages": lines[1]["messages"], "temperature": 0, "max_tokens": 6})
    assert records[1]["outputs"][0]["text"] == chat.json()["choices"][0]["message"]["content"]
    assert len(records[2]["outputs"][0]["token_ids"]) == 4 and records[2]["outputs"][0]["finish_reason"] == "length"
