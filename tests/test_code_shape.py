"""Code shape rules that review keeps asking for, checked on the whole package."""

from __future__ import annotations

import ast
from pathlib import Path

import regap

PACKAGE = Path(regap.__file__).parent
MAX_FUNCTION_LINES = 100


def long_functions(root: Path, limit: int) -> list[str]:
    """`path:line name (N lines)` for every function or method longer than `limit` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_the_checker_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path, MAX_FUNCTION_LINES) == [f"m.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]


def test_no_function_in_regap_is_over_100_lines():
    assert long_functions(PACKAGE, MAX_FUNCTION_LINES) == []
