"""Quantized checkpoints served by the real server: greedy tokens are transformers' generate() on the float
model dequantized here from the same checkpoint (the formats' formulas written out in this file), and
the logits of one prefill match that model's; AWQ with two tensor-parallel ranks gives the same
tokens; a bad checkpoint stops the server at start-up with the tensor's name."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI

MAX_NEW = 24
PROMPTS = ["The quick brown fox", "Once upon a time, in a land", "1, 2, 3,"]
# A top-two logit gap under this is a tie that the two sides' summation orders may break differently.
# W8A8 rounds every activation to int8 per token: a value our products put a hair to the other side of
# a rounding boundary moves by a whole int8 step, so its ties are wider.
NEAR_TIE = {"awq": 0.01, "int8": 0.01, "w8a8": 0.05}
# Prefill logits against the dequantized float model (tiny model, logits up to ~4; measured max error
# 3e-6): float32 with another summation order; W8A8 may also meet an activation rounded the other way.
LOGIT_ATOL = {"awq": 1e-4, "int8": 1e-4, "w8a8": 1e-3}
NIBBLE_OF_COLUMN = [0, 4, 1, 5, 2, 6, 3, 7]  # AutoAWQ: column j of each 8-column word is in this nibble


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    from bowline_runtime.tools.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("quantized")
    return {"awq": build_tiny_model(root / "awq", quantization="awq"),
            "awq-qwen2": build_tiny_model(root / "awq-qwen2", arch="qwen2", quantization="awq"),  # q/k/v biases
            "w8a8": build_tiny_model(root / "w8a8", quantization="w8a8"), "int8": tiny_model_dir}


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    words = packed.to(torch.int64) & 0xFFFFFFFF
    return torch.stack([(words >> (4 * NIBBLE_OF_COLUMN[j])) & 0xF for j in range(8)], -1).reshape(packed.shape[0], -1)


def _fake_quant_tokens(x: torch.Tensor) -> torch.Tensor:
    scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def reference_model(path: Path, method: str):
    """The float32 model transformers runs, its weights dequantized from the checkpoint by this file's formulas."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        delattr(config, "quantization_config")
    tensors = load_file(str(path / "model.safetensors"))
    state, act_quant = {}, []
    for name, t in tensors.items():
        prefix = name.rsplit(".", 1)[0]
        if name.endswith(".qweight"):
            g = qc["group_size"]
            q, z = _unpack(t).float(), _unpack(tensors[f"{prefix}.qzeros"]).float()
            s = tensors[f"{prefix}.scales"].float()
            state[f"{prefix}.weight"] = ((q - z.repeat_interleave(g, 0)) * s.repeat_interleave(g, 0)).t()
        elif name.endswith((".qzeros", ".scales", ".weight_scale")):
            continue
        elif t.dtype == torch.int8:
            state[name] = t.float() * tensors[f"{prefix}.weight_scale"].float().reshape(-1, 1)
            act_quant.append(prefix)
        elif method == "int8" and name.startswith("model.layers.") and name.endswith("_proj.weight"):
            scale = t.abs().amax(1, keepdim=True) / 127  # symmetric per output channel, as --quantization int8
            state[name] = torch.clamp(torch.round(t / scale), -127, 127) * scale
        else:
            state[name] = t.float()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state)
    for prefix in act_quant:
        model.get_submodule(prefix).register_forward_pre_hook(lambda _m, args: (_fake_quant_tokens(args[0]),))
    return model.eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir: Path, log_path: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bowline_runtime", "serve", "--model", str(model_dir), "--served-model-name", "tiny",
             "--port", str(port), "--device", "cpu", *extra],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return proc, port


def _wait_healthy(proc: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(log_path.read_text(errors="replace")[-3000:])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _hf_greedy(model, ids: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
            return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
        )
    return out.sequences[0, len(ids):].tolist(), [step[0] for step in out.logits]


def _assert_same_greedy(ours: list[int], theirs: list[int], logits: list[torch.Tensor], near_tie: float) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            top2 = torch.topk(logits[i].float(), 2).values
            gap = float(top2[0] - top2[1])
            assert gap < near_tie, f"diverged at output token {i}: {a} != {b} with a logit gap of {gap:.4f}"
            return
    assert len(ours) == len(theirs)


@pytest.mark.parametrize(("method", "flags"), [
    ("awq", ()),  # --quantization auto (the default) follows config.json
    ("awq", ("--quantization", "awq", "--tensor-parallel-size", "2")),
    ("w8a8", ("--quantization", "smoothquant")),
    ("int8", ("--quantization", "int8")),
], ids=["awq", "awq-tp2", "w8a8", "int8"])
def test_quantized_server_answers_with_the_dequantized_models_greedy_tokens(model_dirs, tmp_path, method, flags):
    from transformers import AutoTokenizer

    model_dir = model_dirs[method]
    log_path = tmp_path / "server.log"
    proc, port = _start(model_dir, log_path, *flags)
    try:
        _wait_healthy(proc, port, log_path)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        reference = reference_model(model_dir, method)
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            reply = client.completions.create(
                model="tiny", prompt=ids, max_tokens=MAX_NEW, temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )
            ours = reply.choices[0].model_extra["completion_token_ids"]
            theirs, logits = _hf_greedy(reference, ids)
            _assert_same_greedy(ours, theirs, logits, NEAR_TIE[method])
    finally:
        _stop(proc)
    output = log_path.read_text(errors="replace")
    assert "Traceback" not in output, output[-2000:]
    assert f"quantization {method}" in output


@pytest.mark.parametrize("folder", ["awq", "awq-qwen2", "w8a8", "int8"])
def test_prefill_logits_match_the_dequantized_model(model_dirs, folder):
    from bowline_runtime.devices.cpu import CpuDevice
    from bowline_runtime.models import loader
    from bowline_runtime.models.attention import AttentionMetadata, PrefillSpan, head_dim
    from bowline_runtime.models.packed_decoder import PackedDecoder

    path, method = model_dirs[folder], folder.split("-")[0]
    config = loader.load_config(str(path), False)
    ours = loader.load_model(str(path), config, torch.float32, "auto", False,
                             quantization="int8" if method == "int8" else "auto")
    decoder = PackedDecoder(ours, CpuDevice().fused_ops(torch.float32))
    CpuDevice().optimize_model(ours)  # the quantized CPU kernels, as the server runs them
    ids = torch.randint(300, 2000, (29,), generator=torch.Generator().manual_seed(3))
    n = ids.shape[0]
    shape = (config.num_key_value_heads, 64, head_dim(config))
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), decode_groups=[], block_size=16, prefills=[PrefillSpan(0, n, n, None)],
        kv_caches=[(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)],
    )
    with torch.inference_mode():
        got = decoder(ids, torch.arange(n), torch.arange(n), meta)
        want = reference_model(path, method)(ids.unsqueeze(0)).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=LOGIT_ATOL[method])


def test_bad_checkpoint_stops_the_server_naming_the_tensor(model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(model_dirs["awq"], broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.scales"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    json.loads((broken / "config.json").read_text())  # still a readable config: only the tensor is missing
    log_path = tmp_path / "server.log"
    proc, _ = _start(broken, log_path)
    try:
        assert proc.wait(timeout=120) == 1
    finally:
        _stop(proc)
    assert "model.layers.0.mlp.up_proj.scales" in log_path.read_text(errors="replace")
