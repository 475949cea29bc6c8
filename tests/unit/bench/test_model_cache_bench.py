"""bench.model_cache_bench: the runtime's own loading figure is read from its log, and the report says what ran."""

from __future__ import annotations

import asyncio
import logging

from bowline_runtime.api import app
from bowline_runtime.api.state import ServerState
from bowline_runtime.config import EngineConfig
from bowline_runtime.engine.outputs import EngineStats

from bench.model_cache_bench import _LOADING_TOOK, report


def test_reads_the_runtimes_loading_line(caplog, monkeypatch) -> None:
    # The line as the server logs it (api/app.py), not a copy of its format.
    class Engine:
        max_model_len = 64

        def stats(self) -> EngineStats:
            return EngineStats(num_running=0, num_waiting=0, num_free_blocks=4, num_total_blocks=4)

    config = EngineConfig(model="/models/tiny", load_format="dummy")
    state = ServerState(config)
    monkeypatch.setattr(state, "attach", lambda engine: None)
    monkeypatch.setattr(app, "_describe", lambda engine, config: "described")
    with caplog.at_level(logging.INFO):
        asyncio.run(app._load_engine(state, lambda cfg: Engine(), lambda exc: None))
    (line,) = [r.getMessage() for r in caplog.records if "loading took" in r.getMessage()]
    match = _LOADING_TOOK.search(line)
    assert match and float(match.group(1)) >= 0
    assert "dummy weights from /models/tiny" in line


def test_report_names_both_starts_and_the_ratio() -> None:
    text = report({"preset": "tiny", "dtype": "float32", "repeats": 2, "weights_bytes": 2 * 2**30,
                   "median_ready_s": {"dummy": 10.0, "folder": 15.0}, "folder_over_dummy": 1.5})
    assert "weights 2.00 GiB" in text and "median of 2" in text
    assert "| `--load-format dummy` (no weight I/O) | 10.0 |" in text
    assert "| weights from a folder on disk (a filled cache) | 15.0 |" in text
    assert "folder / dummy: 1.50x" in text
