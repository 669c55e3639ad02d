"""N:M semi-structured sparsity: the layout hardware uses, masks, and the pattern check.

A weight is viewed as a matrix ``[rows, reduction]`` in the order sparse tensor cores and
TensorRT read it: Linear ``[out, in]`` as is; transformers' Conv1D ``[in, out]`` transposed;
Conv ``[K, C, R, S]`` channel-last ``(K, R, S, C)``, so each group of ``m`` runs along input
channels.  ``n`` of every ``m`` consecutive reduction entries may be non-zero.

Tensors in, tensors out: how a frontend stores masks is its own (torch:
:mod:`graphprune.frontends.torch.masks`; ONNX: exact zeros in the initializers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphprune.core.layers import CONV, CONV1D, LINEAR
from graphprune.errors import InputError


@dataclass(frozen=True)
class NMPattern:
    """``n`` kept of every ``m`` consecutive weights along the reduction dim, in ``layout``."""

    n: int
    m: int
    layout: str

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise InputError(f"N:M sparsity needs integers 0 < n < m, got {self.n}:{self.m}")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def to_matrix(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The ``[rows, reduction]`` view in hardware order."""
    if layout == LINEAR:
        return weight
    if layout == CONV1D:
        return weight.t()
    return weight.movedim(1, -1).reshape(weight.shape[0], -1)  # (K, R, S, C)


def from_matrix(matrix: torch.Tensor, layout: str, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`to_matrix`."""
    if layout == LINEAR:
        return matrix
    if layout == CONV1D:
        return matrix.t()
    k, c, *window = shape
    return matrix.reshape(k, *window, c).movedim(-1, 1)


def fits(weight: torch.Tensor, pattern: NMPattern) -> str | None:
    """None if ``weight`` can hold ``pattern``, else why not."""
    if pattern.layout == CONV:
        channels = weight.shape[1]
        return (
            None
            if channels % pattern.m == 0
            else f"{channels} input channels per group are not a multiple of {pattern.m}"
        )
    width = to_matrix(weight, pattern.layout).shape[1]
    return None if width % pattern.m == 0 else f"reduction width {width} is not a multiple of {pattern.m}"


def nm_mask(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive entries (scores in weight layout)."""
    matrix = to_matrix(scores, pattern.layout)
    rows, width = matrix.shape
    groups = matrix.reshape(rows, width // pattern.m, pattern.m)
    top = groups.topk(pattern.n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return from_matrix(keep.reshape(rows, width), pattern.layout, scores.shape)


def satisfies(weight: torch.Tensor, pattern: NMPattern) -> bool:
    """True if at most ``n`` of every ``m`` consecutive reduction entries are non-zero."""
    matrix = to_matrix(weight.detach(), pattern.layout)
    rows, width = matrix.shape
    if width % pattern.m:
        return False
    nonzero = (matrix != 0).reshape(rows, width // pattern.m, pattern.m).sum(-1)
    return bool((nonzero <= pattern.n).all())


def nm_holds(values: np.ndarray, axis: int, pattern: NMPattern) -> bool:
    """:func:`satisfies` for stored (ONNX) weights: groups of ``m`` run along ``axis`` once it is
    moved last (the input channels of a conv, the reduction of a matrix)."""
    groups = np.moveaxis(values, axis, -1)
    if groups.shape[-1] % pattern.m:
        return False
    return bool(((groups.reshape(-1, pattern.m) != 0).sum(-1) <= pattern.n).all())


def per_input_channel(values: torch.Tensor, layout: str, groups: int, shape: torch.Size) -> torch.Tensor:
    """A statistic per input channel (``values``, one per channel of the layer's input) broadcast to a
    weight of ``shape`` in ``layout`` (a grouped conv's filters see their group's channels)."""
    if layout == CONV1D:  # [in, out]
        return values[:, None]
    if layout == CONV:
        k, per_group = shape[:2]
        per_filter = values.reshape(groups, per_group).repeat_interleave(k // groups, dim=0)  # [K, C/g]
        return per_filter.reshape(k, per_group, *([1] * (len(shape) - 2)))
    return values[None, :]


def input_channel_norms(weight: torch.Tensor, layout: str, groups: int = 1) -> torch.Tensor:
    """``||W[:, c]||`` for each input channel ``c`` of the layer's activation, from the weight as
    ``layout`` stores it (a grouped conv's channels group by group)."""
    w = weight.detach().double()
    if layout == CONV1D:  # [in, out]
        return w.pow(2).sum(1).sqrt()
    if layout == LINEAR:  # [out, in]
        return w.pow(2).sum(0).sqrt()
    cout, per_group = w.shape[:2]
    return w.reshape(groups, cout // groups, per_group, -1).pow(2).sum((1, 3)).sqrt().reshape(-1)
