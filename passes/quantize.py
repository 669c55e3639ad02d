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
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from graphprune.algorithms.nm import CONV
from graphprune.algorithms.quant import activation_qparams, observe_ranges, weight_axis
from graphprune.core.pipeline import MODULE, ONNX, STREAMED, Pass, PassResult, Stage
from graphprune.errors import InputError
from graphprune.frontends.torch.calibration import Consumer, batches, consumers
from graphprune.frontends.torch.capture import tensor_at
from graphprune.frontends.torch.distributed import single_process_only
from graphprune.frontends.torch.fake_quant import quantize_activation, quantize_bias, quantize_weight, read_quant_plan
from graphprune.frontends.torch.folding import fold_batchnorm, foldable_batchnorm
from graphprune.frontends.torch.state import CompressionState

if TYPE_CHECKING:
    from graphprune.frontends.onnx.state import OnnxState

ACTIVATION_METHODS = ("auto", "minmax", "percentile")
aten = torch.ops.aten


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
    accepts = frozenset({Stage.DENSE, Stage.STRUCTURED, Stage.MASKED})
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

    def selected(self, state: CompressionState) -> tuple[list[Consumer], dict[str, str]]:
        """The layers to quantize, and the skipped ones with the reason."""
        model = state.model
        modules = dict(model.named_modules())
        for s in self.skip:
            if isinstance(s, str) and s not in modules:
                raise InputError(f"Quantize skip: no module named {s!r} in {type(model).__name__}")
        owners: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(param), []).append(name)
        chosen, skipped = [], {}
        for layer in {c.weight: c for c in consumers(state.analysis())}.values():
            module = modules[layer.module]
            holders = owners.get(id(tensor_at(model, layer.weight)), [])
            if any(isinstance(s, str) and (layer.module == s or layer.module.startswith(s + ".")) for s in self.skip):
                skipped[layer.weight] = "skipped by name"
            elif any(isinstance(s, type) and isinstance(module, s) for s in self.skip):
                skipped[layer.weight] = f"skipped by type ({type(module).__name__})"
            elif len(holders) > 1:
                skipped[layer.weight] = f"weight shared with {', '.join(h for h in holders if h != layer.weight)}"
            else:
                chosen.append(layer)
        return chosen, skipped

    def call(self, state: CompressionState) -> PassResult:
        if state.mode == ONNX:  # not yet written once against graphprune.core.frontend.Frontend
            return self._call_onnx(state)
        single_process_only("Quantize's calibration of activation ranges")
        model = state.model
        layers, skipped = self.selected(state)
        for layer in layers:
            if tensor_at(model, layer.weight).device.type == "meta":
                raise InputError(f"{layer.weight} is on the meta device: quantization needs real weights")
        calibration = batches(state.calibration, "Quantize (static activation ranges)")
        folded = {}
        for layer in layers:
            if layer.layout == CONV and (found := foldable_batchnorm(state.captured, model, layer)) is not None:
                folded[layer.module] = found
        for layer in layers:  # fold before computing weight scales: scales are for the deployed weights
            if layer.module in folded:
                fold_batchnorm(model, layer.module, folded[layer.module][0])
        for layer in layers:
            owner, attr = model.get_submodule(layer.module), layer.weight.rpartition(".")[2]
            quantize_weight(owner, attr, weight_axis(layer.layout))
        inputs, outputs = observe_ranges(state, layers, calibration, self.activations, self.percentile)
        for layer in layers:
            module = model.get_submodule(layer.module)
            quantize_activation(module, "input", *inputs[layer.weight].qparams())
            if layer.weight in outputs:
                low, high = outputs[layer.weight].range()
                if _feeds_relu(layer, folded):
                    low = 0.0  # the ReLU clips below 0; the output quantization can do it exactly
                quantize_activation(module, "output", *activation_qparams(low, high))
        for layer in layers:
            if _reads_module_bias(state, layer) or layer.module in folded:
                owner = model.get_submodule(layer.module)
                weight_scale = owner.parametrizations["weight"][-1].scale
                quantize_bias(owner, "bias", owner.qinput_scale * weight_scale)
        if (plan := read_quant_plan(model)) is not None:
            state.plans.append(plan)
        details = {"quantized layers": len(layers), "activations": self.activations}
        if folded:
            details["folded BatchNorm"] = len(folded)
        if skipped:
            details["float layers"] = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        return PassResult(state, bool(layers), details)

    def _call_onnx(self, state: OnnxState) -> PassResult:
        """The same plan, calibrated in onnxruntime and written as QDQ nodes
        (:mod:`graphprune.frontends.onnx.quantize`)."""
        from graphprune.frontends.onnx import quantize as onnx_quantize
        from graphprune.frontends.onnx.capture import owner_names
        from graphprune.frontends.onnx.layers import weight_layers

        model = state.capture.model
        owners = owner_names(model.graph.initializers)
        for name in self.skip:
            if name not in owners:
                raise InputError(f"Quantize skip: no module named {name!r} in the ONNX model's initializer names")
        if not state.calibration:
            raise InputError(
                "Quantize (static activation ranges) needs calibration feeds: "
                "prune_onnx(..., calibration=[{input name: array}, ...])"
            )
        state.replace(onnx_quantize.gemm_from_matmul_add(state.capture))
        model = state.capture.model
        candidates, skipped = weight_layers(model)
        layers = []
        for layer in candidates:
            owner = layer.weight.rpartition(".")[0]
            if any(owner == s or owner.startswith(s + ".") for s in self.skip):
                skipped[layer.weight] = "skipped by name"
            else:
                layers.append(layer)
        inputs, outputs = observe_ranges(state, layers, state.calibration, self.activations, self.percentile)
        plan = onnx_quantize.quant_plan(state.capture, layers, inputs, outputs)
        state.float_outputs = state.capture.outputs
        state.replace(onnx_quantize.quantized_copy(state.capture, plan))
        state.masked = {f"{name}_quantized" if name in plan.layers else name: m for name, m in state.masked.items()}
        state.plans.append(plan)
        details = {"quantized layers": len(layers), "activations": self.activations}
        if skipped:
            details["float layers"] = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        return PassResult(state, bool(layers), details)


def _feeds_relu(layer: Consumer, folded: dict) -> bool:
    """True if the convolution's result (after a folded BatchNorm) goes only to a ReLU."""
    node = folded[layer.module][1] if layer.module in folded else layer.node
    users = list(node.users)
    return (
        len(users) == 1
        and users[0].op == "call_function"
        and users[0].target in (aten.relu.default, aten.relu_.default)
    )


def _reads_module_bias(state: CompressionState, layer: Consumer) -> bool:
    """True if the layer's op adds its module's own ``bias`` parameter (linear, conv, Conv1D's addmm)."""
    if layer.matmul or not layer.weight.endswith(".weight"):
        return False
    node = layer.node
    bias = node.args[0] if node.target.overloadpacket is aten.addmm else node.args[2] if len(node.args) > 2 else None
    names = state.captured.tensor_names
    return isinstance(bias, torch.fx.Node) and names.get(bias.name) == ("parameter", f"{layer.module}.bias")
