"""Markers that select tests by what they need, and the skips that go with them.

``slow``: the long cases (the generated-architecture fuzz, real-weight models, multi-process
runs); ``pytest -m "not slow"`` is the quick loop while editing, CI runs everything.
``gpu``: needs a GPU with sparse tensor cores; skipped elsewhere, with the reason the kernels
give.  ``vision``: needs the vision extra (timm, torchvision; see the README).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long cases; deselect with -m 'not slow' for a quick loop")
    config.addinivalue_line("markers", "gpu: needs a GPU with sparse tensor cores; skipped without one")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # the long cases first (in their files' order): the workers start them early and finish on
    # short tests, instead of one worker running a long case alone at the end
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    gpu_missing: str | None = None
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            if gpu_missing is None:
                from graphprune.emit.sparse_kernels import kernel_support

                gpu_missing = kernel_support() or ""
            if gpu_missing:
                item.add_marker(pytest.mark.skip(reason=f"needs a GPU with sparse tensor cores: {gpu_missing}"))
