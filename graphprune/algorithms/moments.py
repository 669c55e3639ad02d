"""Per-channel moments of activations, batch by batch: what Wanda's scores, the activation-based
channel criteria and bias compensation read from a calibration run, whatever the frontend.

Sums are kept in float64 on the CPU, in memory proportional to the channel count; a distributed
run sums :attr:`ChannelMoments.sums`, :attr:`~ChannelMoments.squares` and the row count over the
ranks before :meth:`~ChannelMoments.moments`.
"""

from __future__ import annotations

import torch


class ChannelMoments:
    """Sum and sum of squares of each channel of the activations added, and the rows seen."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor, channel_axis: int) -> None:
        flat = x.detach().double().movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1)
        sums, squares = flat.sum(1).cpu(), flat.pow(2).sum(1).cpu()
        self.sums = sums if self.sums is None else self.sums + sums
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += flat.shape[1]

    def moments(self, count: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and mean square per channel; ``count``: the rows over every rank, where summed."""
        if self.sums is None or self.squares is None:
            raise ValueError("no activations were added")
        rows = self.count if count is None else count
        return self.sums / rows, self.squares / rows
