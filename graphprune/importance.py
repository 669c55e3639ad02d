"""Channel importance: one score per channel of a group, higher means keep.

Scores combine every parameter slice of the group (the group-lasso view used by
Torch-Pruning and DepGraph): a channel is as important as all the weights that would be
removed with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from graphprune.analysis import Analysis, Group, Member
from graphprune.errors import InputError

Criterion = Callable[[Analysis, Group, nn.Module], torch.Tensor]


def _member_tensor(model: nn.Module, member: Member) -> torch.Tensor:
    owner, _, attr = member.name.rpartition(".")
    tensor = getattr(model.get_submodule(owner) if owner else model, attr).detach()
    if tensor.device.type == "meta":
        raise InputError(f"{member.name} is on the meta device: weight-based importance needs real weights "
                         "(pass importance=<callable> to score channels another way)")
    return tensor


def _scatter(analysis: Analysis, group: Group, member: Member, per_position: torch.Tensor) -> torch.Tensor:
    idx = analysis.spaces.leaf_index(member.atom, group.leaf)
    valid = idx >= 0
    out = torch.zeros(group.size, dtype=torch.float64)
    out.index_add_(0, idx[valid], per_position[valid].double().cpu())
    return out


def _norm_score(p: int) -> Criterion:
    def score(analysis: Analysis, group: Group, model: nn.Module) -> torch.Tensor:
        total = torch.zeros(group.size, dtype=torch.float64)
        for m in group.members:
            if m.kind != "parameter":
                continue
            t = _member_tensor(model, m).float().movedim(m.dim, 0).reshape(m.shape[m.dim], -1)
            per_position = t.abs().sum(1) if p == 1 else t.pow(2).sum(1)
            total += _scatter(analysis, group, m, per_position)
        return total if p == 1 else total.sqrt()
    return score


def bn_scale(analysis: Analysis, group: Group, model: nn.Module) -> torch.Tensor:
    """|gamma| of the group's BatchNorm layers (Network Slimming); groups without one use L2."""
    total = torch.zeros(group.size, dtype=torch.float64)
    found = False
    for m in group.members:
        owner = model.get_submodule(m.module) if m.module else model
        if m.kind == "parameter" and m.name.endswith(".weight") and isinstance(owner, nn.modules.batchnorm._BatchNorm):
            total += _scatter(analysis, group, m, _member_tensor(model, m).abs())
            found = True
    return total if found else _norm_score(2)(analysis, group, model)


CRITERIA: dict[str, Criterion] = {"l1": _norm_score(1), "l2": _norm_score(2), "bn_scale": bn_scale}


def criterion(name: str | Criterion) -> Criterion:
    if callable(name):
        return name
    if name not in CRITERIA:
        raise InputError(f"unknown importance criterion {name!r}; choose one of {sorted(CRITERIA)} or pass a callable")
    return CRITERIA[name]
