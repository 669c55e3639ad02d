"""Markers that select tests by what they need, the skips that go with them, and how the xdist
workers share the machine (each gets its share of the cores as torch threads; two workers with
every core each made the suite about 12% slower on 2 cores).

``slow``: the long cases (the generated-architecture fuzz, real-weight models, multi-process
runs, and the zoo sweeps beyond three representatives: ``tests.architectures.sweep``);
``pytest -m "not slow"`` is the quick loop while editing, CI runs everything.
``gpu``: needs a GPU with sparse tensor cores; skipped elsewhere, with the reason the kernels
give.  ``cuda``: needs any CUDA device (device-placement checks); skipped without one.
``vision``: needs the vision extra (timm, torchvision; see the README).
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # share the cores among the workers (and the processes their tests start), not 2x over
        threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
        os.environ["OMP_NUM_THREADS"] = threads
        import torch

        torch.set_num_threads(int(threads))
    config.addinivalue_line("markers", "slow: long cases; deselect with -m 'not slow' for a quick loop")
    config.addinivalue_line("markers", "gpu: needs a GPU with sparse tensor cores; skipped without one")
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped without one")


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
        if item.get_closest_marker("cuda") is not None:
            import torch

            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False"))
