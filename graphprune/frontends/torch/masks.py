"""N:M masks on a torch model, as ``torch.nn.utils.parametrize`` parametrizations.

``weight = original * mask``: gradients and optimizer updates reach ``original`` but can never
make a masked entry non-zero.  :func:`finalize` bakes them in.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
from graphprune.algorithms.nm import NMPattern, satisfies
from graphprune.errors import PostconditionError
from graphprune.frontends.torch.capture import CapturedGraph, capture_call, qualified
from graphprune.frontends.torch.copying import clone
from torch.nn.utils import parametrize


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


def capture_masked(model: nn.Module, args: tuple, kwargs: dict) -> CapturedGraph:
    """Capture ``model``; where it has N:M masks, from a copy with the masks baked in, so that the
    graph reads each masked weight as the parameter it is (a product with its mask would hide the
    layer from every pass).  Names resolve on ``model`` itself."""
    return capture_call(finalize(clone(model)) if masked_weights(model) else model, args, kwargs)
