"""`python -m bowline_runtime serve` refuses bad flags and environment variables before loading anything:
exit code 2 and a message naming the setting and what it accepts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BOWLINE_")}
    return subprocess.run(
        [sys.executable, "-m", "bowline_runtime", "serve", *args],
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    # Never read: every case fails while checking the configuration.
    return tmp_path


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (["--tool-call-parser", "nope"], {}, "--tool-call-parser: unknown parser 'nope'; choose one of ['hermes', "),
        (["--reasoning-parser", "nope"], {}, "--reasoning-parser: unknown parser 'nope'; choose one of ['deepseek_r1', 'qwen3'"),
        ([], {"BOWLINE_TOOL_CALL_PARSER": "nope"}, "--tool-call-parser: unknown parser 'nope'"),
        (["--port", "notanumber"], {}, "--port: cannot read 'notanumber' (expected an integer)"),
        (["--gpu-memory-utilization", "most"], {}, "--gpu-memory-utilization: cannot read 'most' (expected a number)"),
        (["--dtype", "float8"], {}, "--dtype: cannot read 'float8' (choose one of ['auto', 'float32', 'float16', 'bfloat16'])"),
        ([], {"BOWLINE_MAX_MODEL_LEN": "abc"}, "BOWLINE_MAX_MODEL_LEN: cannot read 'abc' (expected an integer)"),
        ([], {"BOWLINE_MAX_MODEL_LEN": "0"}, "--max-model-len must be >= 1, got 0"),
    ],
)
def test_bad_settings_exit_2_naming_the_setting(model_dir, flags, env, message):
    result = serve("--model", str(model_dir), *flags, env=env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_exits_2_and_names_the_flag_and_variable():
    result = serve()
    assert result.returncode == 2
    assert "--model is required (or set BOWLINE_MODEL)" in result.stderr


def test_a_flag_wins_over_its_environment_variable(model_dir):
    # The bad environment value is never read because the flag is given; the bad parser still fails.
    result = serve("--model", str(model_dir), "--max-model-len", "64", "--tool-call-parser", "nope", env={"BOWLINE_MAX_MODEL_LEN": "abc"})
    assert result.returncode == 2
    assert "BOWLINE_MAX_MODEL_LEN" not in result.stderr and "--tool-call-parser: unknown parser 'nope'" in result.stderr


def test_model_from_the_environment_counts(model_dir):
    result = serve("--port", "x", env={"BOWLINE_MODEL": str(model_dir)})
    assert result.returncode == 2
    assert "--port: cannot read 'x'" in result.stderr and "--model is required" not in result.stderr


def test_misspelt_boolean_env_is_refused_not_read_as_false():
    from bowline_runtime.config import build_parser, config_from_args

    args = build_parser().parse_args(["--model", "m"])
    with pytest.raises(ValueError, match="BOWLINE_ENABLE_LOGPROB.*expected true or false"):
        config_from_args(args, {"BOWLINE_ENABLE_LOGPROB": "ture"})
    assert config_from_args(args, {"BOWLINE_ENABLE_LOGPROB": "off"}).enable_logprob is False
    assert config_from_args(args, {"BOWLINE_ENABLE_LOGPROB": "Yes"}).enable_logprob is True
