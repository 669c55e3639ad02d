"""Channel importance: one score per channel of a group, higher means keep.

Scores combine every parameter slice of the group (the group-lasso view of DepGraph /
Torch-Pruning): a channel is as important as all the weights that would be removed with it.

* ``l1`` / ``l2``: magnitude of those weights.
* ``bn_scale``: |gamma| of the group's BatchNorm layers (Network Slimming).
* ``taylor``: first-order Taylor estimate of the loss change, ``(sum_w w * dL/dw)^2`` per channel,
  averaged over calibration batches (Molchanov et al., 2019); needs ``loss_fn``.
* ``activation``: for every layer that consumes the channel (linear / conv input),
  ``sqrt(E[x_c^2]) * ||W[:, c]||``, the channel form of Wanda's |x|·|W|, from calibration batches.
* ``fluctuation``: ``Var[x_c] * ||W[:, c]||^2`` over the same layers (FLAP).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from graphprune.algorithms.moments import input_moments
from graphprune.algorithms.nm import input_channel_norms
from graphprune.core.groups import Analysis, Group
from graphprune.core.layers import WeightLayer
from graphprune.errors import InputError
from graphprune.frontends.torch.calibration import forward_batch
from graphprune.frontends.torch.capture import tensor_at
from graphprune.frontends.torch.distributed import reduce_sum

if TYPE_CHECKING:
    from graphprune.core.frontend import Frontend

GroupScore = Callable[[Analysis, Group, nn.Module], torch.Tensor]
LossFn = Callable[[Any, Any], torch.Tensor]


class Importance(abc.ABC):
    """Scores the channels of a set of groups."""

    needs_calibration = False

    def gather(self, state: Frontend[Any], calibration: Any) -> Any:
        """What :meth:`scores` reads as ``calibration``, gathered through the model's frontend before
        the pass plans (statistics from its calibration runner); by default the calibration data."""
        return calibration

    @abc.abstractmethod
    def scores(
        self, analysis: Analysis, model: nn.Module, groups: list[Group], calibration: list[Any] | None
    ) -> dict[int, torch.Tensor]:
        """Return a real score vector of length ``group.size`` per group id (the pass checks it:
        :func:`checked_scores`)."""


def checked_scores(scores: Mapping[int, Any], groups: list[Group], criterion: str) -> dict[int, torch.Tensor]:
    """Each group's scores as a float64 CPU vector.  Scores rank a group's channels and the kept
    count is cut from that ranking, so what cannot rank them is refused, naming the criterion and
    the group: not a tensor, another shape (3 scores for 32 channels would keep at most 3),
    complex or meta tensors (no order, no values), NaN or Inf."""
    if not isinstance(scores, Mapping):
        raise InputError(
            f"importance {criterion!r} returned a {type(scores).__name__}; Importance.scores returns "
            "{group id: scores}"
        )
    out = {}
    for g in groups:
        got = scores.get(g.id)
        where = (
            f"importance {criterion!r} on group {g.id} ({g.size} channels of "
            f"{', '.join(m.name for m in g.members[:2])}{', ...' if len(g.members) > 2 else ''})"
        )
        want = f"a real tensor of shape ({g.size},), one score per channel"
        if not isinstance(got, torch.Tensor):
            raise InputError(f"{where}: expected {want}, got {type(got).__name__}")
        if tuple(got.shape) != (g.size,):
            raise InputError(f"{where}: expected {want}, got shape {tuple(got.shape)}")
        if got.is_complex() or got.device.type == "meta":
            raise InputError(f"{where}: expected {want}, got a {got.dtype} tensor on {got.device}")
        got = got.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(got).all()):
            raise InputError(
                f"{where}: {int((~torch.isfinite(got)).sum())} scores are NaN or Inf; scores must be "
                "finite to rank channels"
            )
        out[g.id] = got
    return out


def _tensor(model: nn.Module | Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """A weight by name: a module path in an nn.Module, an initializer name for ONNX models
    (whose weights reach criteria as a mapping)."""
    tensor = model[name] if isinstance(model, Mapping) else tensor_at(model, name)
    if tensor.device.type == "meta":
        raise InputError(
            f"{name} is on the meta device: weight-based importance needs real weights "
            "(pass importance=<callable> to score channels another way)"
        )
    return tensor


def _scatter(analysis: Analysis, group: Group, atom: int, per_position: torch.Tensor) -> torch.Tensor:
    """A group's channel scores from per-position ones; on the CPU, as plans are (a vector per group)."""
    idx = analysis.spaces.leaf_index(atom, group.leaf)
    valid = idx >= 0
    out = torch.zeros(group.size, dtype=torch.float64, device="cpu")
    out.index_add_(0, idx[valid], per_position.detach()[valid].double().cpu())
    return out


def _per_position(t: torch.Tensor, dim: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return fn(t.detach().float().movedim(dim, 0).reshape(t.shape[dim], -1))


class _PerGroup(Importance):
    """A criterion defined group by group (also wraps user callables, whose results are returned as
    they are: :func:`checked_scores` names the callable when they cannot rank channels)."""

    def __init__(self, fn: GroupScore) -> None:
        self.fn = fn

    def scores(self, analysis, model, groups, calibration):
        return {g.id: self.fn(analysis, g, model) for g in groups}


def _magnitude(p: int) -> GroupScore:
    def score(analysis: Analysis, group: Group, model: nn.Module) -> torch.Tensor:
        total = torch.zeros(group.size, dtype=torch.float64, device="cpu")
        for m in group.members:
            if m.kind == "parameter":
                t = _tensor(model, m.name)
                reduce = (lambda x: x.abs().sum(1)) if p == 1 else (lambda x: x.pow(2).sum(1))
                total += _scatter(analysis, group, m.atom, _per_position(t, m.dim, reduce))
        return total if p == 1 else total.sqrt()

    return score


def _bn_scale(analysis: Analysis, group: Group, model: nn.Module) -> torch.Tensor:
    """|gamma| of the group's BatchNorm layers; a group without one is scored by L2 (said in the docs)."""
    total = torch.zeros(group.size, dtype=torch.float64, device="cpu")
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
        totals = {g.id: torch.zeros(g.size, dtype=torch.float64, device="cpu") for g in groups}
        try:
            for p in params.values():
                p.requires_grad_(True)
            for i, batch in enumerate(calibration):
                model.zero_grad(set_to_none=True)
                loss = self.loss_fn(forward_batch(model, batch, i), batch)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise InputError("loss_fn must return a scalar tensor")
                loss.backward()
                for g in groups:
                    s = torch.zeros(g.size, dtype=torch.float64, device="cpu")
                    for m in g.members:
                        p = params.get(m.name)
                        if m.kind == "parameter" and p is not None and p.grad is not None:
                            s += _scatter(analysis, g, m.atom, _per_position(p * p.grad, m.dim, lambda x: x.sum(1)))
                    totals[g.id] += s.pow(2)
        finally:
            model.zero_grad(set_to_none=True)
            for name, p in params.items():
                p.requires_grad_(flags[name])
        count = torch.tensor(float(len(calibration)), dtype=torch.float64, device="cpu")
        reduce_sum(*totals.values(), count)  # over the ranks of a distributed run
        return {gid: t / max(float(count), 1.0) for gid, t in totals.items()}


@dataclass(frozen=True, kw_only=True)
class LayerInput:
    """What a weight layer reads, as :class:`InputWeighted` scores it."""

    layer: WeightLayer
    atom: int  # the analysis atom of the channels it reduces over
    moments: tuple[torch.Tensor, torch.Tensor]  # their mean and mean square over the calibration data
    weight: torch.Tensor


class InputWeighted(Importance):
    """Scores from what each linear / conv layer reading channel c sees, summed over those layers:

    * ``activation``: ``sqrt(E[x_c^2]) * ||W[:, c]||``;
    * ``fluctuation``: ``Var[x_c] * ||W[:, c]||^2`` (FLAP, An et al. 2024): a channel that barely
      varies can be removed and its mean folded into a bias.
    """

    needs_calibration = True

    def __init__(self, statistic: str) -> None:
        self.statistic = statistic

    def gather(self, state: Frontend[Any], calibration: Any) -> list[LayerInput]:
        """Per weight layer: the atom of the channels it reads, their moments over the calibration
        data, and its weight."""
        layers = state.weight_layers()[0]
        moments = input_moments(state, layers, calibration)
        return [
            LayerInput(
                layer=layer, atom=state.input_channels(layer), moments=moments[layer.weight], weight=state.weight(layer)
            )
            for layer in layers
            if layer.weight in moments
        ]

    def scores(self, analysis, model, groups, calibration):
        totals = {g.id: torch.zeros(g.size, dtype=torch.float64, device="cpu") for g in groups}
        for found in calibration:
            layer, (mean, mean_sq) = found.layer, found.moments
            per_channel = self._combine(mean, mean_sq, input_channel_norms(found.weight, layer.layout, layer.groups))
            for g in groups:
                if g.leaf in analysis.spaces.leaves(found.atom):
                    totals[g.id] += _scatter(analysis, g, found.atom, per_channel)
        return totals

    def _combine(self, mean: torch.Tensor, mean_sq: torch.Tensor, weight_norm: torch.Tensor) -> torch.Tensor:
        if self.statistic == "activation":
            return mean_sq.sqrt() * weight_norm
        return (mean_sq - mean.pow(2)).clamp(min=0) * weight_norm.pow(2)


BUILTIN: dict[str, GroupScore] = {"l1": _magnitude(1), "l2": _magnitude(2), "bn_scale": _bn_scale}
NAMES = sorted([*BUILTIN, "taylor", "activation", "fluctuation"])


def resolve(importance: str | Importance | GroupScore, loss_fn: LossFn | None = None) -> Importance:
    """The :class:`Importance` for a name, an instance, or a per-group callable."""
    if isinstance(importance, Importance):
        return importance
    if isinstance(importance, str):
        if importance == "taylor":
            return Taylor(loss_fn)
        if importance in ("activation", "fluctuation"):
            return InputWeighted(importance)
        if importance in BUILTIN:
            return _PerGroup(BUILTIN[importance])
        raise InputError(f"unknown importance criterion {importance!r}; choose one of {NAMES} or pass a callable")
    if callable(importance):
        return _PerGroup(importance)
    raise InputError(f"importance must be a name, an Importance or a callable, got {type(importance).__name__}")
