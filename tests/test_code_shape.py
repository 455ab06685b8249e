"""The shape of the code, measured with ``ast`` so that it stays as docs/design.md describes it:
no function over 80 lines and no class over 300 anywhere in climseg/, and ``train.py`` (the
order of a run, top to bottom) within 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "climseg"
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 300
MAX_TRAIN_LINES = 400


def spans(kinds) -> list[tuple[str, int]]:
    """(``file:line name``, length in lines) of every definition of ``kinds`` in climseg/."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, kinds):
                where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"
                found.append((where, node.end_lineno - node.lineno + 1))
    return found


def test_no_function_over_80_lines():
    functions = spans((ast.FunctionDef, ast.AsyncFunctionDef))
    assert len(functions) > 100  # the walk found the package
    assert [f for f in functions if f[1] > MAX_FUNCTION_LINES] == []


def test_no_class_over_300_lines():
    classes = spans((ast.ClassDef,))
    assert any(name.endswith(" Trainer") for name, _ in classes)
    assert [c for c in classes if c[1] > MAX_CLASS_LINES] == []


def test_train_py_reads_within_400_lines():
    assert len((PACKAGE / "train.py").read_text().splitlines()) <= MAX_TRAIN_LINES
