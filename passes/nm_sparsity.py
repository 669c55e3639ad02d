"""NMSparsity: N:M semi-structured sparsity masks on linear, Conv1D and conv weights.

Which weights: every layer that multiplies an activation by a parameter weight (found in the
captured graph), except those named in ``ignore`` and, by default, what one-shot pruning
usually leaves dense: the first convolution (it reads the model input) and output heads (their
outputs reach the model outputs).  Weights whose reduction width cannot hold the pattern are
skipped; every skip is reported with its reason.

Criteria: ``magnitude`` (|W|) and ``wanda`` (|W| times the RMS of the matching input channel over
calibration batches, Sun et al. 2023).  Masks are attached as parametrizations, so fine-tuning
cannot revive pruned weights; :func:`graphprune.sparsity.finalize` bakes them in.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from graphprune.analysis import Analysis
from graphprune.calibration import Consumer, batches, consumers, input_rms
from graphprune.capture import tensor_at
from graphprune.errors import InputError
from graphprune.pipeline import CompressionState, Pass, PassResult, Stage
from graphprune.sparsity import CONV, CONV1D, NMPattern, attach, fits, nm_mask

METHODS = ("magnitude", "wanda")


class NMSparsity(Pass):
    """Keep ``n`` of every ``m`` consecutive weights along each layer's reduction dim.

    Args:
        n, m: the pattern (2:4 by default; any 0 < n < m, e.g. 1:4, 4:8, 2:8).
        method: ``"magnitude"`` or ``"wanda"`` (needs ``calibration=`` in ``gp.prune``).
        ignore: module names (or prefixes) left dense.
        dense_first_conv: leave convolutions that read the model input dense.
        dense_heads: leave layers whose outputs reach the model outputs dense.
    """

    accepts = frozenset({Stage.DENSE, Stage.STRUCTURED})
    produces = Stage.MASKED

    def __init__(self, n: int = 2, m: int = 4, *, method: str = "magnitude", ignore: Iterable[str] = (),
                 dense_first_conv: bool = True, dense_heads: bool = True) -> None:
        NMPattern(n, m, "linear")  # validates n and m
        if method not in METHODS:
            raise InputError(f"NMSparsity method must be one of {list(METHODS)}, got {method!r} "
                             "(SparseGPT and channel permutations are not available yet)")
        self.n, self.m, self.method = n, m, method
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
        chosen, skipped = [], {}
        for layer in consumers(analysis):
            weight = tensor_at(model, layer.weight)
            pattern = NMPattern(self.n, self.m, layer.layout)
            if layer.layout == CONV and layer.groups > 1 and weight.shape[1] == 1:
                skipped[layer.weight] = "depthwise convolution (one input channel per filter)"
            elif any(layer.module == i or layer.module.startswith(i + ".") for i in self.ignore):
                skipped[layer.weight] = "ignored"
            elif self.dense_first_conv and layer.layout == CONV and layer.node.args[0] in inputs:
                skipped[layer.weight] = "first convolution (reads the model input); dense_first_conv=False to mask it"
            elif self.dense_heads and analysis.reaches_output(_output_channels(analysis, layer)):
                skipped[layer.weight] = "output head; dense_heads=False to mask it"
            elif (why := fits(weight, pattern)) is not None:
                skipped[layer.weight] = why
            else:
                chosen.append(layer)
        return list({c.weight: c for c in chosen}.values()), skipped

    def call(self, state: CompressionState) -> PassResult:
        analysis, model = state.analysis(), state.model
        layers, skipped = self.selected(analysis, model)
        rms = input_rms(model, layers, batches(state.calibration, "NMSparsity(method='wanda')")) \
            if self.method == "wanda" else {}
        for layer in layers:
            owner = model.get_submodule(layer.module)
            attr = layer.weight.rpartition(".")[2]
            weight = getattr(owner, attr).detach()
            scores = weight.abs().float()
            if layer in rms:
                scores = scores * _per_input_channel(rms[layer], layer, weight.shape).to(scores)
            attach(owner, attr, nm_mask(scores, NMPattern(self.n, self.m, layer.layout)), NMPattern(self.n, self.m, layer.layout))
        state.stage = Stage.MASKED
        details = {"pattern": f"{self.n}:{self.m} ({self.method})", "masked layers": len(layers)}
        if skipped:
            details["dense layers"] = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        return PassResult(state, bool(layers), details)


def _output_channels(analysis: Analysis, layer: Consumer) -> int:
    """The atom of the layer's output channel dim."""
    dims = analysis.context.dims(layer.node)
    return dims[1] if layer.layout == CONV else dims[-1]


def _per_input_channel(rms: torch.Tensor, layer: Consumer, shape: torch.Size) -> torch.Tensor:
    """The input-channel RMS broadcast to the weight's shape."""
    if layer.layout == CONV1D:  # [in, out]
        return rms[:, None]
    if layer.layout == CONV:
        k, c_group = shape[:2]
        per_filter = rms.reshape(layer.groups, c_group).repeat_interleave(k // layer.groups, dim=0)  # [K, C/g]
        return per_filter.reshape(k, c_group, *([1] * (len(shape) - 2)))
    return rms[None, :]
