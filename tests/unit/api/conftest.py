"""An in-process app over the FakeEngine, driven by Starlette's TestClient (lifespan included)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from api_fakes import MODEL, FakeEngine, wait_ready
from bowline_runtime.api.app import build_app
from bowline_runtime.config import EngineConfig
from fastapi.testclient import TestClient


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture
def make_client(tokenizer) -> Iterator[Callable[..., tuple[TestClient, FakeEngine]]]:
    """make_client(**config_overrides) -> (ready client, its fake engine)."""
    stack = []

    def make(engine: FakeEngine | None = None, **overrides) -> tuple[TestClient, FakeEngine]:
        engine = engine or FakeEngine(tokenizer)
        config = EngineConfig(model="/models/tiny", served_model_name=MODEL, **overrides)
        client = TestClient(build_app(config, engine_factory=lambda _: engine))
        client.__enter__()
        stack.append(client)
        wait_ready(client)
        return client, engine

    yield make
    for client in stack:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client(enable_logprob=True)[0]
