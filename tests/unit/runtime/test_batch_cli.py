"""The generate batch command reads its JSON Lines before loading anything: a bad line is an error
naming the file and line, and each line's sampling fields override the command's defaults."""

from __future__ import annotations

import pytest
from bowline_runtime.batch_cli import read_lines

DEFAULTS = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0}


def test_lines_override_the_defaults_and_blank_lines_are_skipped(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "a", "max_tokens": 4, "stop": "x"}\n\n{"messages": [{"role": "user", "content": "b"}]}\n')
    (first, p1), (second, p2) = read_lines(source, DEFAULTS)
    assert first["prompt"] == "a" and (p1.max_tokens, p1.stop, p1.temperature) == (4, ["x"], 1.0)
    assert "messages" in second and p2.max_tokens == 16


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "in.jsonl:1: not JSON"),
        ('{"prompt": "a", "messages": []}', "in.jsonl:1: give exactly one of 'prompt' or 'messages'"),
        ('{"text": "a"}', "in.jsonl:1: give exactly one of"),
        ('{"prompt": "a", "bogus": 1}', "in.jsonl:1: unknown fields ['bogus']"),
        ('{"prompt": "a", "temperature": -1}', "in.jsonl:1: temperature must be >= 0"),
    ],
)
def test_a_bad_line_names_its_file_and_number(tmp_path, line, message):
    source = tmp_path / "in.jsonl"
    source.write_text(line + "\n")
    with pytest.raises(ValueError) as info:
        read_lines(source, DEFAULTS)
    assert message in str(info.value)
