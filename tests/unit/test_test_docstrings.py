"""Every test says the behaviour it pins in a docstring (STYLE.md), so a failure reads as the broken promise."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_has_a_docstring() -> None:
    """Each `test_*` function in tests/ opens with a docstring."""
    bare = []
    for path in sorted(TESTS.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or not node.name.startswith("test_"):
                continue
            if not ast.get_docstring(node):
                bare.append(f"{path.relative_to(TESTS.parent)}:{node.lineno} {node.name}")
    assert bare == []
