"""How much each group's channels matter to the model's outputs, measured on calibration data.

For a group and a ratio, the least important channels (by the pass's own importance) are
silenced by zeroing every parameter slice of the group that indexes them, the model runs on one
calibration batch, and the relative squared error of its outputs against the dense outputs is
recorded.  Zeroing is the standard stand-in for removal here (exact for spaces without
reductions, see the zero-channel oracle); it needs no re-capture, so every (group, ratio) costs one
forward pass.  The parameters are restored after each trial.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from graphprune.core.groups import Analysis, Group
from graphprune.frontends.torch.capture import eval_mode, normalize_inputs, tensor_at


def output_errors(
    analysis: Analysis,
    model: nn.Module,
    groups: list[Group],
    scores: dict[int, torch.Tensor],
    removed_counts: Callable[[Group], list[int]],
    batch: Any,
) -> dict[int, list[float]]:
    """Per group: the relative output error with its ``n`` least important channels silenced, for
    each ``n`` of ``removed_counts(group)``."""
    args, kwargs = normalize_inputs(batch)
    reference = _outputs(model, args, kwargs)
    errors = {}
    for group in groups:
        order = torch.argsort(scores[group.id], stable=True)  # least important first
        errors[group.id] = []
        for n in removed_counts(group):
            keep = torch.ones(group.size, dtype=torch.bool)
            keep[order[:n]] = False
            with _silenced(analysis, model, group, keep):
                got = _outputs(model, args, kwargs)
            num = sum(float((g - r).pow(2).sum()) for g, r in zip(got, reference, strict=True))
            den = sum(float(r.pow(2).sum()) for r in reference) or 1.0
            errors[group.id].append(num / den)
    return errors


def _outputs(model: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    with eval_mode(model), torch.no_grad():
        out = model(*args, **kwargs)
    return [t.double() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


class _silenced:
    """Zero the group's parameter slices outside ``keep`` for the duration of the block."""

    def __init__(self, analysis: Analysis, model: nn.Module, group: Group, keep: torch.Tensor) -> None:
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.slices = []
        for m in group.members:
            if m.kind != "parameter":
                continue
            position_kept = analysis.spaces.keep_mask(m.atom, {group.leaf: keep})
            self.slices.append((tensor_at(model, m.name), m.dim, (~position_kept).nonzero().flatten()))

    def __enter__(self) -> None:
        with torch.no_grad():
            for tensor, dim, index in self.slices:
                index = index.to(tensor.device)
                self.saved.append((tensor, tensor.index_select(dim, index).clone()))
                tensor.index_fill_(dim, index, 0)

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            # in reverse: a tensor listed twice (tied weights) gets its first, untouched values back last
            for (tensor, values), (_, dim, index) in reversed(list(zip(self.saved, self.slices, strict=True))):
                tensor.index_copy_(dim, index.to(tensor.device), values)
        self.saved.clear()
