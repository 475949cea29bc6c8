"""One model copy over several separately started runtime processes ("nodes"), as a LeaderWorkerSet runs it.

Each node is its own `serve` process with its own --node-rank, meeting the leader over TCP on
127.0.0.1: tensor parallel across nodes, pipeline stages across nodes, and both (four processes).
Their greedy tokens are transformers' generate() on the unsharded model; then the last node is
SIGKILLed and the leader's /health must turn 503 within seconds, with the rest of the group gone.
"""

from __future__ import annotations

import os
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

MAX_NEW = 10
PROMPTS = ["The quick brown fox", "1, 2, 3,"]
# float32 all-reduces sum the shards in another order than one matmul: a top-two gap under this is a tie.
NEAR_TIE = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rendezvous_port() -> int:
    """A port whose successor (the liveness watch) is free too."""
    while True:
        port = _free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


def _start_node(model: Path, log: Path, rank: int, nnodes: int, tp: int, pp: int, master_port: int, http_port: int,
                *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bowline_runtime", "serve", "--model", str(model), "--served-model-name", "tiny",
         "--port", str(http_port), "--device", "cpu", "--tensor-parallel-size", str(tp),
         "--pipeline-parallel-size", str(pp), "--nnodes", str(nnodes), "--node-rank", str(rank),
         "--master-addr", "127.0.0.1", "--master-port", str(master_port), *extra],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def _health(base: str) -> int | None:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code
    except httpx.HTTPError:
        return None


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        with torch.inference_mode():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        out[prompt] = (ids, gen.sequences[0, len(ids):].tolist(), [step[0] for step in gen.logits])
    return out


def _assert_same_greedy(ours: list[int], theirs: list[int], logits: list[torch.Tensor]) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            top2 = torch.topk(logits[i].float(), 2).values
            gap = float(top2[0] - top2[1])
            assert gap < NEAR_TIE, f"diverged at output token {i}: {a} != {b} with a logit gap of {gap:.6f}"
            return
    assert len(ours) == len(theirs) == MAX_NEW


@pytest.mark.parametrize(("tp", "pp", "nnodes"), [(2, 1, 2), (1, 2, 2), (2, 2, 4)], ids=["tp2-2nodes", "pp2-2nodes",
                                                                                        "tp2xpp2-4nodes"])
def test_separately_started_nodes_serve_transformers_greedy_tokens_and_a_dead_node_fails_health(
    tiny_model_dir, reference, tmp_path, tp, pp, nnodes
):
    master_port, http_port = _rendezvous_port(), _free_port()
    logs = [tmp_path / f"node{r}.log" for r in range(nnodes)]
    # The workers first: they wait for the leader, as pods of a group start in any order.
    procs = [_start_node(tiny_model_dir, logs[r], r, nnodes, tp, pp, master_port, http_port)
             for r in [*range(1, nnodes), 0]]
    leader, workers = procs[-1], procs[:-1]
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and leader.poll() is None and _health(base) != 200:
            time.sleep(0.5)
        assert _health(base) == 200, logs[0].read_text(errors="replace")[-3000:]
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        for ids, theirs, logits in reference.values():
            reply = client.completions.create(
                model="tiny", prompt=ids, max_tokens=MAX_NEW, temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )
            _assert_same_greedy(reply.choices[0].model_extra["completion_token_ids"], theirs, logits)

        workers[-1].send_signal(signal.SIGKILL)  # the last node, as a pod that crashed
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < 10 and _health(base) != 503:
            time.sleep(0.2)
        assert _health(base) == 503, "the leader still reports healthy after a node died"
        assert leader.poll() is None  # it stays up to answer 503; LWS restarts the group
        for worker in workers[:-1]:  # the group goes down with it
            assert worker.wait(timeout=20) != 0
        log = logs[0].read_text(errors="replace")
        assert f"distributed group failed: rank {tp * pp - 1} (node {nnodes - 1}" in log, log[-3000:]
        reply = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2},
                           timeout=10)
        assert reply.status_code == 503
    finally:
        _stop(procs)


def test_leader_start_up_names_the_rank_that_never_joined(tiny_model_dir, tmp_path):
    log = tmp_path / "leader.log"
    leader = _start_node(tiny_model_dir, log, 0, 2, 2, 1, _rendezvous_port(), _free_port(),
                         "--distributed-init-timeout", "3")
    try:
        assert leader.wait(timeout=90) != 0  # a group that cannot form fails the pod: it is restarted
    finally:
        _stop([leader])
    output = log.read_text(errors="replace")
    assert "1 of 2 ranks did not join within 3 s: rank 1 (node 1, tp rank 1, pp stage 0)" in output, output[-3000:]
