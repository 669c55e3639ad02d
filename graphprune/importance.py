"""Channel importance: one score per channel of a group, higher means keep.

Scores combine every parameter slice of the group (the group-lasso view of DepGraph /
Torch-Pruning): a channel is as important as all the weights that would be removed with it.

* ``l1`` / ``l2``: magnitude of those weights.
* ``bn_scale``: |gamma| of the group's BatchNorm layers (Network Slimming).
* ``taylor``: first-order Taylor estimate of the loss change, ``(sum_w w * dL/dw)^2`` per channel,
  averaged over calibration batches (Molchanov et al., 2019); needs ``loss_fn``.
* ``activation``: for every layer that consumes the channel (linear / conv input),
  ``sqrt(E[x_c^2]) * ||W[:, c]||``, the channel form of Wanda's |x|·|W|, from calibration batches.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graphprune.analysis import Analysis, Group
from graphprune.capture import normalize_inputs, tensor_at
from graphprune.errors import InputError

aten = torch.ops.aten
GroupScore = Callable[[Analysis, Group, nn.Module], torch.Tensor]
LossFn = Callable[[Any, Any], torch.Tensor]


class Importance(abc.ABC):
    """Scores the channels of a set of groups."""

    needs_calibration = False

    @abc.abstractmethod
    def scores(self, analysis: Analysis, model: nn.Module, groups: list[Group],
               calibration: list[Any] | None) -> dict[int, torch.Tensor]:
        """Return a float64 score vector of length ``group.size`` per group id."""


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    tensor = tensor_at(model, name)
    if tensor.device.type == "meta":
        raise InputError(f"{name} is on the meta device: weight-based importance needs real weights "
                         "(pass importance=<callable> to score channels another way)")
    return tensor


def _scatter(analysis: Analysis, group: Group, atom: int, per_position: torch.Tensor) -> torch.Tensor:
    idx = analysis.spaces.leaf_index(atom, group.leaf)
    valid = idx >= 0
    out = torch.zeros(group.size, dtype=torch.float64)
    out.index_add_(0, idx[valid], per_position.detach()[valid].double().cpu())
    return out


def _per_position(t: torch.Tensor, dim: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return fn(t.detach().float().movedim(dim, 0).reshape(t.shape[dim], -1))


class _PerGroup(Importance):
    """A criterion defined group by group (also wraps user callables)."""

    def __init__(self, fn: GroupScore) -> None:
        self.fn = fn

    def scores(self, analysis, model, groups, calibration):
        return {g.id: torch.as_tensor(self.fn(analysis, g, model), dtype=torch.float64) for g in groups}


def _magnitude(p: int) -> GroupScore:
    def score(analysis: Analysis, group: Group, model: nn.Module) -> torch.Tensor:
        total = torch.zeros(group.size, dtype=torch.float64)
        for m in group.members:
            if m.kind == "parameter":
                t = _tensor(model, m.name)
                reduce = (lambda x: x.abs().sum(1)) if p == 1 else (lambda x: x.pow(2).sum(1))
                total += _scatter(analysis, group, m.atom, _per_position(t, m.dim, reduce))
        return total if p == 1 else total.sqrt()
    return score


def _bn_scale(analysis: Analysis, group: Group, model: nn.Module) -> torch.Tensor:
    """|gamma| of the group's BatchNorm layers; a group without one is scored by L2 (said in the docs)."""
    total = torch.zeros(group.size, dtype=torch.float64)
    found = False
    for m in group.members:
        owner = model.get_submodule(m.module) if m.module else model
        if m.kind == "parameter" and m.name.endswith(".weight") and isinstance(owner, nn.modules.batchnorm._BatchNorm):
            total += _scatter(analysis, group, m.atom, _tensor(model, m.name).abs())
            found = True
    return total if found else _magnitude(2)(analysis, group, model)


class Taylor(Importance):
    """First-order Taylor: ``(sum over the channel's weights of w * dL/dw)^2``, averaged over batches."""

    needs_calibration = True

    def __init__(self, loss_fn: LossFn | None) -> None:
        if loss_fn is None:
            raise InputError("importance='taylor' needs loss_fn=lambda outputs, batch: <scalar loss>")
        self.loss_fn = loss_fn

    def scores(self, analysis, model, groups, calibration):
        params = dict(model.named_parameters(remove_duplicate=False))
        flags = {name: p.requires_grad for name, p in params.items()}
        totals = {g.id: torch.zeros(g.size, dtype=torch.float64) for g in groups}
        try:
            for p in params.values():
                p.requires_grad_(True)
            for batch in calibration:
                model.zero_grad(set_to_none=True)
                args, kwargs = normalize_inputs(batch)
                loss = self.loss_fn(model(*args, **kwargs), batch)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise InputError("loss_fn must return a scalar tensor")
                loss.backward()
                for g in groups:
                    s = torch.zeros(g.size, dtype=torch.float64)
                    for m in g.members:
                        p = params.get(m.name)
                        if m.kind == "parameter" and p is not None and p.grad is not None:
                            s += _scatter(analysis, g, m.atom, _per_position(p * p.grad, m.dim, lambda x: x.sum(1)))
                    totals[g.id] += s.pow(2)
        finally:
            model.zero_grad(set_to_none=True)
            for name, p in params.items():
                p.requires_grad_(flags[name])
        return {gid: t / max(len(calibration), 1) for gid, t in totals.items()}


class Activation(Importance):
    """``sqrt(E[x_c^2]) * ||W[:, c]||`` summed over every linear / conv layer that reads channel c."""

    needs_calibration = True

    def scores(self, analysis, model, groups, calibration):
        consumers = _consumers(analysis)
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        hooks = []
        for i, (module_name, axis, _node) in enumerate(consumers):
            def hook(_mod, args, kwargs, i=i, axis=axis):
                x = args[0] if args else next(iter(kwargs.values()))
                sq = x.detach().float().movedim(axis, 0).reshape(x.shape[axis], -1).pow(2)
                sums[i] = sums.get(i, 0) + sq.sum(1).double().cpu()
                counts[i] = counts.get(i, 0) + sq.shape[1]
            hooks.append(model.get_submodule(module_name).register_forward_pre_hook(hook, with_kwargs=True))
        training = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                for batch in calibration:
                    args, kwargs = normalize_inputs(batch)
                    model(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
            for m, flag in training.items():
                m.training = flag
        totals = {g.id: torch.zeros(g.size, dtype=torch.float64) for g in groups}
        for i, (module_name, _axis, node) in enumerate(consumers):
            if i not in sums:
                continue
            rms = (sums[i] / counts[i]).sqrt()
            x_atom, weight_norm = _consumer_input(analysis, model, node)
            per_channel = rms * weight_norm
            for g in groups:
                if g.leaf in analysis.spaces.leaves(x_atom):
                    totals[g.id] += _scatter(analysis, g, x_atom, per_channel)
        return totals


def _consumers(analysis: Analysis) -> list[tuple[str, int, Any]]:
    """(module, channel axis of its input, node) for every linear/conv whose weight is a parameter."""
    names = analysis.captured.tensor_names
    out = []
    for node in analysis.captured.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        packet = node.target.overloadpacket
        weight = node.args[2] if packet is aten.addmm else node.args[1] if len(node.args) > 1 else None
        if not isinstance(weight, fx.Node) or weight.name not in names:
            continue
        if packet in (aten.linear, aten.addmm):
            axis = -1
        elif packet in (aten.conv1d, aten.conv2d, aten.conv3d):
            axis = 1
        else:
            continue
        module = names[weight.name][1].rpartition(".")[0]
        out.append((module, axis, node))
    return out


def _consumer_input(analysis: Analysis, model: nn.Module, node) -> tuple[int, torch.Tensor]:
    """The atom of the consumed channel dim and the weight norm per input channel."""
    packet = node.target.overloadpacket
    x = node.args[1] if packet is aten.addmm else node.args[0]
    dims = analysis.context.dims(x)
    weight = _tensor(model, analysis.captured.tensor_names[(node.args[2] if packet is aten.addmm else node.args[1]).name][1])
    w = weight.detach().double()
    if packet is aten.linear:
        return dims[-1], w.pow(2).sum(0).sqrt()
    if packet is aten.addmm:  # transformers Conv1D: weight is [in, out]
        return dims[-1], w.pow(2).sum(1).sqrt()
    groups = node.args[6] if len(node.args) > 6 else 1
    cout, cin_g = w.shape[:2]
    per_group = w.reshape(groups, cout // groups, cin_g, -1).pow(2).sum((1, 3)).sqrt()  # [groups, cin_g]
    return dims[1], per_group.reshape(-1)


BUILTIN: dict[str, GroupScore] = {"l1": _magnitude(1), "l2": _magnitude(2), "bn_scale": _bn_scale}
NAMES = sorted([*BUILTIN, "taylor", "activation"])


def resolve(importance: str | Importance | GroupScore, loss_fn: LossFn | None = None) -> Importance:
    """The :class:`Importance` for a name, an instance, or a per-group callable."""
    if isinstance(importance, Importance):
        return importance
    if isinstance(importance, str):
        if importance == "taylor":
            return Taylor(loss_fn)
        if importance == "activation":
            return Activation()
        if importance in BUILTIN:
            return _PerGroup(BUILTIN[importance])
        raise InputError(f"unknown importance criterion {importance!r}; choose one of {NAMES} or pass a callable")
    if callable(importance):
        return _PerGroup(importance)
    raise InputError(f"importance must be a name, an Importance or a callable, got {type(importance).__name__}")


def calibration_batches(calibration: Iterable[Any] | None, name: str) -> list[Any]:
    """Materialise calibration data once (an iterator could be consumed only once)."""
    if calibration is None:
        raise InputError(f"importance={name!r} needs calibration data: gp.prune(..., calibration=batches)")
    batches = list(calibration)
    if not batches:
        raise InputError("calibration data is empty")
    for i, batch in enumerate(batches):
        try:
            normalize_inputs(batch)
        except InputError as exc:
            raise InputError(f"calibration batch {i}: {exc}") from exc
    return batches

