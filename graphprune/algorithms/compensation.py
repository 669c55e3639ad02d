"""Compensation arithmetic shared by the frontends: what removed input channels contributed.

When channels are pruned, each consumer loses ``W[:, removed] @ mean(x[removed])`` on average;
adding it to the bias keeps the layer's expected output (the frontends read the means from
their own calibration runs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch

from graphprune.algorithms.nm import CONV1D, LINEAR
from graphprune.core.layers import WeightLayer

L = TypeVar("L", bound=WeightLayer)


def removed_contribution(weight: torch.Tensor, layout: str, removed: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Per output channel, the mean contribution of the ``removed`` input channels (``mean``: the
    input's mean per channel) through ``weight`` in ``layout``."""
    w = weight.detach().double()
    if layout == LINEAR:  # [out, in]
        return w[:, removed] @ mean[removed]
    if layout == CONV1D:  # [in, out]
        return mean[removed] @ w[removed, :]
    return w[:, removed].sum(tuple(range(2, w.dim()))) @ mean[removed]


def bias_corrections(
    layers: Sequence[L],
    removed_inputs: Callable[[L], torch.Tensor],
    input_means: Callable[[list[L]], Mapping[L, torch.Tensor]],
    weight: Callable[[L], torch.Tensor],
    bias: Callable[[L], tuple[str, torch.Tensor] | None],
) -> tuple[dict[str, torch.Tensor], int]:
    """Per bias (by name, in the pruned layout): what to add so that the inputs a plan removes keep
    their mean effect; and how many layers lose inputs with no bias to take it.

    The frontend says which inputs of each layer the plan removes (a bool mask), reads the mean
    input of the layers that lose some from its calibration run, and gives each layer's bias as
    (name, the output positions the plan keeps), None where the layer has no bias."""
    losing = [(layer, removed) for layer in layers if bool((removed := removed_inputs(layer)).any())]
    means = input_means([layer for layer, _ in losing])
    corrections, without_bias = {}, 0
    for layer, removed in losing:
        found = bias(layer)
        if found is None:
            without_bias += 1
            continue
        name, keep_out = found
        corrections[name] = removed_contribution(weight(layer), layer.layout, removed, means[layer])[keep_out]
    return corrections, without_bias
