"""Issue 17: parsers/ and api/ do not import each other: parsers return their own dataclasses,
and only the API turns them into protocol objects."""

from __future__ import annotations

import ast
from pathlib import Path

import bowline_runtime

PACKAGE = Path(bowline_runtime.__file__).parent


def imported_modules(folder: str) -> set[tuple[str, str]]:
    """(file, module) for every import, top-level or inside a function, in that sub-package."""
    found = set()
    for path in (PACKAGE / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add((path.name, node.module))
            elif isinstance(node, ast.Import):
                found.update((path.name, alias.name) for alias in node.names)
    return found


def test_parsers_import_nothing_from_the_api():
    assert [pair for pair in imported_modules("parsers") if pair[1].startswith("bowline_runtime.api")] == []


def test_the_api_reaches_parsers_only_through_parsed_output():
    users = {name for name, module in imported_modules("api") if module.startswith("bowline_runtime.parsers")}
    assert users <= {"parsed_output.py"}
