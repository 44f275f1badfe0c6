"""The application's functions stay short enough to read: none over 60 lines.

Every function and method (nested ones included) of train.py, model_class.py and utils/*.py,
measured with ``ast`` from its ``def`` (decorators included) to its last line, docstring and
comments counted. One test per file, so a file over the limit names itself.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60
FILES = sorted([ROOT / "train.py", ROOT / "model_class.py", *(ROOT / "utils").glob("*.py")])


def long_functions(path: Path) -> list[str]:
    """``name (N lines)`` for every function of ``path`` longer than MAX_LINES."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines = node.end_lineno - first + 1
            if lines > MAX_LINES:
                found.append(f"{node.name} ({lines} lines, from line {first})")
    return found


def test_the_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n\ndef short():\n    pass\n")
    assert long_functions(tmp_path / "long.py") == [f"long ({MAX_LINES + 1} lines, from line 1)"]


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_no_application_function_is_over_60_lines(path):
    assert long_functions(path) == []
