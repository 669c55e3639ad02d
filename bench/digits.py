"""scikit-learn's digits for the benches: tensors, a fixed 1,200 / 597 split, and a training loop."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels); images ``[N, 1, 8, 8]`` in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = order[:1200], order[1200:]
    return images[train], labels[train], images[test], labels[test]


def fit(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    lr: float,
    after_step: Callable[[], None] | None = None,
) -> nn.Module:
    """Adam on cross-entropy, batches of 64 in a seeded order (``after_step`` runs after each
    optimizer step); returns the model in eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=g).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(images[idx]), labels[idx]).backward()
            optimizer.step()
            if after_step is not None:
                after_step()
    return model.eval()
