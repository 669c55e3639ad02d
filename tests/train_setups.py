"""Setups for ``python -m graphprune.train`` in the tests (built the same on every rank)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphprune.train.run import Setup


def tiny() -> Setup:
    """A small MLP distilled from its dense self: the loss is a mean over rows, as the command needs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    teacher = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 16, generator=g) for _ in range(6)]

    def loss(student: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(batch)
        return F.mse_loss(student(batch), target)

    return Setup(model=model, example_inputs=(batches[0],), batches=batches, loss=loss, calibration=batches[:4])
