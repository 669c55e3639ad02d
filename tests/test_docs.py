"""Docs that are generated must match their generator."""

from __future__ import annotations

import os

from graphprune.rules.optable import markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_supported_ops_table_is_current():
    with open(os.path.join(ROOT, "docs", "OPS.md")) as f:
        assert f.read() == markdown(), "regenerate with: python -m graphprune.rules.optable > docs/OPS.md"
