"""Compensation after structured pruning, without retraining.

``batchnorm``: removing channels upstream shifts the statistics every later BatchNorm sees, while
its running mean/var still describe the dense model.  Re-estimating them on calibration data
(every BatchNorm in train mode at once, cumulative averages over the batches, nothing else
touched) is the cheapest recovery there is.

``bias``: a removed input channel ``c`` of a layer contributed ``W[:, c] * x_c``; its expected
value ``W[:, c] * E[x_c]`` (measured on calibration data at the layer's input, in the dense model)
is folded into the layer's bias (FLAP's compensation).  Exact when the removed channels are
constant on the data; layers without a bias are left as they are and counted.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from graphprune.analysis import Analysis
from graphprune.calibration import consumers, input_moments
from graphprune.capture import eval_mode, normalize_inputs, tensor_at
from graphprune.plan import Plan
from graphprune.sparsity import CONV, CONV1D, LINEAR


def reestimate_batchnorm(model: nn.Module, calibration: list[Any]) -> int:
    """Replace every BatchNorm's running statistics by their average over ``calibration``; returns how many."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    with eval_mode(model), torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch weighs the same
            m.train()
        try:
            for batch in calibration:
                args, kwargs = normalize_inputs(batch)
                model(*args, **kwargs)
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
    return len(norms)


def bias_corrections(analysis: Analysis, model: nn.Module, plan: Plan,
                     calibration: list[Any]) -> tuple[dict[str, torch.Tensor], int]:
    """Per bias (by name, in the pruned layout): what to add so removed inputs keep their mean effect.

    Computed on the dense ``model`` before the plan is applied.  Also returns how many layers lose
    inputs but have no bias to take the correction.
    """
    masks = plan.masks(analysis)
    spaces = analysis.spaces
    layers = [c for c in consumers(analysis) if not c.matmul and (c.layout != CONV or c.groups == 1)]
    losing = []
    for layer in layers:
        x_atom = analysis.tensors[layer.weight][1][0 if layer.layout == CONV1D else 1]
        removed = ~spaces.keep_mask(x_atom, masks)
        if bool(removed.any()):
            losing.append((layer, removed))
    moments = input_moments(model, [layer for layer, _ in losing], calibration)
    corrections, without_bias = {}, 0
    for layer, removed in losing:
        bias_name = layer.module + ".bias" if layer.module else "bias"
        if bias_name not in analysis.tensors or tensor_at(model, bias_name) is None:
            without_bias += 1
            continue
        mean = moments[layer][0]
        w = tensor_at(model, layer.weight).detach().double()
        if layer.layout == LINEAR:
            delta = w[:, removed] @ mean[removed]
        elif layer.layout == CONV1D:  # weight [in, out]
            delta = mean[removed] @ w[removed, :]
        else:
            delta = w[:, removed].sum(tuple(range(2, w.dim()))) @ mean[removed]
        out_atom = analysis.tensors[bias_name][1][0]
        keep_out = spaces.keep_mask(out_atom, masks)
        corrections[bias_name] = delta[keep_out]
    return corrections, without_bias


def apply_bias_corrections(model: nn.Module, corrections: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, delta in corrections.items():
            bias = tensor_at(model, name)
            bias.add_(delta.to(bias.dtype))
