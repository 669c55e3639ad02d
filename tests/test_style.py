"""The code's style is checked with the tests, so CI's one command covers it: ruff's formatter and
linter (import order, line length, pyflakes) over the repository, mypy over the typed core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "command",
    [["ruff", "format", "--check", "."], ["ruff", "check", "."], ["mypy"]],
    ids=["ruff-format", "ruff-check", "mypy"],
)
def test_style(command):
    result = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"{' '.join(command)} fails (run it in the repository root):\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
    )


def _dataclasses(paths: list[Path]) -> set[str]:
    """Names of the classes that are dataclasses: decorated, or derived from one."""
    found: set[str] = set()
    classes = [node for p in paths for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ClassDef)]
    for node in classes:
        decorators = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
        if any(isinstance(d, ast.Name) and d.id == "dataclass" for d in decorators):
            found.add(node.name)
    grew = True
    while grew:
        grew = False
        for node in classes:
            if node.name not in found and any(isinstance(b, ast.Name) and b.id in found for b in node.bases):
                found.add(node.name)
                grew = True
    return found


def test_wide_dataclasses_are_built_with_keywords():
    """A call with four or more positional arguments to a dataclass breaks silently when a field is
    added or reordered; build them with keywords."""
    paths = [
        p for folder in ("graphprune", "passes", "tests", "bench", "samples") for p in (ROOT / folder).rglob("*.py")
    ]
    names = _dataclasses(paths)
    positional = []
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and len(node.args) >= 4:
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if func in names:
                    positional.append(f"{p.relative_to(ROOT)}:{node.lineno} {func}")
    assert not positional, f"dataclasses built positionally: {positional}"
