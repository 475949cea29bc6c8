"""Real server processes (`python -m bowline_runtime serve ...`) for the API tests.

One process per configuration, started once and shared by the modules that need it; each waits
for /health to turn 200, and its log is printed when a test fails to start it.
"""

from __future__ import annotations

import httpx
import pytest
from api_server import ServerProcess


@pytest.fixture(scope="session")
def api_server(tiny_model_dir, tmp_path_factory):
    """The main server: logprobs enabled, everything else default."""
    server = ServerProcess(tiny_model_dir, "--enable-logprob", log_dir=tmp_path_factory.mktemp("logs"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def base_url(api_server) -> str:
    return api_server.url + "/v1"


@pytest.fixture(scope="session")
def openai_client(base_url):
    import openai

    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def http(api_server):
    with httpx.Client(base_url=api_server.url, timeout=60) as client:
        yield client
