"""Compensation after structured pruning, without retraining.

``batchnorm``: removing channels upstream shifts the statistics every later BatchNorm sees, while
its running mean/var still describe the dense model.  Re-estimating them on calibration data
(every BatchNorm in train mode at once, cumulative averages over the batches, nothing else
touched) is the cheapest recovery there is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from graphprune.capture import eval_mode, normalize_inputs


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
