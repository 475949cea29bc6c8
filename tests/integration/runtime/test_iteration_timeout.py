"""VLLM_ENGINE_ITERATION_TIMEOUT_S: a step that runs longer fails the requests in flight with a
message naming the setting, and the engine reports itself dead (the server's /health turns 503)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from bowline_runtime.api.errors import to_api_error
from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.async_engine import AsyncEngine, EngineIterationTimeout
from bowline_runtime.engine.sampling_params import SamplingParams


def test_a_step_over_the_timeout_fails_its_requests_and_marks_the_engine_dead(tiny_model_dir):
    engine = AsyncEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", max_model_len=128,
                                      kv_cache_memory=8 * 2**20, engine_iteration_timeout_s=0.5))
    real_step = engine.engine.step
    calls = []

    def hanging_step():
        calls.append(time.monotonic())
        if len(calls) == 3:  # the third step hangs, as a stuck device would
            time.sleep(3)
        return real_step()

    engine.engine.step = hanging_step

    async def main():
        ids = engine.tokenizer.encode("hello world")
        started = time.monotonic()
        with pytest.raises(EngineIterationTimeout) as info:
            async for _ in engine.generate(ids, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)):
                pass
        return info.value, time.monotonic() - started

    try:
        error, waited = asyncio.run(main())
        assert waited < 2.5  # failed by the watchdog, not when the hung step came back
        assert "iteration timeout of 0.5 s" in str(error) and "VLLM_ENGINE_ITERATION_TIMEOUT_S" in str(error)
        assert not engine.is_alive
        api_error = to_api_error(error)
        assert api_error.status_code == 503 and "VLLM_ENGINE_ITERATION_TIMEOUT_S" in api_error.message
    finally:
        asyncio.run(engine.shutdown())



def test_the_engine_core_process_fails_its_requests_and_exits_on_a_step_over_the_timeout(tiny_model_dir):
    from bowline_runtime.engine.core_client import EngineCoreClient

    # 1 ms: the first step (a prefill on a CPU) already runs longer, with no hook into the core needed.
    client = EngineCoreClient(EngineConfig(model=str(tiny_model_dir), device="cpu", max_model_len=128,
                                           kv_cache_memory=8 * 2**20, engine_iteration_timeout_s=0.001))

    async def main():
        ids = client.tokenizer.encode("hello world")
        with pytest.raises(EngineIterationTimeout) as info:
            async for _ in client.generate(ids, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)):
                pass
        return info.value

    try:
        error = asyncio.run(main())
        assert "iteration timeout of 0.001 s" in str(error)
        # The client's watcher thread reaps the process too, and multiprocessing's exit status is not
        # thread-safe: a join that loses the race to it returns with the code still unknown. Poll.
        deadline = time.monotonic() + 30
        while client.process.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.process.exitcode == 1
        deadline = time.monotonic() + 10
        while client.is_alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not client.is_alive
    finally:
        asyncio.run(client.shutdown())


@pytest.mark.timeout(120)
def test_shutdown_kills_a_core_that_no_longer_reads_instead_of_hanging(tiny_model_dir):
    """A core that stopped reading (here: stopped, and the stop message has no peer to go to) must not
    hold shutdown forever on a blocked send: shutdown gives up on the message and kills the process."""
    import signal

    import zmq
    from bowline_runtime.engine.core_client import EngineCoreClient

    client = EngineCoreClient(EngineConfig(model=str(tiny_model_dir), device="cpu", max_model_len=128,
                                           kv_cache_memory=8 * 2**20))
    os.kill(client.process.pid, signal.SIGSTOP)
    client._push.close(linger=0)
    client._push = client._ctx.socket(zmq.PUSH)  # connected nowhere: a blocking send would wait for ever
    started = time.monotonic()
    asyncio.run(client.shutdown())
    assert not client.process.is_alive()
    assert time.monotonic() - started < 60
