"""Shared driver for the samples: analyse, prune, check, print the report."""

from __future__ import annotations

import torch

import graphprune as gp
from graphprune.passes import ChannelPrune


def run(model: torch.nn.Module, example_inputs: tuple, ratio: float = 0.5, round_to: int = 8) -> gp.PruneResult:
    analysis = gp.analyze(model, example_inputs)
    print(analysis.describe(max_groups=6))
    result = gp.prune(model, example_inputs, passes=[ChannelPrune(ratio=ratio, round_to=round_to)])
    with torch.no_grad():
        before = model(*example_inputs)
        after = result.module(*example_inputs)
    assert before.shape == after.shape, (before.shape, after.shape)
    print()
    print(result.report)
    return result
