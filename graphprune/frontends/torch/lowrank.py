"""Low-rank compensation paths on a torch model: a compressed layer and two small dense linears in
parallel with it (``y = layer(x) + up(down(x))``).

The layer stays what it was (its masks, its fake quantization, a sparse kernel later) under the
name ``<layer>.base``; the path is plain ``nn.Linear`` modules, so every exporter and runtime
sees two matmuls, and nothing masks or quantizes them (the torch frontend reports them as
compensation paths to every pass).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from graphprune.core.layers import CONV1D, LINEAR
from torch.nn.utils.parametrize import type_before_parametrizations


class LowRankCompensated(nn.Module):
    """``base(x) + up(down(x))``: a compressed layer with its low-rank error path.  ``layout`` says how
    the base stores its weight (``LINEAR`` or ``CONV1D``), so that a plan can put the path back."""

    def __init__(self, base: nn.Module, down: torch.Tensor, up: torch.Tensor, layout: str = LINEAR) -> None:
        super().__init__()
        self.base, self.layout = base, layout
        rank, features = down.shape
        self.down = nn.Linear(features, rank, bias=False, device=down.device, dtype=down.dtype)
        self.up = nn.Linear(rank, up.shape[0], bias=False, device=up.device, dtype=up.dtype)
        with torch.no_grad():
            self.down.weight.copy_(down)
            self.up.weight.copy_(up)

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


def compensate(
    model: nn.Module, name: str, down: torch.Tensor, up: torch.Tensor, layout: str = LINEAR
) -> LowRankCompensated:
    """Put ``model.<name>`` (whose weight is stored in ``layout``) under a :class:`LowRankCompensated`
    with the path ``up @ down`` (in the layer's weight dtype and device), in its parent, under the
    same name."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    layer = owner.get_submodule(child)
    weight = next(layer.parameters())
    wrapped = LowRankCompensated(layer, down.to(weight), up.to(weight), layout)
    setattr(owner, child, wrapped)
    return wrapped


def refusal(model: nn.Module, name: str, weight: torch.Tensor, layout: str) -> str | None:
    """Why ``model.<name>`` cannot get a path beside it, or None.  The path adds to the module's
    output, which must be its weight's product alone (``x W^T + b``, or ``x W + b`` for a weight stored
    in transformers' Conv1D ``layout``), checked on a probe input; and the module must be registered
    once."""
    module = model.get_submodule(name)
    holders = [n for n, m in model.named_modules(remove_duplicate=False) if m is module]
    if len(holders) > 1:
        return f"the module is registered {len(holders)} times ({', '.join(holders)})"
    matrix = weight if layout == CONV1D else weight.t()  # [in, out]
    probe = torch.randn(2, matrix.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    bias = getattr(module, "bias", None)
    expected = probe @ matrix + (bias if isinstance(bias, torch.Tensor) else 0)
    kind = type_before_parametrizations(module).__name__
    with torch.no_grad():
        try:
            got = module(probe)
        except Exception as exc:  # noqa: BLE001 - any failure means the module is more than a product
            return f"{kind} does not run on its weight's input alone ({type(exc).__name__})"
    if (
        not isinstance(got, torch.Tensor)
        or got.shape != expected.shape
        or not torch.allclose(got, expected, 1e-4, 1e-5)
    ):
        return f"{kind} computes more than its weight's product, so a path beside it would not add to it"
    return None


def low_rank_paths(model: nn.Module) -> dict[str, LowRankCompensated]:
    """Every compensated layer of ``model``, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankCompensated)}


def unwrapped(name: str, layers: Iterable[str]) -> str:
    """``name`` as the model without paths calls it: ``<layer>.base.weight`` is ``<layer>.weight``."""
    for layer in layers:
        if name.startswith(layer + ".base."):
            return f"{layer}.{name[len(layer) + 6 :]}"
    return name


def wrapped(name: str, layers: Iterable[str]) -> str:
    """Inverse of :func:`unwrapped`: where ``name`` of the model without paths lives in the model with them."""
    owner, _, attr = name.rpartition(".")
    return f"{owner}.base.{attr}" if owner in layers else name


def path_weights(model: nn.Module) -> set[str]:
    """The weight names of every low-rank path in ``model`` (``<layer>.down.weight``, ``<layer>.up.weight``)."""
    return {f"{name}.{part}.weight" for name in low_rank_paths(model) for part in ("down", "up")}
