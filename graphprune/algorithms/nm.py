"""N:M semi-structured sparsity: the layout hardware uses, masks, and the pattern check.

A weight is viewed as a matrix ``[rows, reduction]`` in the order sparse tensor cores and
TensorRT read it: Linear ``[out, in]`` as is; transformers' Conv1D ``[in, out]`` transposed;
Conv ``[K, C, R, S]`` channel-last ``(K, R, S, C)``, so each group of ``m`` runs along input
channels.  ``n`` of every ``m`` consecutive reduction entries may be non-zero.

Masks live in the model as ``torch.nn.utils.parametrize`` parametrizations (``weight =
original * mask``): gradients and optimizer updates reach ``original`` but can never make a
masked entry non-zero.  :func:`finalize` bakes them in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from graphprune.frontends.torch.capture import qualified
from graphprune.errors import InputError, PostconditionError

LINEAR, CONV1D, CONV = "linear", "conv1d_transposed", "conv"


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
        return None if channels % pattern.m == 0 else f"{channels} input channels per group are not a multiple of {pattern.m}"
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


class NMMask(nn.Module):
    """Parametrization ``weight = original * mask``; the mask is a buffer, saved with the model."""

    def __init__(self, mask: torch.Tensor, pattern: NMPattern) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.pattern = pattern

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original * self.mask


def stored(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor ``module.<name>`` is computed from: the original under parametrizations (masks,
    fake quantization), else the attribute itself.  Writes must go here."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def stored_at(model: nn.Module, name: str) -> torch.Tensor:
    """:func:`stored` by full name (``layers.0.fc.weight``)."""
    owner, _, attr = name.rpartition(".")
    return stored(model.get_submodule(owner) if owner else model, attr)


def attach(module: nn.Module, name: str, mask: torch.Tensor, pattern: NMPattern, *, zero_pruned: bool = True) -> None:
    """Mask ``module.<name>``; the masked entries are also zeroed in the stored original unless
    ``zero_pruned=False`` (learned masks need the dense weights underneath)."""
    if zero_pruned:
        with torch.no_grad():
            stored(module, name).mul_(mask)
    parametrize.register_parametrization(module, name, NMMask(mask.to(getattr(module, name).dtype), pattern))


def _nm_parametrizations(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, NMMask]]:
    for path, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, NMMask):
                    yield qualified(path, name), module, name, p


def masked_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, NMPattern]]:
    """Every N:M-masked tensor of ``model``: name -> (effective tensor, pattern)."""
    return {name: (getattr(module, attr), p.pattern) for name, module, attr, p in _nm_parametrizations(model)}


def nm_masks(model: nn.Module) -> dict[str, tuple[torch.Tensor, NMPattern]]:
    """Every N:M mask of ``model``: name -> (bool mask, pattern)."""
    return {name: (p.mask.bool(), p.pattern) for name, _module, _attr, p in _nm_parametrizations(model)}


def check_patterns(model: nn.Module, where: str) -> None:
    """Raise :class:`PostconditionError` if a masked tensor no longer follows its N:M pattern."""
    for name, (tensor, pattern) in masked_weights(model).items():
        if not satisfies(tensor, pattern):
            raise PostconditionError(f"after {where}, {name} no longer follows its {pattern} pattern")


def finalize(model: nn.Module) -> nn.Module:
    """Bake N:M masks into the weights; returns ``model``.

    Other parametrizations of a masked weight (int8 fake quantization) stay in place: zeroing
    an entry commutes with them, because they map zero to zero element by element.
    """
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations):
            plist = module.parametrizations[name]
            masks = [p.mask for p in plist if isinstance(p, NMMask)]
            if not masks:
                continue
            others = [p for p in plist if not isinstance(p, NMMask)]
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            with torch.no_grad():
                for mask in masks:
                    getattr(module, name).mul_(mask)
            for p in others:
                parametrize.register_parametrization(module, name, p)
    return model


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
