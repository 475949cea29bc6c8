"""The real server in bfloat16 and float16 on the CPU: it starts on any CPU (oneDNN packs half-precision
weights only with AVX-512 or avx_ne_convert; elsewhere torch's own Linear serves), answers through the
official openai client, and its greedy tokens are transformers' generate() in the same dtype."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from openai import OpenAI

# Half-precision logits are coarse (bfloat16 keeps 8 significant bits: steps of ~0.03 near 4.0), and our
# kernels sum in another order than transformers': a top-two gap under this is a tie either side may break.
NEAR_TIE = {torch.bfloat16: 0.1, torch.float16: 0.02}
MAX_NEW = 24
PROMPTS = ["The quick brown fox", "Once upon a time, in a land", "1, 2, 3,"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            assert gap < near_tie, f"diverged at output token {i}: {a} != {b} with a logit gap of {gap:.3f}"
            return
    assert len(ours) == len(theirs)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_half_precision_server_answers_with_transformers_greedy_tokens(tiny_model_dir, tmp_path, dtype_name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    port = _free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bowline_runtime", "serve", "--model", str(tiny_model_dir), "--served-model-name",
             "tiny", "--port", str(port), "--device", "cpu", "--dtype", dtype_name],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            assert proc.poll() is None, log_path.read_text(errors="replace")[-2000:]
            client = OpenAI(base_url=f"{base}/v1", api_key="unused")
            tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
            reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
            for prompt in PROMPTS:
                ids = tokenizer.encode(prompt)
                reply = client.completions.create(
                    model="tiny", prompt=ids, max_tokens=MAX_NEW, temperature=0,
                    extra_body={"ignore_eos": True, "return_token_ids": True},
                )
                ours = reply.choices[0].model_extra["completion_token_ids"]
                theirs, logits = _hf_greedy(reference, ids)
                _assert_same_greedy(ours, theirs, logits, NEAR_TIE[dtype])
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    output = log_path.read_text(errors="replace")
    assert "Traceback" not in output, output[-2000:]
    assert f"dtype {dtype_name}" in output
