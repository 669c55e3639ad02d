"""Docs that are generated must match their generator."""

from __future__ import annotations

import os

from graphprune.io.recipe_reference import reference_markdown
from graphprune.rules.optable import markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_supported_ops_table_is_current():
    with open(os.path.join(ROOT, "docs", "OPS.md")) as f:
        assert f.read() == markdown(), "regenerate with: python -m graphprune.rules.optable > docs/OPS.md"


def test_recipes_reference_is_current():
    with open(os.path.join(ROOT, "docs", "RECIPES.md")) as f:
        assert f.read() == reference_markdown(), "regenerate with: python -m graphprune.io.recipe_reference > docs/RECIPES.md"


def test_readme_python_example_runs(tmp_path):
    """The README's first Python example is code a newcomer pastes: it must run as written."""
    import re
    import subprocess
    import sys

    with open(os.path.join(ROOT, "README.md")) as f:
        example = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)[0]
    env = {**os.environ, "PYTHONPATH": ROOT, "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "small.onnx").exists() and (tmp_path / "sparse.plan.json").exists()
