"""Compensation arithmetic shared by the frontends: what removed input channels contributed.

When channels are pruned, each consumer loses ``W[:, removed] @ mean(x[removed])`` on average;
adding it to the bias keeps the layer's expected output (the means come from the frontend's
calibration runner, :class:`graphprune.core.frontend.Frontend`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from graphprune.algorithms.moments import input_moments
from graphprune.algorithms.nm import CONV1D, LINEAR

if TYPE_CHECKING:
    from graphprune.core.frontend import Frontend
    from graphprune.core.groups import Analysis
    from graphprune.core.plan import Plan


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
    state: Frontend[Any], analysis: Analysis, plan: Plan, calibration: Any
) -> tuple[dict[str, torch.Tensor], int]:
    """Per bias (by name, in the pruned layout): what to add so that the input channels ``plan``
    removes keep their mean effect on each layer's output; and how many layers lose inputs with no
    bias to take it.  Read from ``state`` before the plan is applied (the means are those of the
    dense model's calibration run).  Grouped convolutions are left alone."""
    masks = plan.masks(analysis)
    spaces = analysis.spaces
    layers = [layer for layer in state.weight_layers()[0] if not layer.grouped]
    losing = [
        (layer, removed)
        for layer in layers
        if bool((removed := ~spaces.keep_mask(state.input_channels(layer), masks)).any())
    ]
    moments = input_moments(state, [layer for layer, _ in losing], calibration) if losing else {}
    corrections, without_bias = {}, 0
    for layer, removed in losing:
        name = state.layer_bias(layer)
        if name is None:
            without_bias += 1
            continue
        keep_out = spaces.keep_mask(analysis.tensors[name][1][0], masks)
        mean = moments[layer.weight][0]
        corrections[name] = removed_contribution(state.weight(layer), layer.layout, removed, mean)[keep_out]
    return corrections, without_bias
