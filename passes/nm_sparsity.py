"""NMSparsity: N:M semi-structured sparsity masks on linear, Conv1D and conv weights.

Which weights: every layer that multiplies an activation by a parameter weight (found in the
captured graph), except those named in ``ignore`` and, by default, what one-shot pruning
usually leaves dense: the first convolution (it reads the model input) and output heads (their
outputs reach the model outputs).  Weights whose reduction width cannot hold the pattern are
skipped; every skip is reported with its reason.

Criteria: ``magnitude`` (|W|); ``wanda`` (|W| times the RMS of the matching input channel over
calibration batches, Sun et al. 2023); ``sparsegpt`` (second-order mask choice and weight update,
:mod:`graphprune.sparsegpt`), layer by layer in graph order with each layer's inputs taken from the
already-sparsified model (layers that read the same activation share one Hessian).  Masks are
attached as parametrizations, so fine-tuning cannot revive pruned weights;
:func:`graphprune.sparsity.finalize` bakes them in.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from graphprune.analysis import Analysis
from graphprune.calibration import Consumer, batches, consumers, input_rms
from graphprune.capture import normalize_inputs, tensor_at
from graphprune.errors import InputError
from graphprune.pipeline import CompressionState, Pass, PassResult, Stage
from graphprune.sparsegpt import conv_columns, prune_matrix
from graphprune.sparsity import CONV, CONV1D, NMPattern, attach, fits, from_matrix, nm_mask, to_matrix

METHODS = ("magnitude", "wanda", "sparsegpt")


class NMSparsity(Pass):
    """Keep ``n`` of every ``m`` consecutive weights along each layer's reduction dim.

    Args:
        n, m: the pattern (2:4 by default; any 0 < n < m, e.g. 1:4, 4:8, 2:8).
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"`` (the last two need ``calibration=``).
        block, damp: SparseGPT's column block size and Hessian damping (fraction of its mean diagonal).
        ignore: module names (or prefixes) left dense.
        dense_first_conv: leave convolutions that read the model input dense.
        dense_heads: leave layers whose outputs reach the model outputs dense.
    """

    accepts = frozenset({Stage.DENSE, Stage.STRUCTURED})
    produces = Stage.MASKED

    def __init__(self, n: int = 2, m: int = 4, *, method: str = "magnitude", ignore: Iterable[str] = (),
                 dense_first_conv: bool = True, dense_heads: bool = True, block: int = 128,
                 damp: float = 0.01) -> None:
        NMPattern(n, m, "linear")  # validates n and m
        if method not in METHODS:
            raise InputError(f"NMSparsity method must be one of {list(METHODS)}, got {method!r}")
        if not 0 <= damp < 1 or block < m:
            raise InputError(f"NMSparsity needs 0 <= damp < 1 and block >= m, got damp={damp}, block={block}")
        self.n, self.m, self.method, self.block, self.damp = n, m, method, block, damp
        self.ignore = list(ignore)
        self.dense_first_conv, self.dense_heads = dense_first_conv, dense_heads

    def __repr__(self) -> str:
        return f"NMSparsity({self.n}:{self.m}, method={self.method!r})"

    def selected(self, analysis: Analysis, model: nn.Module) -> tuple[list[Consumer], dict[str, str]]:
        """The layers to mask, and the skipped ones with the reason."""
        names = dict(model.named_modules())
        for name in self.ignore:
            if name not in names:
                raise InputError(f"NMSparsity ignore: no module named {name!r} in {type(model).__name__}")
        inputs = set(analysis.captured.user_inputs)
        layers = consumers(analysis)
        heads = _heads(analysis, layers)
        chosen, skipped = [], {}
        for layer in layers:
            weight = tensor_at(model, layer.weight)
            pattern = NMPattern(self.n, self.m, layer.layout)
            if layer.layout == CONV and layer.groups > 1 and weight.shape[1] == 1:
                skipped[layer.weight] = "depthwise convolution (one input channel per filter)"
            elif any(layer.module == i or layer.module.startswith(i + ".") for i in self.ignore):
                skipped[layer.weight] = "ignored"
            elif self.dense_first_conv and layer.layout == CONV and layer.node.args[0] in inputs:
                skipped[layer.weight] = "first convolution (reads the model input); dense_first_conv=False to mask it"
            elif self.dense_heads and layer.node in heads:
                skipped[layer.weight] = "output head; dense_heads=False to mask it"
            elif (why := fits(weight, pattern)) is not None:
                skipped[layer.weight] = why
            else:
                chosen.append(layer)
        return list({c.weight: c for c in chosen}.values()), skipped

    def call(self, state: CompressionState) -> PassResult:
        analysis, model = state.analysis(), state.model
        layers, skipped = self.selected(analysis, model)
        calibration = batches(state.calibration, f"NMSparsity(method={self.method!r})") \
            if self.method != "magnitude" else None
        if self.method == "sparsegpt":
            self._sparsegpt(model, analysis, layers, calibration)
        else:
            rms = input_rms(model, layers, calibration) if self.method == "wanda" else {}
            for layer in layers:
                owner, attr = _owner(model, layer)
                weight = getattr(owner, attr).detach()
                scores = weight.abs().float()
                if layer in rms:
                    scores = scores * _per_input_channel(rms[layer], layer, weight.shape).to(scores)
                pattern = NMPattern(self.n, self.m, layer.layout)
                attach(owner, attr, nm_mask(scores, pattern), pattern)
        state.stage = Stage.MASKED
        details = {"pattern": f"{self.n}:{self.m} ({self.method})", "masked layers": len(layers)}
        if skipped:
            details["dense layers"] = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        return PassResult(state, bool(layers), details)


    def _sparsegpt(self, model: nn.Module, analysis: Analysis, layers: list[Consumer], calibration: list) -> None:
        """Layer by layer in graph order; linear layers reading one activation share its Hessian."""
        by_input: dict[tuple, list[Consumer]] = {}
        for layer in layers:  # convs see their input through their own patch geometry
            key = (_input_node(layer), layer.module if layer.layout == CONV else None)
            by_input.setdefault(key, []).append(layer)
        for group in by_input.values():
            hessians = _hessians(model, group[0], calibration)
            for layer in group:
                owner, attr = _owner(model, layer)
                weight = getattr(owner, attr).detach()
                pattern = NMPattern(self.n, self.m, layer.layout)
                new, keep = torch.empty_like(weight), torch.empty_like(weight, dtype=torch.bool)
                rows = weight.shape[0] // len(hessians) if layer.layout == CONV else None
                for g, hessian in enumerate(hessians):
                    part = weight[g * rows:(g + 1) * rows] if rows else weight
                    w, k = prune_matrix(to_matrix(part, layer.layout), hessian, pattern, block=self.block, damp=self.damp)
                    target = slice(g * rows, (g + 1) * rows) if rows else slice(None)
                    new[target] = from_matrix(w, layer.layout, part.shape).to(weight.dtype)
                    keep[target] = from_matrix(k, layer.layout, part.shape)
                with torch.no_grad():
                    getattr(owner, attr).copy_(new)
                attach(owner, attr, keep, pattern)


def _owner(model: nn.Module, layer: Consumer) -> tuple[nn.Module, str]:
    return model.get_submodule(layer.module), layer.weight.rpartition(".")[2]


def _input_node(layer: Consumer) -> fx.Node:
    return layer.node.args[1] if layer.layout == CONV1D else layer.node.args[0]


def _hessians(model: nn.Module, layer: Consumer, calibration: list) -> list[torch.Tensor]:
    """``2/N sum x x^T`` of the layer's inputs (one per conv group), from the model as it is now."""
    module = model.get_submodule(layer.module)
    sums: list[torch.Tensor] = []
    count = [0]

    def hook(_mod, args, kwargs):
        x = (args[0] if args else next(iter(kwargs.values()))).detach().double()
        if layer.layout == CONV:
            cols = [conv_columns(x, module, g) for g in range(module.groups)]
        else:
            cols = [x.reshape(-1, x.shape[-1])]
        for g, c in enumerate(cols):
            if len(sums) <= g:
                sums.append(torch.zeros(c.shape[1], c.shape[1], dtype=torch.float64))
            sums[g] += c.T @ c
        count[0] += cols[0].shape[0]

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in calibration:
                args, kwargs = normalize_inputs(batch)
                model(*args, **kwargs)
    finally:
        handle.remove()
        for m, flag in training.items():
            m.training = flag
    return [2 * s / max(count[0], 1) for s in sums]


def _heads(analysis: Analysis, layers: list[Consumer]) -> set[fx.Node]:
    """Layers whose result reaches a model output through single-input ops only (views, casts,
    activations, norms): classifiers and LM heads, not blocks that write a residual stream."""
    layer_nodes = {layer.node for layer in layers}
    params = analysis.context.parameter_nodes
    heads: set[fx.Node] = set()
    for output in analysis.captured.outputs:
        node = output
        while node.op == "call_function":
            if node in layer_nodes:
                heads.add(node)
                break
            activations = [x for x in node.all_input_nodes if x not in params]
            if len(activations) != 1:
                break
            node = activations[0]
    return heads


def _per_input_channel(rms: torch.Tensor, layer: Consumer, shape: torch.Size) -> torch.Tensor:
    """The input-channel RMS broadcast to the weight's shape."""
    if layer.layout == CONV1D:  # [in, out]
        return rms[:, None]
    if layer.layout == CONV:
        k, c_group = shape[:2]
        per_filter = rms.reshape(layer.groups, c_group).repeat_interleave(k // layer.groups, dim=0)  # [K, C/g]
        return per_filter.reshape(k, c_group, *([1] * (len(shape) - 2)))
    return rms[None, :]
