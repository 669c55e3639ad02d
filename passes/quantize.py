"""Quantize: static int8 quantization (fake-quant in PyTorch, parameters recorded for emitters).

Which layers: every layer that multiplies an activation by a parameter weight (linear,
transformers' Conv1D, conv, matmul against a parameter), except those named or typed in
``skip`` and those whose weight object is shared with another module (quantizing one user of
a tied weight would silently change the other).  Each skip is reported with its reason.

What is quantized (see :mod:`graphprune.algorithms.quant` for the arithmetic):
- the weight, per output channel, symmetric, zero-point 0, so N:M zeros stay exact zeros;
- the layer's input activation, per tensor, calibrated;
- the layer's own bias, as int32 with scale ``input_scale * weight_scale[c]`` (what integer kernels
  add to their accumulator; onnxruntime fuses a float-output Gemm only with such a bias);
- a convolution's output too (onnxruntime fuses QLinearConv only when the output is quantized).
  BatchNorm after a convolution is folded into it first, and when a ReLU follows, the output
  range starts at 0 so the quantization itself clips (the emitter can then drop the ReLU).
  Linear outputs stay float: QGemm / MatMulIntegerToFloat produce float, which keeps residual
  streams and softmax inputs at full precision.

Activation ranges (``activations``): ``"minmax"`` uses the extremes seen in calibration;
``"percentile"`` the ``percentile``-th percentile of each tail, which ignores rare outliers;
``"auto"`` (default) uses min/max for convolutions (post-ReLU CNN activations are bounded, and
clipping them loses more than it gains) and the percentile for linear and matmul inputs
(transformer activations carry rare large outliers that would waste most of the 8-bit range).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.nn as nn

from graphprune.algorithms.quant import observe_ranges, quant_plan
from graphprune.core.frontend import Frontend
from graphprune.core.layers import WeightLayer
from graphprune.core.pipeline import MODULE, ONNX, STREAMED, Pass, PassResult, Stage
from graphprune.errors import InputError

ACTIVATION_METHODS = ("auto", "minmax", "percentile")


class Quantize(Pass):
    """Static int8 quantization of weights (per channel) and activations (per tensor).

    Args:
        dtype: ``"int8"`` (the only one so far).
        activations: ``"auto"``, ``"minmax"`` or ``"percentile"`` (how activation ranges are
            calibrated; needs ``calibration=``).
        percentile: the tail percentile for ``"percentile"`` (and ``"auto"`` on linear layers).
        skip: module names (or prefixes) and module types left in float.
    """

    modes = frozenset({MODULE, STREAMED, ONNX})
    accepts = frozenset({Stage.DENSE, Stage.STRUCTURED, Stage.MASKED, Stage.COMPENSATED})
    produces = Stage.QUANTIZED

    def __init__(
        self,
        dtype: str = "int8",
        *,
        activations: str = "auto",
        percentile: float = 99.99,
        skip: Iterable[str | type] = (),
    ) -> None:
        if dtype != "int8":
            raise InputError(f"Quantize supports dtype='int8' only, got {dtype!r}")
        if activations not in ACTIVATION_METHODS:
            raise InputError(f"Quantize activations must be one of {list(ACTIVATION_METHODS)}, got {activations!r}")
        if isinstance(percentile, bool) or not isinstance(percentile, int | float) or not 50 < percentile <= 100:
            raise InputError(f"Quantize percentile must be a number in (50, 100], got {percentile!r}")
        self.skip = list(skip)
        for s in self.skip:
            if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module))):
                raise InputError(f"Quantize skip takes module names and nn.Module types, got {s!r}")
        self.dtype, self.activations, self.percentile = dtype, activations, float(percentile)

    def __repr__(self) -> str:
        return f"Quantize({self.dtype!r}, activations={self.activations!r})"

    def refusal(self, mode: str) -> str | None:
        if mode == STREAMED:
            return (
                "Quantize does not run in a streamed plan (weights= a checkpoint) yet: plan the sparsity "
                "there, apply it to the checkpoint, then quantize the pruned model"
            )
        if mode == ONNX and any(not isinstance(s, str) for s in self.skip):
            return (
                "Quantize skip on ONNX models takes names (module paths, which torch exports use as "
                "initializer prefixes), not module types"
            )
        return None

    def requires(self, state: Any) -> None:
        super().requires(state)
        if state.mode == ONNX and state.stage is Stage.COMPENSATED:
            raise InputError(
                "this ONNX model was exported with low-rank compensation paths, which its graph does not mark, "
                "so Quantize would quantize them too: run Quantize on the PyTorch model before exporting it"
            )

    def selected(self, state: Frontend[Any]) -> tuple[list[WeightLayer], dict[str, str]]:
        """The layers to quantize, and the skipped ones with the reason."""
        names = [s for s in self.skip if isinstance(s, str)]
        types = tuple(s for s in self.skip if isinstance(s, type))
        state.check_names(names, "Quantize skip")
        candidates, skipped = state.weight_layers()
        chosen = []
        for layer in candidates:
            kind = state.module_type(layer)
            if layer.within(names):
                skipped[layer.weight] = "skipped by name"
            elif kind is not None and issubclass(kind, types):
                skipped[layer.weight] = f"skipped by type ({kind.__name__})"
            elif holders := state.shared_with(layer):
                skipped[layer.weight] = f"weight shared with {', '.join(holders)}"
            else:
                chosen.append(layer)
        return chosen, skipped

    def reads_calibration(self) -> bool:
        return True

    def call(self, state: Frontend[Any]) -> PassResult:
        state.single_process_only("Quantize's calibration of activation ranges")
        layers, skipped = self.selected(state)
        calibration = state.calibration_data("Quantize (static activation ranges)")
        for layer in layers:
            state.weight(layer)  # real weights, or refused before anything changes
        layers, folded = state.prepare_quantization(layers)
        inputs, outputs = observe_ranges(state, layers, calibration, self.activations, self.percentile)
        plan = quant_plan(
            layers, state.weight, inputs, outputs, bias=state.layer_bias, clipped_at_zero=state.clipped_at_zero
        )
        state.plans.append(state.write_quantization(plan))
        details = {"quantized layers": len(layers), "activations": self.activations}
        if folded:
            details["folded BatchNorm"] = folded
        if skipped:
            details["float layers"] = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        return PassResult(state, bool(layers), details)
