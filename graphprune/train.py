"""N:M sparse training in the user's own loop.

Start from a model with N:M masks (``gp.prune(..., passes=[NMSparsity(...)])``), wrap it, train as
usual, call :meth:`SparseTraining.step` after each optimizer step, and :meth:`SparseTraining.finalize`
at the end::

    trainer = SparseTraining(result.module, recipe="sr-ste")
    for batch in loader:
        loss(result.module, batch).backward(); opt.step(); opt.zero_grad(); trainer.step()
    model = trainer.finalize()          # plain N:M masks again, patterns checked

Recipes (each recomputes every mask from ``|W|`` every ``every`` steps):

- ``"sr-ste"`` (Zhou et al., ICLR 2021): the forward uses ``W * M``; the gradient reaches every weight
  (straight through), plus ``decay * (1 - M) * W`` on the pruned ones, which pulls them towards zero so
  masks settle instead of flipping back and forth.
- ``"mask-decay"`` (progressive gradient-flow decay, after Bambhaniya et al., 2024): the forward uses
  ``W * (M + beta (1 - M))`` with ``beta`` falling linearly from 1 to 0 over ``decay_steps``: pruned
  weights fade out instead of vanishing at once, and keep receiving gradient while they do.
- ``"fixed"``: masks kept as they are (plain masked fine-tuning); ``every`` is ignored.

``schedule`` (dense-to-sparse): ``[(step, n), ...]`` with ascending steps; from each step on, masks
keep ``n`` of every ``m`` (m as in the model's masks), e.g. ``[(0, 3), (200, 2), (400, 1)]`` for 1:4.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from graphprune.errors import InputError
from graphprune.sparsity import NMMask, NMPattern, check_patterns, nm_mask

RECIPES = ("sr-ste", "mask-decay", "fixed")


class _RefinedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * (1 - mask) * weight, None, None


class TrainingMask(nn.Module):
    """The parametrization an :class:`~graphprune.sparsity.NMMask` becomes while training."""

    def __init__(self, mask: torch.Tensor, pattern: NMPattern, recipe: str, decay: float) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.pattern, self.recipe, self.decay, self.beta = pattern, recipe, decay, 1.0

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self.recipe == "sr-ste":
            return _RefinedSTE.apply(original, self.mask, self.decay)
        if self.recipe == "mask-decay":
            return original * (self.mask + self.beta * (1 - self.mask))
        return original * self.mask


class SparseTraining:
    """Drive N:M masks through training with one of :data:`RECIPES` (see the module doc)."""

    def __init__(self, model: nn.Module, *, recipe: str = "sr-ste", decay: float = 2e-4, every: int = 1,
                 decay_steps: int = 1000, schedule: Sequence[tuple[int, int]] = ()) -> None:
        if recipe not in RECIPES:
            raise InputError(f"recipe must be one of {list(RECIPES)}, got {recipe!r}")
        if every < 1 or decay_steps < 1 or decay < 0:
            raise InputError(f"need every >= 1, decay_steps >= 1 and decay >= 0; got {every}, {decay_steps}, {decay}")
        self.masks: list[tuple[nn.Module, str, TrainingMask]] = []
        for module in model.modules():
            if not parametrize.is_parametrized(module):
                continue
            for name, plist in module.parametrizations.items():
                for i, p in enumerate(plist):
                    if isinstance(p, NMMask):
                        plist[i] = TrainingMask(p.mask, p.pattern, recipe, decay)
                        self.masks.append((module, name, plist[i]))
        if not self.masks:
            raise InputError("the model has no N:M masks: run NMSparsity on it first")
        m = self.masks[0][2].pattern.m
        steps = [s for s, _ in schedule]
        if steps != sorted(steps) or any(not 0 < n < m for _, n in schedule):
            raise InputError(f"schedule must be (step, n) pairs with ascending steps and 0 < n < {m}")
        self.model, self.recipe, self.every, self.decay_steps = model, recipe, every, decay_steps
        self.schedule = list(schedule)
        self.steps = 0
        if self.schedule:
            self._recompute(self._n())

    def _n(self) -> int | None:
        due = [n for step, n in self.schedule if step <= self.steps]
        return due[-1] if due else None

    def step(self) -> None:
        """Call after each optimizer step: advances the schedules and recomputes masks when due."""
        self.steps += 1
        for _, _, mask in self.masks:
            mask.beta = max(0.0, 1.0 - self.steps / self.decay_steps)
        if self.recipe != "fixed" and self.steps % self.every == 0:
            self._recompute(self._n())

    def _recompute(self, n: int | None) -> None:
        with torch.no_grad():
            for module, name, mask in self.masks:
                if n is not None:
                    mask.pattern = NMPattern(n, mask.pattern.m, mask.pattern.layout)
                original = module.parametrizations[name].original
                mask.mask.copy_(nm_mask(original.abs(), mask.pattern).to(mask.mask.dtype))

    def finalize(self) -> nn.Module:
        """Plain :class:`NMMask` parametrizations again (masked entries zeroed), patterns checked."""
        for module, name, mask in self.masks:
            plist = module.parametrizations[name]
            index = next(i for i, p in enumerate(plist) if p is mask)
            with torch.no_grad():
                plist.original.mul_(mask.mask)
            plist[index] = NMMask(mask.mask, mask.pattern)
        check_patterns(self.model, "SparseTraining.finalize")
        self.masks = []
        return self.model
