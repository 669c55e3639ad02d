"""Compensation after structured pruning, without retraining.

``batchnorm``: removing channels upstream shifts the statistics every later BatchNorm sees, while
its running mean/var still describe the dense model.  Re-estimating them on calibration data
(every BatchNorm in train mode at once, cumulative averages over the batches, nothing else
touched) is the cheapest recovery there is.

``bias``: a removed input channel ``c`` of a layer contributed ``W[:, c] * x_c``; its expected
value ``W[:, c] * E[x_c]`` (measured on calibration data at the layer's input, in the dense model)
is folded into the layer's bias (FLAP's compensation).  Exact when the removed channels are
constant on the data; layers without a bias are left as they are and counted.

With ``bias``, a LayerNorm or RMSNorm whose normalised channels lose some also computes its
statistics over fewer channels, which changes every kept channel's output (an RMSNorm over
channels that were zero on the data scales them all by ``sqrt(d/k)``).  :func:`record_norms` runs
the dense model once and, at each such norm, feeds its input's kept channels to the norm as the plan
will make it, summing per channel what a least-squares fit of the dense outputs on those outputs
reads (memory: five numbers per kept channel, never the activations); :func:`refit_norms` then
re-fits the pruned norm's affine per channel, ``gamma' = a * gamma`` and ``beta' = a * beta + b``,
by least squares of the dense outputs on the pruned norm's outputs.  ``a = 1, b = 0`` is a candidate, so the calibration
error never grows; exact in the RMSNorm case above.  Norms are ``nn.LayerNorm``, ``nn.RMSNorm``
and modules with a 1-D ``weight`` and a ``variance_epsilon`` (Hugging Face's RMSNorm classes).

``reconstruct``: each layer that lost inputs gets new weights (and bias, if it has one) by least
squares with a ridge towards its pruned weights, so that on the calibration data its outputs, fed by
the *pruned* model, match the dense layer's outputs fed by the dense model (a grouped or depthwise
convolution one problem per group).  A layer with fewer calibration rows (tokens, or conv output
positions) than unknowns per output is left alone, and with two or more batches the last is held
out: a fit on the others that does not lower the error on it is not kept (such a fit matches the
calibration set and nothing else).  Both are reported.  Layers go in graph order, each one seeing inputs
from the already reconstructed layers before it; only the normal equations (``k x k`` for ``k``
kept inputs, times the kernel window for convs) are held, never the activations of the whole set.
A layer keeps its old weights when the solution would not lower its calibration error.  Where the
model is a chain of blocks (:class:`~graphprune.frontends.torch.blocks.Blocks`), the dense and the
pruned model are walked side by side, block by block: a layer's fit runs only its own block (on
the inputs the earlier, already re-fitted blocks produced), so reconstructing every layer costs a
few forwards over the calibration set instead of two per layer; other models run whole forwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from graphprune.algorithms.nm import CONV, CONV1D, from_matrix, to_matrix
from graphprune.algorithms.sparsegpt import ConvGeometry, conv_columns
from graphprune.core.groups import Analysis
from graphprune.core.plan import Plan
from graphprune.errors import InternalError
from graphprune.frontends.torch.blocks import Blocks, by_segment
from graphprune.frontends.torch.calibration import Calibration, Consumer, consumers, forward_batch, run_batches
from graphprune.frontends.torch.capture import eval_mode, qualified, tensor_at
from graphprune.frontends.torch.copying import clone

if TYPE_CHECKING:
    from graphprune.frontends.torch.state import CompressionState


@dataclass
class ModuleRefit:
    """The compensations of a channel plan that need the ``nn.Module`` in memory (norm re-fit,
    reconstruction, BatchNorm re-estimation; :class:`graphprune.core.frontend.Refit`): :meth:`record`
    takes what they read of the dense model before the plan is applied, :meth:`run` fits the pruned
    model after and marks the tensors it changed in ``state.updated`` (for the plan file)."""

    state: CompressionState
    norms: bool
    reconstruct: bool
    batchnorm: bool
    damp: float
    _norms: dict[str, NormRecord] = field(default_factory=dict)
    _dense: nn.Module | None = None

    def record(self, analysis: Analysis, plan: Plan, calibration: list[Any]) -> None:
        if self.norms:
            self._norms = record_norms(analysis, self.state.model, plan, calibration)
        if self.reconstruct and plan.keep:
            self._dense = clone(self.state.model)

    def run(self, analysis: Analysis, plan: Plan, calibration: list[Any]) -> dict[str, str]:
        state = self.state
        norm_errors = refit_norms(state.model, self._norms)
        refits, not_refit, how = (
            reconstruct(analysis, self._dense, state.model, plan, calibration, self.damp)
            if self._dense is not None
            else ([], {}, "")
        )
        self._norms, self._dense = {}, None
        if self.batchnorm:
            reestimate_batchnorm(state.model, calibration)
        state.updated |= _changed(state.model, norm_errors, refits, self.batchnorm)
        details = {}
        if refits:
            before = sum(r.error_before for r in refits) / len(refits)
            after = sum(r.error_after for r in refits) / len(refits)
            details["reconstruction"] = (
                f"{len(refits)} layers, mean relative calibration error {before:.3g} -> {after:.3g} ({how})"
            )
        if not_refit:
            details["not reconstructed"] = "; ".join(f"{k}: {v}" for k, v in not_refit.items())
        if norm_errors:
            before = sum(b for b, _ in norm_errors.values()) / len(norm_errors)
            after = sum(a for _, a in norm_errors.values()) / len(norm_errors)
            details["norm re-fit"] = (
                f"{len(norm_errors)} norms, mean relative calibration error {before:.3g} -> {after:.3g}"
            )
        return details


def _changed(model: nn.Module, norms: dict, refits: list[Reconstruction], batchnorm: bool) -> set[str]:
    """Tensors whose values the compensations changed (for the plan file)."""
    names = {r.layer for r in refits}
    for module_name in [*norms, *(r.layer.rpartition(".")[0] for r in refits)]:
        module = model.get_submodule(module_name)
        names |= {
            qualified(module_name, a) for a in ("weight", "bias") if isinstance(getattr(module, a, None), torch.Tensor)
        }
    if batchnorm:
        names |= {
            qualified(n, b)
            for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for b in ("running_mean", "running_var")
        }
    return names


def reestimate_batchnorm(model: nn.Module, calibration: list[Any]) -> int:
    """Replace every BatchNorm's running statistics by their average over ``calibration``; returns how many."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    with eval_mode(model), torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch weighs the same
            m.train()
        try:
            for index, batch in enumerate(calibration):
                forward_batch(model, batch, index)
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
    return len(norms)


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The norms :func:`refit_norms` knows how to re-fit (see the module doc), by name."""
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or hasattr(module, "variance_epsilon")
        if norm and isinstance(weight, torch.Tensor) and weight.dim() == 1:
            found[name] = module
    return found


@dataclass
class NormRecord:
    """A norm that loses channels: which it keeps, the norm as the plan makes it (its affine sliced),
    and per kept channel the sums over the calibration data of its outputs there (``z``), of the
    dense outputs (``y``), and of their products; ``rows``: the tokens summed over."""

    keep: torch.Tensor
    pruned: nn.Module
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: int = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One call of the dense norm: its input ``x`` and output ``y``."""
        keep = self.keep.to(x.device)
        k = int(keep.sum())
        z = self.pruned(x[..., keep]).double().reshape(-1, k)
        y = y.detach()[..., keep].double().reshape(-1, k)
        for key, value in (("z", z), ("y", y), ("zz", z * z), ("zy", z * y), ("yy", y * y)):
            total = value.sum(0)
            self.sums[key] = self.sums[key] + total if key in self.sums else total
        self.rows += z.shape[0]


def _sliced(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of the norm ``module`` over the ``keep`` channels only (what the plan makes of it)."""
    norm = clone(module)
    index = keep.nonzero().flatten().to(module.weight.device)
    for attr in ("weight", "bias"):
        value = getattr(norm, attr, None)
        if isinstance(value, torch.Tensor):
            setattr(norm, attr, nn.Parameter(value.detach()[index].clone(), requires_grad=False))
    if isinstance(norm, (nn.LayerNorm, nn.RMSNorm)):
        norm.normalized_shape = (len(index),)
    return norm.eval()


def record_norms(analysis: Analysis, model: nn.Module, plan: Plan, calibration: list[Any]) -> dict[str, NormRecord]:
    """Run the dense ``model`` on ``calibration`` and sum what :func:`refit_norms` needs."""
    masks = plan.masks(analysis)
    records: dict[str, NormRecord] = {}
    for name, module in norm_modules(model).items():
        weight = qualified(name, "weight")
        if weight not in analysis.tensors:
            continue
        keep = analysis.spaces.keep_mask(analysis.tensors[weight][1][0], masks)
        if not bool(keep.all()):
            records[name] = NormRecord(keep, _sliced(module, keep))
    if records:
        pending: dict[str, torch.Tensor] = {}  # a norm's input, until its output comes
        run_batches(
            model,
            calibration,
            {name: lambda x, name=name: pending.__setitem__(name, x) for name in records},
            {name: lambda y, r=r, name=name: r.add(pending.pop(name), y) for name, r in records.items()},
        )
    return records


def refit_norms(model: nn.Module, records: dict[str, NormRecord]) -> dict[str, tuple[float, float]]:
    """Re-fit the affine of each pruned norm of ``records`` (see the module doc); returns per norm the
    relative squared calibration error of its kept outputs before and after."""
    errors = {}
    with torch.no_grad():
        for name, record in records.items():
            module = model.get_submodule(name)
            if not torch.equal(module.weight, record.pruned.weight.to(module.weight.device)):
                raise InternalError(
                    f"the norm re-fit of {name} summed outputs of a norm that is not the one the plan made"
                )
            s, rows = record.sums, record.rows
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                var = s["zz"] / rows - (s["z"] / rows) ** 2
                cov = s["zy"] / rows - (s["z"] / rows) * (s["y"] / rows)
                a = torch.where(var > 1e-12, cov / var.clamp_min(1e-12), torch.ones_like(var))
                b = s["y"] / rows - a * s["z"] / rows
            else:
                a = torch.where(s["zz"] > 1e-12, s["zy"] / s["zz"].clamp_min(1e-12), torch.ones_like(s["zz"]))
                b = torch.zeros_like(a)
            before = (s["yy"] - 2 * s["zy"] + s["zz"]).sum()
            after = (
                s["yy"] - 2 * a * s["zy"] - 2 * b * s["y"] + a * a * s["zz"] + 2 * a * b * s["z"] + rows * b * b
            ).sum()
            total = s["yy"].sum().clamp_min(1e-30)
            errors[name] = (float(before / total), float(after.clamp_min(0) / total))
            module.weight.mul_(a.to(module.weight))
            if isinstance(bias, torch.Tensor):
                bias.mul_(a.to(bias)).add_(b.to(bias))
    return errors


def apply_bias_corrections(model: nn.Module, corrections: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, delta in corrections.items():
            bias = tensor_at(model, name)
            bias.add_(delta.to(bias.dtype))


@dataclass
class Reconstruction:
    layer: str
    error_before: float  # squared output error on the calibration data, relative to the dense outputs
    error_after: float
    skipped: str | None = None  # why the layer kept its weights without trying


def reconstruct(
    analysis: Analysis, dense: nn.Module, pruned: nn.Module, plan: Plan, calibration: list[Any], damp: float = 0.01
) -> tuple[list[Reconstruction], dict[str, str], str]:
    """Re-fit every layer of ``pruned`` that lost inputs to ``dense``'s outputs (see the module doc).

    ``analysis`` and ``plan`` describe ``dense``; module names are shared by both models.  Returns one
    record per re-fitted layer, the layers left alone with the reason, and how the data ran.
    """
    masks = plan.masks(analysis)
    spaces = analysis.spaces
    skipped: dict[str, str] = {}
    kept_outputs: dict[Consumer, torch.Tensor] = {}
    for layer in dict.fromkeys(consumers(analysis)):
        x_atom = analysis.tensors[layer.weight][1][0 if layer.layout == CONV1D else 1]
        if bool(spaces.keep_mask(x_atom, masks).all()):
            continue
        module = pruned.get_submodule(layer.module)
        if layer.matmul:
            skipped[layer.weight] = "a matmul inside a larger module"
        elif layer.layout == CONV and (
            isinstance(module.padding, str) or module.padding_mode != "zeros" or module.weight.dim() > 4
        ):
            skipped[layer.weight] = "3-D, 'same'-padded or non-zero-padded convolution"
        else:
            out_atom = analysis.tensors[layer.weight][1][1 if layer.layout == CONV1D else 0]
            kept_outputs[layer] = spaces.keep_mask(out_atom, masks)
    done = []
    walk, how = _walk(list(kept_outputs), dense, pruned, calibration)
    for layer, dense_parts, pruned_parts in walk:
        record = _refit(layer, dense, pruned, kept_outputs[layer], dense_parts, pruned_parts, damp)
        if record.skipped:
            skipped[layer.weight] = record.skipped
        else:
            done.append(record)
    return done, skipped, how


Parts = list[Calibration]  # a layer's calibration one batch at a time (the last may be held out)


def _walk(
    layers: list[Consumer], dense: nn.Module, pruned: nn.Module, calibration: list[Any]
) -> tuple[Iterator[tuple[Consumer, Parts, Parts]], str]:
    """Each layer in order with the runs that feed it, per batch, in the dense and in the pruned
    model: its block's (both models walked block by block side by side), or whole forwards where
    the models are not a chain of blocks; and which of the two, said for the report."""
    chain = Blocks(calibration)
    problem = chain.chain_problem(dense) if layers else "no layer to re-fit"
    if problem is None:
        problem = chain.chain_problem(pruned)
    between: dict[str, str] = {}
    segments = by_segment(chain, dense, layers, between) if problem is None else {}
    if problem is None and between:
        problem = f"{next(iter(between))} sits between the blocks"
    if problem is not None:
        whole: Parts = [[batch] for batch in calibration]
        return ((layer, whole, whole) for layer in layers), f"whole forwards, not block by block: {problem}"
    path, blocks = chain.block_list(dense)
    return _side_by_side(segments, dense, pruned, calibration), f"block by block over {path} ({len(blocks)} blocks)"


def _side_by_side(
    segments: dict[str, list[Consumer]], dense: nn.Module, pruned: nn.Module, calibration: list[Any]
) -> Iterator[tuple[Consumer, Parts, Parts]]:
    """The dense and the pruned model walked block by block in step: a part's layers are re-fitted
    before the pruned model's data moves on through it."""
    with (
        contextlib.closing(Blocks(calibration).segments(dense)) as dense_walk,
        contextlib.closing(Blocks(calibration).segments(pruned)) as pruned_walk,
    ):
        for (segment, dense_part), (_, pruned_part) in zip(dense_walk, pruned_walk, strict=True):
            for layer in segments.get(segment, []):
                yield layer, dense_part.split(), pruned_part.split()


def _refit(
    layer: Consumer,
    dense: nn.Module,
    pruned: nn.Module,
    keep_out: torch.Tensor,
    dense_parts: Parts,
    pruned_parts: Parts,
    damp: float,
) -> Reconstruction:
    """Re-fit one layer; a grouped convolution is one least-squares problem per group (its outputs
    read only their group's inputs), with one held-out check over all groups."""
    module = pruned.get_submodule(layer.module)
    attr = layer.weight.rpartition(".")[2]
    weight = getattr(module, attr)
    bias = module.bias if isinstance(getattr(module, "bias", None), torch.Tensor) else None
    groups = module.groups if layer.layout == CONV else 1
    per_group = int(keep_out.sum()) // groups  # outputs of each group, in the pruned layer
    seen: dict[str, list[torch.Tensor]] = {}

    def columns(x: torch.Tensor, group: int) -> torch.Tensor:
        x = x.detach().double()
        cols = conv_columns(x, ConvGeometry.of(module), group) if layer.layout == CONV else x.reshape(-1, x.shape[-1])
        ones = torch.ones(cols.shape[0], 1, dtype=cols.dtype, device=cols.device)
        return torch.cat([cols, ones], 1) if bias is not None else cols

    def targets(y: torch.Tensor, group: int) -> torch.Tensor:
        y = y.detach().double()
        y = y.movedim(1, -1).reshape(-1, y.shape[1]) if layer.layout == CONV else y.reshape(-1, y.shape[-1])
        return y[:, keep_out][:, group * per_group : (group + 1) * per_group]

    # per group, normal equations (gram, cross, ||y||^2, rows) of all batches but the last, and of
    # the last; with two or more batches the last is held out: the fit on the others must lower its error
    fit: list[tuple | None] = [None] * groups
    check: list[tuple | None] = [None] * groups
    for i, (dense_part, pruned_part) in enumerate(zip(dense_parts, pruned_parts, strict=True)):
        seen.clear()  # a module called several times per forward contributes every call
        run_batches(dense, dense_part, {}, {layer.module: lambda y: seen.setdefault("y", []).append(y)})
        run_batches(pruned, pruned_part, {layer.module: lambda x: seen.setdefault("x", []).append(x)})
        held_out = i == len(dense_parts) - 1 and i > 0
        for g in range(groups):
            a = torch.cat([columns(x, g) for x in seen["x"]])
            y = torch.cat([targets(y, g) for y in seen["y"]])
            eqs = (a.T @ a, a.T @ y, float(y.pow(2).sum()), a.shape[0])
            if held_out:
                check[g] = eqs
            else:
                fit[g] = eqs if fit[g] is None else _add(fit[g], eqs)
    check = [c or f for c, f in zip(check, fit)]
    everything = [_add(f, c) if c is not f else f for f, c in zip(fit, check)]
    current = to_matrix(weight.detach(), layer.layout).double()  # [out, k]
    if bias is not None:
        current = torch.cat([current, bias.detach().double()[:, None]], 1)
    rows = [current[g * per_group : (g + 1) * per_group] for g in range(groups)]
    unknowns = current.shape[1]
    if fit[0][3] < unknowns:
        return Reconstruction(
            layer=layer.weight,
            error_before=0.0,
            error_after=0.0,
            skipped=f"{fit[0][3]} calibration rows to fit {unknowns} unknowns per "
            "output: give more calibration data to reconstruct it",
        )
    held_before = _error(rows, check)
    if _error([_solve(f, r, damp) for f, r in zip(fit, rows)], check) >= held_before:
        before = _error(rows, everything)
        return Reconstruction(
            layer=layer.weight,
            error_before=before,
            error_after=before,
            skipped="the fit did not lower the error on the held-out batch",
        )
    solution = [_solve(e, r, damp) for e, r in zip(everything, rows)]
    before, after = _error(rows, everything), _error(solution, everything)
    solved = torch.cat(solution)
    k = unknowns - (bias is not None)
    with torch.no_grad():
        weight.copy_(from_matrix(solved[:, :k], layer.layout, weight.shape).to(weight.dtype))
        if bias is not None:
            bias.copy_(solved[:, k].to(bias.dtype))
    return Reconstruction(layer.weight, before, after)


def _add(a: tuple, b: tuple) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]


def _solve(eqs: tuple, current: torch.Tensor, damp: float) -> torch.Tensor:
    """Least squares with a ridge towards ``current`` (the pruned weights): where the data says
    little, they stay.  Returns ``[out, k]``."""
    gram, cross = eqs[0], eqs[1]
    strength = damp * gram.diagonal().mean()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + strength * eye, cross + strength * current.T).T


def _error(weights: list[torch.Tensor], eqs: list[tuple]) -> float:
    """``sum ||A_g w_g^T - Y_g||^2 / sum ||Y_g||^2`` over the groups, from their normal equations."""
    squared = sum(float((w @ e[0] * w).sum() - 2 * (w * e[1].T).sum() + e[2]) for w, e in zip(weights, eqs))
    return squared / max(sum(e[2] for e in eqs), 1e-30)
