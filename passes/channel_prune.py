"""ChannelPrune: structured channel pruning over the analysed groups.

For every prunable group the pass scores its channels (:mod:`graphprune.algorithms.importance`),
decides how many to keep (uniform ratio, per-module overrides, or a global ranking with a
per-group cap), rounds the kept count so that every tensor dim stays a multiple of
``round_to``, and applies the plan: tensors physically shrink and the module's attributes
follow, verified by re-capturing the result.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from graphprune.algorithms.compensation import bias_corrections
from graphprune.algorithms.importance import GroupScore, Importance, LossFn, checked_scores, resolve
from graphprune.algorithms.sensitivity import output_errors
from graphprune.core.frontend import Frontend
from graphprune.core.groups import Analysis, Group
from graphprune.core.layers import owner_names
from graphprune.core.pipeline import MODULE, ONNX, STREAMED, Pass, PassResult, Stage
from graphprune.core.plan import Plan
from graphprune.errors import InputError

ALLOCATIONS = ("uniform", "global", "sensitivity")
NORMALIZATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor | float]] = {
    "mean": torch.mean,
    "max": torch.max,
    "l2": torch.linalg.vector_norm,
    "sum": torch.sum,
    "none": lambda s: 1.0,
}
COMPENSATIONS = (None, "batchnorm", "bias", "bias+batchnorm", "reconstruct", "reconstruct+batchnorm")


class ChannelPrune(Pass):
    """Remove ``ratio`` of the channels of every prunable group.

    Args:
        ratio: fraction of each group's channels to remove, in [0, 1) (0.5 when no target is given).
        target_macs, target_params: instead of a ratio, the fraction of the dense model's MACs or
            parameters to keep, in (0, 1): the smallest ratio (uniform, or the global ranking's) whose
            predicted cost fits is found by bisection on the analysis, without applying trial plans.
        round_to: kept channel counts make every affected tensor dim a multiple of this.
        importance: ``"l2"`` (default), ``"l1"``, ``"bn_scale"``, ``"taylor"``, ``"activation"``,
            ``"fluctuation"`` (the last three need ``calibration=`` in ``gp.prune``; see
            :mod:`graphprune.algorithms.importance`),
            an :class:`~graphprune.algorithms.importance.Importance`, or a callable
            ``(analysis, group, model) -> scores``.
        loss_fn: for ``"taylor"``: ``loss_fn(outputs, batch) -> scalar``.
        compensate: ``None``; ``"batchnorm"`` to re-estimate every BatchNorm's running statistics on
            the calibration data after pruning; ``"bias"`` to fold the mean effect of removed input
            channels into each consumer's bias (and, unless ``refit_norms=False``, re-fit the affine of
            each LayerNorm/RMSNorm that normalises over fewer channels; torch models only);
            ``"bias+batchnorm"`` for both, bias first;
            ``"reconstruct"`` to re-fit each layer that lost inputs by ridge least squares to the dense
            model's outputs (``damp`` sets the ridge, a fraction of the mean input energy), layer by
            layer in graph order; ``"reconstruct+batchnorm"`` re-estimates BatchNorms after that
            (:mod:`graphprune.frontends.torch.compensation`).
        allocation: how the amount is spread over groups: ``"uniform"`` (the same ratio everywhere),
            ``"global"`` (rank channels of all groups together, scores normalised per group) or
            ``"sensitivity"`` (measure each group's output error on the first calibration batch at
            ratios 1/8, 2/8, ..., then greedily take the cheapest error per unit of cost saved until
            the target, or ``ratio`` of all channels, is met; :mod:`graphprune.algorithms.sensitivity`).
            ``max_ratio`` caps any one group.
        normalize: how ``"global"`` makes scores of different groups comparable: each group's scores
            divided by their ``"mean"`` (default: a channel is ranked by how far it falls below its
            group's typical channel, which spreads the removal), ``"max"``, ``"l2"`` (norm of the
            group's score vector), ``"sum"`` (groups with many channels get small per-channel shares,
            so they lose more), or ``"none"`` (raw scores: for criteria already on one scale across
            layers, e.g. ``"activation"``, whose score is a channel's contribution to its consumers'
            outputs).
        ratios: per-module overrides ``{"layer4": 0.3}``; a group follows the most specific
            module name that owns one of its parameters.
        ignore: module names (or modules) whose groups are left alone.
        heads: prune attention groups made of whole heads (GQA kv groups stay consistent).
        head_dim: prune attention head dimensions too (off by default: the softmax scale of
            many models is tied to head_dim, and RoPE couples every layer's head_dim).
    """

    modes = frozenset({MODULE, STREAMED, ONNX})
    accepts = frozenset({Stage.DENSE, Stage.STRUCTURED})
    produces = Stage.STRUCTURED

    def __init__(
        self,
        ratio: float | None = None,
        *,
        target_macs: float | None = None,
        target_params: float | None = None,
        round_to: int = 1,
        importance: str | Importance | GroupScore = "l2",
        loss_fn: LossFn | None = None,
        compensate: str | None = None,
        allocation: str = "uniform",
        normalize: str = "mean",
        max_ratio: float = 0.9,
        ratios: dict[str, float] | None = None,
        ignore: Iterable[str | nn.Module] = (),
        heads: bool = True,
        head_dim: bool = False,
        damp: float = 0.01,
        refit_norms: bool = True,
    ) -> None:
        if sum(x is not None for x in (ratio, target_macs, target_params)) > 1:
            raise InputError("give one of ratio, target_macs or target_params")
        for name, target in (("target_macs", target_macs), ("target_params", target_params)):
            if target is not None and (
                isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target < 1
            ):
                raise InputError(f"{name} is the fraction of the dense model to keep, in (0, 1); got {target!r}")
        self.target = (
            ("macs", float(target_macs))
            if target_macs is not None
            else ("params", float(target_params))
            if target_params is not None
            else None
        )
        ratio = 0.5 if ratio is None else ratio
        _check_ratio("ratio", ratio)
        _check_ratio("max_ratio", max_ratio)
        for name, r in (ratios or {}).items():
            _check_ratio(f"ratios[{name!r}]", r)
        if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
            raise InputError(f"round_to must be a positive integer, got {round_to!r}")
        self.ratio = float(ratio)
        self.round_to = round_to
        self.importance = resolve(importance, loss_fn)
        self.importance_name = (
            importance if isinstance(importance, str) else getattr(importance, "__name__", type(importance).__name__)
        )
        if compensate not in COMPENSATIONS:
            raise InputError(f"compensate must be one of {list(COMPENSATIONS)}, got {compensate!r}")
        self.compensate = compensate
        if isinstance(damp, bool) or not isinstance(damp, int | float) or not 0 <= damp < 1:
            raise InputError(f"damp must be a number in [0, 1), got {damp!r}")
        self.damp = float(damp)
        self.refit_norms = bool(refit_norms)
        if allocation not in ALLOCATIONS:
            raise InputError(f"allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}")
        if allocation == "sensitivity" and ratios:
            raise InputError("per-module ratios do not combine with allocation='sensitivity', which sets every ratio")
        self.allocation = allocation
        if normalize not in NORMALIZATIONS:
            raise InputError(f"normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
        if normalize != "mean" and allocation != "global":
            raise InputError(
                f"normalize={normalize!r} ranks groups against each other: it applies to allocation='global' only"
            )
        self.normalize = normalize
        self.max_ratio = float(max_ratio)
        self.ratios = dict(ratios or {})
        self.ignore = list(ignore)
        self.heads = heads
        self.head_dim = head_dim

    def __repr__(self) -> str:
        extra = "".join(
            f", {k}={v!r}"
            for k, v in (
                ("importance", self.importance_name),
                ("compensate", self.compensate),
                ("allocation", self.allocation),
                ("normalize", self.normalize),
            )
            if v not in ("l2", None, "uniform", "mean")
        )
        amount = f"target_{self.target[0]}={self.target[1]}" if self.target else f"ratio={self.ratio}"
        return f"ChannelPrune({amount}, round_to={self.round_to}{extra})"

    # ------------------------------------------------------------ planning
    def plan(
        self,
        analysis: Analysis,
        model: nn.Module,
        calibration: Any = None,
        weights: Mapping[str, torch.Tensor] | None = None,
        state: Frontend[Any] | None = None,
    ) -> Plan:
        """Decide the kept channels of every group (does not modify ``model``'s weights); criteria
        read ``weights`` by name when given (a streamed plan's ``meta`` model has none), and gather
        their statistics through ``state`` (:meth:`Importance.gather`)."""
        ignore = self._resolve_names(model)
        candidates = [g for g in analysis.groups if self._selected(g, ignore)]
        if state is None and type(self.importance).gather is not Importance.gather:
            raise InputError(
                f"importance={self.importance_name!r} gathers its statistics through the model's state: "
                "plan(..., state=) is needed"
            )
        gathered = self.importance.gather(state, calibration) if state is not None else calibration
        scores = checked_scores(
            self.importance.scores(analysis, model if weights is None else weights, candidates, gathered),
            candidates,
            self.importance_name,
        )
        if self.allocation == "sensitivity":
            return self._plan_by_sensitivity(analysis, model, candidates, scores, calibration)
        if self.target is None:
            return self._plan_at(analysis, candidates, scores, self.ratio)
        return self._plan_for_target(analysis, model, candidates, scores)

    def _cost(self, analysis: Analysis, model: nn.Module) -> Callable[[Plan], int]:
        kind = self.target[0] if self.target else "channels"

        def cost(plan: Plan) -> int:
            masks = plan.masks(analysis)
            if kind == "macs":
                return analysis.planned_macs(masks)
            if kind == "params":
                return analysis.planned_params(masks, model)
            return -plan.removed(analysis)  # ratio budget: channels removed over the candidates

        return cost

    def _plan_by_sensitivity(
        self,
        analysis: Analysis,
        model: nn.Module,
        candidates: list[Group],
        scores: dict[int, torch.Tensor],
        calibration: list | None,
    ) -> Plan:
        if not calibration:
            raise InputError("allocation='sensitivity' needs calibration data: gp.prune(..., calibration=batches)")
        steps = [k / 8 for k in range(1, int(self.max_ratio * 8) + 1)]
        removed = {g.id: sorted({g.size - self._kept_count(analysis, g, r) for r in steps} - {0}) for g in candidates}
        errors = output_errors(analysis, model, candidates, scores, lambda g: removed[g.id], calibration[0])
        orders = {g.id: torch.argsort(scores[g.id], descending=True, stable=True) for g in candidates}

        def plan_for(level: dict[int, int]) -> Plan:
            plan = Plan.for_analysis(analysis)
            for g in candidates:
                if level[g.id]:
                    plan.set(analysis, g.id, orders[g.id][: g.size - removed[g.id][level[g.id] - 1]])
            return plan

        cost = self._cost(analysis, model)
        nothing = {g.id: 0 for g in candidates}
        dense = cost(plan_for(nothing))
        if self.target:
            budget = self.target[1] * dense
        else:
            budget = -self.ratio * sum(g.size for g in candidates)
        saving = {}  # per group and level: cost saved with that group alone pruned (savings roughly add up)
        for g in candidates:
            saving[g.id] = [0] + [dense - cost(plan_for({**nothing, g.id: i + 1})) for i in range(len(removed[g.id]))]
        level = dict(nothing)
        plan = plan_for(level)
        while cost(plan) > budget:
            best, best_rate = None, None
            for g in candidates:
                i = level[g.id]
                if i == len(removed[g.id]):
                    continue
                gain = saving[g.id][i + 1] - saving[g.id][i]
                loss = errors[g.id][i] - (errors[g.id][i - 1] if i else 0.0)
                rate = max(loss, 0.0) / max(gain, 1e-12)
                if best_rate is None or rate < best_rate:
                    best, best_rate = g.id, rate
            if best is None:
                what = f"target_{self.target[0]}={self.target[1]}" if self.target else f"ratio={self.ratio}"
                raise InputError(f"{what} cannot be met: every prunable group is at max_ratio={self.max_ratio}")
            level[best] += 1
            plan = plan_for(level)
        return plan

    def _plan_for_target(
        self, analysis: Analysis, model: nn.Module, candidates: list[Group], scores: dict[int, torch.Tensor]
    ) -> Plan:
        """The plan at the smallest ratio (uniform, or the global ranking's) whose predicted
        MACs / params (:mod:`graphprune.frontends.torch.macs`, from the analysis alone) fit the target."""
        kind, target = self.target
        cost = self._cost(analysis, model)
        dense = cost(Plan())
        low, high = 0.0, self.max_ratio
        best = self._plan_at(analysis, candidates, scores, high)
        if cost(best) > target * dense:
            raise InputError(
                f"target_{kind}={target} cannot be met: removing max_ratio={self.max_ratio} of every "
                f"prunable group leaves {cost(best) / dense:.1%} of the {kind} (frozen spaces and "
                "ignored modules keep the rest)"
            )
        for _ in range(24):  # bisection on the ratio: the cost only falls as the ratio grows
            middle = (low + high) / 2
            plan = self._plan_at(analysis, candidates, scores, middle)
            if cost(plan) <= target * dense:
                high, best = middle, plan
            else:
                low = middle
        return best

    def _plan_at(
        self, analysis: Analysis, candidates: list[Group], scores: dict[int, torch.Tensor], ratio: float
    ) -> Plan:
        targets = (
            self._global_targets(candidates, scores, ratio)
            if self.allocation == "global"
            else {g.id: self._group_ratio(g, ratio) for g in candidates}
        )
        plan = Plan.for_analysis(analysis)
        for g in candidates:
            keep = self._kept_count(analysis, g, targets[g.id])
            if keep >= g.size:
                continue
            order = torch.argsort(scores[g.id], descending=True, stable=True)
            plan.set(analysis, g.id, order[:keep])
        return plan

    def _resolve_names(self, model: nn.Module | Mapping[str, torch.Tensor]) -> list[str]:
        names = dict(model.named_modules()) if isinstance(model, nn.Module) else owner_names(model)
        by_id = {id(m): n for n, m in names.items()}
        resolved = []
        for item in self.ignore:
            name = by_id.get(id(item)) if isinstance(item, nn.Module) else item
            if name is None:
                raise InputError(f"ignore: {type(item).__name__} module is not part of the model")
            resolved.append(name)
        for name in [*resolved, *self.ratios]:
            if name not in names:
                close = difflib.get_close_matches(name, list(names), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                what = type(model).__name__ if isinstance(model, nn.Module) else "the ONNX model's initializer names"
                raise InputError(f"no module named {name!r} in {what}{hint}")
        return resolved

    def _selected(self, group: Group, ignore: list[str]) -> bool:
        if "head_dim" in group.tags and not self.head_dim:
            return False
        if "heads" in group.tags and not self.heads:
            return False
        return not any(_within(mod, name) for mod in group.modules for name in ignore)

    def _group_ratio(self, group: Group, ratio: float) -> float:
        best, best_len = ratio, -1
        for name, r in self.ratios.items():
            if any(_within(mod, name) for mod in group.modules) and len(name) > best_len:
                best, best_len = r, len(name)
        return best

    def _global_targets(self, groups: list[Group], scores: dict[int, torch.Tensor], ratio: float) -> dict[int, float]:
        pooled = []
        for g in groups:
            s = scores[g.id]
            normalised = s / (NORMALIZATIONS[self.normalize](s) + 1e-12)
            pooled.extend((float(v), g.id) for v in normalised)
        pooled.sort()
        budget = int(len(pooled) * ratio)
        removed = {g.id: 0 for g in groups}
        sizes = {g.id: g.size for g in groups}
        for _, gid in pooled:
            if budget == 0:
                break
            if removed[gid] + 1 <= math.floor(sizes[gid] * self.max_ratio):
                removed[gid] += 1
                budget -= 1
        return {gid: removed[gid] / sizes[gid] for gid in removed}

    def _kept_count(self, analysis: Analysis, group: Group, ratio: float) -> int:
        step = 1
        for m in group.members:
            if m.kind != "parameter":
                continue
            cofactor = analysis.spaces.cofactor(m.atom, group.leaf)
            if cofactor is not None:
                need = self.round_to // math.gcd(self.round_to, cofactor)
                step = step * need // math.gcd(step, need)
        keep = group.size - int(group.size * ratio)
        keep = max(step, int(round(keep / step)) * step)
        return min(keep, group.size)

    # --------------------------------------------------------------- pass
    def call(self, state: Frontend[Any]) -> PassResult:
        analysis = state.analysis()
        if (unreduced := self._unreduced()) is not None:
            state.single_process_only(f"ChannelPrune's {unreduced}")
        calibration = state.calibration_data(self._data_option()) if self.reads_calibration() else None
        model, weights = state.criterion_inputs()
        plan = self.plan(analysis, model, calibration, weights, state=state)
        plan.record_slices(analysis)
        corrections, without_bias = {}, 0
        if self.compensate and "bias" in self.compensate:
            corrections, without_bias = bias_corrections(state, analysis, plan, calibration)
        compensate = self.compensate or ""
        refit = state.refit(
            norms="bias" in compensate and self.refit_norms,
            reconstruct="reconstruct" in compensate,
            batchnorm="batchnorm" in compensate,
            damp=self.damp,
        )
        if refit is not None:
            refit.record(analysis, plan, calibration)
        state.prune_channels(plan, corrections)
        details = {
            "groups pruned": f"{len(plan.keep)} of {len(analysis.groups)}",
            "channels removed": plan.removed(analysis),
        }
        if self.compensate and "bias" in self.compensate:
            details["bias compensation"] = f"{len(corrections)} layers" + (
                f" ({without_bias} without a bias left as they are)" if without_bias else ""
            )
            if self.refit_norms and refit is None:
                details["norm re-fit"] = "torch models only: norms over fewer channels are left as they are"
        if refit is not None:
            details |= refit.run(analysis, plan, calibration)
        plan.result = state.analysis().fingerprint  # cached: the next pass reads the same analysis
        state.plans.append(plan)
        return PassResult(state, bool(plan.keep), details)

    def reads_calibration(self) -> bool:
        return self.importance.needs_calibration or bool(self.compensate) or self.allocation == "sensitivity"

    def _data_option(self) -> str:
        """The option that makes this pass read calibration data (for the error without any)."""
        if self.compensate:
            return f"compensate={self.compensate!r}"
        if self.allocation == "sensitivity":
            return "allocation='sensitivity'"
        return f"importance={self.importance_name!r}"

    def _unreduced(self) -> str | None:
        """What this pass computes from statistics that are not sums over batches (None: nothing),
        which ranks of a distributed run could not agree on."""
        if self.allocation == "sensitivity":
            return "sensitivity allocation"
        if (self.compensate or "bias").replace("bias", "").strip("+"):
            return f"compensate={self.compensate!r}"
        return "norm re-fit" if self.compensate and self.refit_norms else None

    def refusal(self, mode: str) -> str | None:
        if mode == STREAMED:
            what = (
                f"compensate={self.compensate!r}"
                if self.compensate
                else "allocation='sensitivity'"
                if self.allocation == "sensitivity"
                else f"importance={self.importance_name!r}"
                if self.importance_name in ("taylor", "bn_scale")
                else None
            )
            if what:
                return (
                    f"ChannelPrune({what}) needs the whole model in memory, which a streamed plan (weights= "
                    "a checkpoint) never builds: use importance 'l1', 'l2', 'activation', 'fluctuation' or a "
                    "callable, without compensation"
                )
        if mode == ONNX:
            if self.importance_name in ("taylor", "bn_scale"):
                return (
                    f"importance={self.importance_name!r} does not run on ONNX models yet: use 'l1', 'l2', "
                    "'activation', 'fluctuation' or a callable (analysis, group, weights by initializer "
                    "name) -> scores"
                )
            if self.compensate not in (None, "bias") or self.allocation == "sensitivity":
                return (
                    f"{'compensate=' + repr(self.compensate) if self.compensate else 'allocation=sensitivity'}"
                    " does not run on ONNX models yet (compensate='bias' does)"
                )
        return None


def _within(module: str, name: str) -> bool:
    return module == name or module.startswith(name + ".") or name == ""


def _check_ratio(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise InputError(f"{name} must be a number in [0, 1), got {value!r}")
