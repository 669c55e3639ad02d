"""Per-channel moments of activations, batch by batch: what Wanda's scores, the activation-based
channel criteria and bias compensation read from a calibration run, whatever the frontend.

Sums are kept in float64 on the activations' device, in memory proportional to the channel count; a distributed
run sums :attr:`ChannelMoments.sums`, :attr:`~ChannelMoments.squares` and the row count over the
ranks before :meth:`~ChannelMoments.moments`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from graphprune.core.frontend import Frontend
    from graphprune.core.layers import WeightLayer


class ChannelMoments:
    """Sum and sum of squares of each channel of the activations added, and the rows seen."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor, channel_axis: int) -> None:
        flat = x.detach().double().movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1)
        sums, squares = flat.sum(1), flat.pow(2).sum(1)
        self.sums = sums if self.sums is None else self.sums + sums
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += flat.shape[1]

    def moments(self, count: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and mean square per channel; ``count``: the rows over every rank, where summed."""
        if self.sums is None or self.squares is None:
            raise ValueError("no activations were added")
        rows = self.count if count is None else count
        return self.sums / rows, self.squares / rows


def input_moments(
    state: Frontend[Any], layers: Sequence[WeightLayer], calibration: Any
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (by weight name): mean and mean square of each reduced channel of its input over
    the calibration data of ``state``, summed over the ranks of a distributed run first."""
    totals = {layer.weight: ChannelMoments() for layer in layers}

    def adder(layer: WeightLayer) -> Callable[[torch.Tensor], None]:
        return lambda x: totals[layer.weight].add(x, layer.channel_axis)

    state.observe(calibration, {layer: adder(layer) for layer in layers})
    moments = {}
    for name, total in totals.items():  # every rank observes the same layers, in the same order
        if total.sums is None or total.squares is None:
            continue
        count = torch.tensor(float(total.count), dtype=torch.float64, device=total.sums.device)
        state.reduce_sum(total.sums, total.squares, count)
        moments[name] = total.moments(count)
    return moments
