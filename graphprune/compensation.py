"""Compensation after structured pruning, without retraining.

``batchnorm``: removing channels upstream shifts the statistics every later BatchNorm sees, while
its running mean/var still describe the dense model.  Re-estimating them on calibration data
(every BatchNorm in train mode at once, cumulative averages over the batches, nothing else
touched) is the cheapest recovery there is.

``bias``: a removed input channel ``c`` of a layer contributed ``W[:, c] * x_c``; its expected
value ``W[:, c] * E[x_c]`` (measured on calibration data at the layer's input, in the dense model)
is folded into the layer's bias (FLAP's compensation).  Exact when the removed channels are
constant on the data; layers without a bias are left as they are and counted.

``reconstruct``: each layer that lost inputs gets new weights (and bias, if it has one) by least
squares with a ridge towards its pruned weights, so that on the calibration data its outputs, fed by
the *pruned* model, match the dense layer's outputs fed by the dense model.  A layer with fewer
calibration rows (tokens, or conv output positions) than unknowns per output is left alone, and with
two or more batches the last is held out: a fit on the others that does not lower the error on it is
not kept (such a fit matches the calibration set and nothing else).  Both are reported.  Layers go in graph order, each one seeing inputs
from the already reconstructed layers before it; only the normal equations (``k x k`` for ``k``
kept inputs, times the kernel window for convs) are held, never the activations of the whole set.
A layer keeps its old weights when the solution would not lower its calibration error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from graphprune.analysis import Analysis
from graphprune.calibration import Consumer, consumers, input_moments, run_batches
from graphprune.capture import eval_mode, normalize_inputs, tensor_at
from graphprune.plan import Plan
from graphprune.sparsegpt import ConvGeometry, conv_columns
from graphprune.sparsity import CONV, CONV1D, LINEAR, from_matrix, to_matrix


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
            for batch in calibration:
                args, kwargs = normalize_inputs(batch)
                model(*args, **kwargs)
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
    return len(norms)


def bias_corrections(analysis: Analysis, model: nn.Module, plan: Plan,
                     calibration: list[Any]) -> tuple[dict[str, torch.Tensor], int]:
    """Per bias (by name, in the pruned layout): what to add so removed inputs keep their mean effect.

    Computed on the dense ``model`` before the plan is applied.  Also returns how many layers lose
    inputs but have no bias to take the correction.
    """
    masks = plan.masks(analysis)
    spaces = analysis.spaces
    layers = [c for c in consumers(analysis) if not c.matmul and (c.layout != CONV or c.groups == 1)]
    losing = []
    for layer in layers:
        x_atom = analysis.tensors[layer.weight][1][0 if layer.layout == CONV1D else 1]
        removed = ~spaces.keep_mask(x_atom, masks)
        if bool(removed.any()):
            losing.append((layer, removed))
    moments = input_moments(model, [layer for layer, _ in losing], calibration)
    corrections, without_bias = {}, 0
    for layer, removed in losing:
        bias_name = layer.module + ".bias" if layer.module else "bias"
        if bias_name not in analysis.tensors or tensor_at(model, bias_name) is None:
            without_bias += 1
            continue
        delta = removed_contribution(tensor_at(model, layer.weight), layer.layout, removed, moments[layer][0])
        out_atom = analysis.tensors[bias_name][1][0]
        keep_out = spaces.keep_mask(out_atom, masks)
        corrections[bias_name] = delta[keep_out]
    return corrections, without_bias


def removed_contribution(weight: torch.Tensor, layout: str, removed: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Per output channel, the mean contribution of the ``removed`` input channels (``mean``: the
    input's mean per channel) through ``weight`` in ``layout``."""
    w = weight.detach().double()
    if layout == LINEAR:  # [out, in]
        return w[:, removed] @ mean[removed]
    if layout == CONV1D:  # [in, out]
        return mean[removed] @ w[removed, :]
    return w[:, removed].sum(tuple(range(2, w.dim()))) @ mean[removed]


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


def reconstruct(analysis: Analysis, dense: nn.Module, pruned: nn.Module, plan: Plan, calibration: list[Any],
                damp: float = 0.01) -> tuple[list[Reconstruction], dict[str, str]]:
    """Re-fit every layer of ``pruned`` that lost inputs to ``dense``'s outputs (see the module doc).

    ``analysis`` and ``plan`` describe ``dense``; module names are shared by both models.  Returns one
    record per re-fitted layer and the layers left alone with the reason.
    """
    masks = plan.masks(analysis)
    spaces = analysis.spaces
    done, skipped = [], {}
    for layer in dict.fromkeys(consumers(analysis)):
        x_atom = analysis.tensors[layer.weight][1][0 if layer.layout == CONV1D else 1]
        if bool(spaces.keep_mask(x_atom, masks).all()):
            continue
        module = pruned.get_submodule(layer.module)
        if layer.matmul:
            skipped[layer.weight] = "a matmul inside a larger module"
        elif layer.layout == CONV and (layer.groups > 1 or isinstance(module.padding, str)
                                       or module.padding_mode != "zeros" or module.weight.dim() > 4):
            skipped[layer.weight] = "grouped, 3-D or non-zero-padded convolution"
        else:
            out_atom = analysis.tensors[layer.weight][1][1 if layer.layout == CONV1D else 0]
            record = _refit(layer, dense, pruned, spaces.keep_mask(out_atom, masks), calibration, damp)
            if record.skipped:
                skipped[layer.weight] = record.skipped
            else:
                done.append(record)
    return done, skipped


def _refit(layer: Consumer, dense: nn.Module, pruned: nn.Module, keep_out: torch.Tensor, calibration: list[Any],
           damp: float) -> Reconstruction:
    module = pruned.get_submodule(layer.module)
    attr = layer.weight.rpartition(".")[2]
    weight = getattr(module, attr)
    bias = module.bias if isinstance(getattr(module, "bias", None), torch.Tensor) else None
    seen: dict[str, list[torch.Tensor]] = {}

    def columns(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().double()
        cols = conv_columns(x, ConvGeometry.of(module), 0) if layer.layout == CONV else x.reshape(-1, x.shape[-1])
        return torch.cat([cols, torch.ones(cols.shape[0], 1, dtype=cols.dtype)], 1) if bias is not None else cols

    def targets(y: torch.Tensor) -> torch.Tensor:
        y = y.detach().double()
        y = y.movedim(1, -1).reshape(-1, y.shape[1]) if layer.layout == CONV else y.reshape(-1, y.shape[-1])
        return y[:, keep_out]

    # normal equations (gram, cross, ||y||^2, rows) of all batches but the last, and of the last;
    # with two or more batches the last is held out: the fit on the others must lower its error
    fit = check = None
    for i, batch in enumerate(calibration):
        seen.clear()  # a module called several times per forward contributes every call
        run_batches(dense, [batch], {}, {layer.module: lambda y: seen.setdefault("y", []).append(y)})
        run_batches(pruned, [batch], {layer.module: lambda x: seen.setdefault("x", []).append(x)})
        a = torch.cat([columns(x) for x in seen["x"]])
        y = torch.cat([targets(y) for y in seen["y"]])
        eqs = (a.T @ a, a.T @ y, float(y.pow(2).sum()), a.shape[0])
        if i == len(calibration) - 1 and i > 0:
            check = eqs
        else:
            fit = eqs if fit is None else _add(fit, eqs)
    check = check or fit
    everything = _add(fit, check) if check is not fit else fit
    current = to_matrix(weight.detach(), layer.layout).double()  # [out, k]
    if bias is not None:
        current = torch.cat([current, bias.detach().double()[:, None]], 1)
    unknowns = current.shape[1]
    if fit[3] < unknowns:
        return Reconstruction(layer.weight, 0.0, 0.0, f"{fit[3]} calibration rows to fit {unknowns} unknowns per "
                                                      "output: give more calibration data to reconstruct it")
    if _error(_solve(fit, current, damp), check) >= _error(current, check):
        before = _error(current, everything)
        return Reconstruction(layer.weight, before, before, "the fit did not lower the error on the held-out batch")
    solution = _solve(everything, current, damp)
    before, after = _error(current, everything), _error(solution, everything)
    k = unknowns - (bias is not None)
    with torch.no_grad():
        weight.copy_(from_matrix(solution[:, :k], layer.layout, weight.shape).to(weight.dtype))
        if bias is not None:
            bias.copy_(solution[:, k].to(bias.dtype))
    return Reconstruction(layer.weight, before, after)


def _add(a: tuple, b: tuple) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]


def _solve(eqs: tuple, current: torch.Tensor, damp: float) -> torch.Tensor:
    """Least squares with a ridge towards ``current`` (the pruned weights): where the data says
    little, they stay.  Returns ``[out, k]``."""
    gram, cross = eqs[0], eqs[1]
    strength = damp * gram.diagonal().mean()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + strength * eye, cross + strength * current.T).T


def _error(w: torch.Tensor, eqs: tuple) -> float:
    """``||A w^T - Y||^2 / ||Y||^2`` from the normal equations."""
    gram, cross, total = eqs[0], eqs[1], eqs[2]
    return float((w @ gram * w).sum() - 2 * (w * cross.T).sum() + total) / max(total, 1e-30)
