"""Docs that are generated must match their generator."""

from __future__ import annotations

import os

import pytest

from graphprune.io.recipe_reference import reference_markdown
from graphprune.rules.optable import markdown
from tests.module_table import DOC, modules, splice, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_supported_ops_table_is_current():
    with open(os.path.join(ROOT, "docs", "OPS.md")) as f:
        assert f.read() == markdown(), "regenerate with: python -m graphprune.rules.optable > docs/OPS.md"


def test_recipes_reference_is_current():
    with open(os.path.join(ROOT, "docs", "RECIPES.md")) as f:
        assert f.read() == reference_markdown(), (
            "regenerate with: python -m graphprune.io.recipe_reference > docs/RECIPES.md"
        )


def test_module_table_is_current():
    text = DOC.read_text(encoding="utf-8")
    assert splice(text, table()) == text, (
        "the module table of docs/ARCHITECTURE.md is stale: run python -m tests.module_table"
    )


def test_module_table_refuses_a_module_without_docstring(tmp_path):
    package = tmp_path / "fake"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")  # no docstring: skipped, not refused
    (package / "__main__.py").write_text("print()")
    (package / "sub" / "__init__.py").write_text('"""The sub package."""')
    (package / "sub" / "one.py").write_text('"""One thing. More detail.\n\nLater paragraph."""')
    assert modules(package, "fake") == {"fake.sub": [("fake.sub", "The sub package."), ("fake.sub.one", "One thing.")]}
    (package / "sub" / "two.py").write_text('""')
    with pytest.raises(ValueError, match=r"sub[/\\]two\.py"):
        modules(package, "fake")


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path):
    """The README's first Python example is code a newcomer pastes: it must run as written."""
    import re
    import subprocess
    import sys

    with open(os.path.join(ROOT, "README.md")) as f:
        example = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)[0]
    env = {**os.environ, "PYTHONPATH": ROOT, "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "small.onnx").exists() and (tmp_path / "sparse.plan.json").exists()
