"""A real `bowline-runtime serve` process per test module, called with the official openai client."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

STARTUP_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, *flags: str) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        cmd = [sys.executable, "-m", "bowline_runtime", "serve", "--model", str(model_dir), "--served-model-name", "tiny",
               "--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port), *flags]
        self.log = open(model_dir.parent / f"server-{self.port}.log", "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=120)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[Server]:
    """The tiny model with the Hermes tool-call parser."""
    srv = Server(tiny_model_dir, "--tool-call-parser", "hermes")
    yield srv
    srv.stop()


# The tiny model's template, changed as Qwen3's thinking models behave: the generation prompt opens a
# reasoning block unless `enable_thinking` is false (which still pre-fills an empty one).
_THINK_CLOSED = "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
_THINK_OPEN = (
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def thinking_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-thinking"
    shutil.copytree(tiny_model_dir, out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    assert _THINK_CLOSED in config["chat_template"]
    config["chat_template"] = config["chat_template"].replace(_THINK_CLOSED, _THINK_OPEN)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out


@pytest.fixture(scope="module")
def thinking_server(thinking_model_dir: Path) -> Iterator[Server]:
    srv = Server(thinking_model_dir, "--reasoning-parser", "qwen3", "--tool-call-parser", "hermes")
    yield srv
    srv.stop()
