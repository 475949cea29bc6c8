"""The operator's command line: log flags and the JSON log lines collectors parse."""

from __future__ import annotations

import json
import logging

import pytest
from bowline_operator.__main__ import JsonFormatter, parse_args


def test_log_flags_default_to_plain_info() -> None:
    args = parse_args([])
    assert (args.log_format, args.log_level) == ("plain", "info")


def test_verbose_is_an_alias_for_debug() -> None:
    assert parse_args(["--verbose"]).log_level == "debug"
    assert parse_args(["--log-level", "error"]).log_level == "error"


def test_log_format_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOWLINE_OPERATOR_LOG_FORMAT", "json")
    assert parse_args([]).log_format == "json"
    assert parse_args(["--log-format", "plain"]).log_format == "plain"  # the flag wins
    monkeypatch.setenv("BOWLINE_OPERATOR_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit):
        parse_args([])


@pytest.mark.parametrize("argv", [["--log-format", "logfmt"], ["--log-level", "trace"]])
def test_unknown_log_settings_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_json_lines_carry_time_level_logger_message_and_object() -> None:
    record = logging.LogRecord("kopf.objects", logging.WARNING, __file__, 1, "Invalid spec: %s", ("tp=3",), None)
    record.k8s_ref = {"apiVersion": "serving.bowline.dev/v1alpha1", "kind": "InferenceService",
                      "name": "chat", "namespace": "ml"}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["logger"] == "kopf.objects"
    assert entry["message"] == "Invalid spec: tp=3" and entry["object"] == "ml/chat"
    assert entry["time"].endswith("+00:00")


def test_json_exceptions_stay_on_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        record = logging.LogRecord("bowline", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in entry["exception"]
