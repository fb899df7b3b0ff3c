"""The house: rooms with a docstring each, imports only downward (import-linter's contracts
in pyproject.toml), no module over 400 lines, no class over 300, at most 10 top-level modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trainkit_tracking"
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 300
MAX_TOP_MODULES = 10


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_import_contracts_hold() -> None:
    """No upward import and no circle, lazy and TYPE_CHECKING imports included."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("import-linter is not installed: pip install -e '.[dev]'")
    done = subprocess.run(
        [str(lint), "--no-cache"],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_modules_and_classes_stay_small() -> None:
    too_big = []
    for path in _modules():
        source = path.read_text(encoding="utf-8")
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{path.relative_to(PACKAGE)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_big.append(f"{path.relative_to(PACKAGE)}: class {node.name} {size} lines")
    assert not too_big, too_big


def test_rooms_say_what_they_own_and_may_import() -> None:
    rooms = [p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert len(rooms) >= 7
    for room in rooms:
        doc = ast.get_docstring(ast.parse((room / "__init__.py").read_text(encoding="utf-8")))
        assert doc, f"{room.name}/__init__.py has no docstring"
        if room.name.startswith("_"):
            assert "import" in doc, f"{room.name}: the docstring does not say what it may import"
        nested = [p for p in room.iterdir() if p.is_dir() and p.name != "__pycache__"]
        assert not nested, f"{room.name} has a third level: {nested}"


def test_few_modules_at_the_top() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top
