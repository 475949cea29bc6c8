"""Errors from the engine core process come back as the class the routes map to a status code."""

from __future__ import annotations

import pytest
from bowline_runtime.engine.async_engine import EngineDeadError, EngineStepError
from bowline_runtime.engine.core_client import rebuild_error


def test_a_rejection_keeps_its_class_message_and_param():
    RequestRejected = pytest.importorskip("bowline_runtime.engine.errors").RequestRejected  # noqa: N806
    error = rebuild_error("bowline_runtime.engine.errors", "RequestRejected", "bad regex", "guided_regex", True)
    assert type(error) is RequestRejected
    assert str(error) == "bad regex" and error.param == "guided_regex"


def test_a_plain_value_error_stays_a_value_error():
    error = rebuild_error("builtins", "ValueError", "prompt is empty", None, True)
    assert type(error) is ValueError and str(error) == "prompt is empty"


def test_an_unknown_client_error_class_falls_back_to_value_error():
    error = rebuild_error("somewhere.else", "Odd", "nope", None, True)
    assert type(error) is ValueError and str(error) == "nope"


def test_internal_errors_are_not_client_errors():
    assert type(rebuild_error("builtins", "RuntimeError", "boom", None, False)) is EngineStepError
    assert type(rebuild_error("x", "EngineDeadError", "gone", None, False)) is EngineDeadError
