"""Docs that are generated must match their generator."""

from __future__ import annotations

import os

from graphprune.recipe_reference import reference_markdown
from graphprune.rules.optable import markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_supported_ops_table_is_current():
    with open(os.path.join(ROOT, "docs", "OPS.md")) as f:
        assert f.read() == markdown(), "regenerate with: python -m graphprune.rules.optable > docs/OPS.md"


def test_recipes_reference_is_current():
    with open(os.path.join(ROOT, "docs", "RECIPES.md")) as f:
        assert f.read() == reference_markdown(), "regenerate with: python -m graphprune.recipe_reference > docs/RECIPES.md"
