"""The code's style is checked with the tests, so CI's one command covers it: ruff's formatter and
linter (import order, line length, pyflakes) over the repository, mypy over the typed core."""

from __future__ import annotations

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
