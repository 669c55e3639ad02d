"""Quantize: int8, int4 or fp8 (fake-quant in PyTorch, parameters recorded for emitters).

Which layers: every layer that multiplies an activation by a parameter weight (linear,
transformers' Conv1D, conv, matmul against a parameter), except those named or typed in
``skip`` and those whose weight object is shared with another module (quantizing one user of
a tied weight would silently change the other); int4 also leaves convolutions in float (it is a
format for matmul weights: onnxruntime has no 4-bit convolution).  Each skip is reported with its reason.

The formats (:mod:`graphprune.algorithms.number_formats` has the arithmetic):
- ``"int8"``: static.  The weight per output channel, symmetric (N:M zeros stay exact zeros); the
  layer's input activation per tensor, calibrated; the layer's own bias as int32 with scale
  ``input_scale * weight_scale[c]`` (what integer kernels add to their accumulator; onnxruntime
  fuses a float-output Gemm only with such a bias); a convolution's output too (onnxruntime fuses
  QLinearConv only when the output is quantized).  BatchNorm after a convolution is folded into it
  first, and when a ReLU follows, the output range starts at 0 so the quantization itself clips
  (the emitter can then drop the ReLU).  Linear outputs stay float (residual streams and softmax
  inputs keep full precision).
- ``"int4"``: weights only, symmetric, one scale per group of ``group_size`` (default 128)
  consecutive weights along the reduction dim; activations stay float.
- ``"fp8"``: E4M3 weights per output channel and the input activation per tensor, static; biases
  and outputs stay float.

``method``: ``"rtn"`` rounds each weight to the nearest grid point; ``"gptq"``
(:mod:`graphprune.algorithms.gptq`) rounds column by column and spreads each rounding error over the
columns not yet rounded, with the Hessian of the layer's inputs, read block by block from the model
as already quantized upstream (the calibration engine SparseGPT uses).  A masked layer's pruned
weights stay exact zeros and the kept ones absorb their error too (the SparseGPT paper's joint variant).

Activation ranges (``activations``): ``"minmax"`` uses the extremes seen in calibration;
``"percentile"`` the ``percentile``-th percentile of each tail, which ignores rare outliers;
``"auto"`` (default) uses, for int8, min/max for convolutions (post-ReLU CNN activations are
bounded, and clipping them loses more than it gains) and the percentile for linear and matmul
inputs (transformer activations carry rare large outliers that would waste most of the 8-bit
range); for fp8 min/max everywhere (its exponent covers outliers).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from graphprune.algorithms.gptq import quantize_layer
from graphprune.algorithms.number_formats import DEFAULT_GROUP_SIZE, FORMATS, GROUPED, INT8, WEIGHT_ONLY
from graphprune.algorithms.quant import QuantPlan, observe_ranges, quant_plan
from graphprune.algorithms.sparsegpt import PRECISIONS, InverseFactor, factored, layer_hessians
from graphprune.core.frontend import Frontend
from graphprune.core.layers import CONV, WeightLayer, by_input
from graphprune.core.pipeline import MODULE, ONNX, STREAMED, Pass, PassResult, Stage
from graphprune.errors import InputError

ACTIVATION_METHODS = ("auto", "minmax", "percentile")
METHODS = ("rtn", "gptq")


class Quantize(Pass):
    """Quantization to int8 (static), int4 (weights only, group-wise) or fp8 (E4M3, static).

    Args:
        dtype: ``"int8"``, ``"int4"`` or ``"fp8"``.
        method: ``"rtn"`` (round to nearest) or ``"gptq"`` (error-compensating rounding; needs
            ``calibration=``).
        group_size: int4's reduction entries per scale (default 128; it must divide the reduction
            dim of every int4 layer).  Not for the per-channel formats.
        activations: ``"auto"``, ``"minmax"`` or ``"percentile"`` (how activation ranges are
            calibrated; int8 and fp8; needs ``calibration=``).
        percentile: the tail percentile for ``"percentile"`` (and ``"auto"`` on int8 linear layers).
        skip: module names (or prefixes) and module types left in float.
        damp, block, precision: GPTQ's Hessian damping (fraction of its mean diagonal), column block
            and solve precision (``"float32"`` or ``"float64"``).
    """

    modes = frozenset({MODULE, STREAMED, ONNX})
    accepts = frozenset({Stage.DENSE, Stage.STRUCTURED, Stage.MASKED, Stage.COMPENSATED})
    produces = Stage.QUANTIZED

    def __init__(
        self,
        dtype: str = "int8",
        *,
        method: str = "rtn",
        group_size: int | None = None,
        activations: str = "auto",
        percentile: float = 99.99,
        skip: Iterable[str | type] = (),
        damp: float = 0.01,
        block: int = 128,
        precision: str = "float32",
    ) -> None:
        if dtype not in FORMATS:
            raise InputError(f"Quantize dtype must be one of {list(FORMATS)}, got {dtype!r}")
        if method not in METHODS:
            raise InputError(f"Quantize method must be one of {list(METHODS)}, got {method!r}")
        if dtype in GROUPED:
            group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
            if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
                raise InputError(f"Quantize group_size must be a positive integer, got {group_size!r}")
        elif group_size is not None:
            raise InputError(f"Quantize({dtype!r}) scales each output channel as a whole: group_size is for int4")
        if activations not in ACTIVATION_METHODS:
            raise InputError(f"Quantize activations must be one of {list(ACTIVATION_METHODS)}, got {activations!r}")
        if dtype in WEIGHT_ONLY and activations != "auto":
            raise InputError(f"Quantize({dtype!r}) quantizes weights only: activations={activations!r} has no effect")
        if isinstance(percentile, bool) or not isinstance(percentile, int | float) or not 50 < percentile <= 100:
            raise InputError(f"Quantize percentile must be a number in (50, 100], got {percentile!r}")
        if not 0 <= damp < 1 or isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise InputError(f"Quantize needs 0 <= damp < 1 and a positive integer block, got {damp=}, {block=}")
        if precision not in PRECISIONS:
            raise InputError(f"Quantize precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.skip = list(skip)
        for s in self.skip:
            if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module))):
                raise InputError(f"Quantize skip takes module names and nn.Module types, got {s!r}")
        self.dtype, self.method, self.group_size = dtype, method, group_size
        self.activations, self.percentile = activations, float(percentile)
        self.damp, self.block, self.precision = damp, block, precision

    def __repr__(self) -> str:
        shown = [repr(self.dtype)]
        if self.method != "rtn":
            shown.append(f"method={self.method!r}")
        if self.group_size is not None:
            shown.append(f"group_size={self.group_size}")
        if self.dtype not in WEIGHT_ONLY:
            shown.append(f"activations={self.activations!r}")
        return f"Quantize({', '.join(shown)})"

    def refusal(self, mode: str) -> str | None:
        if mode == STREAMED:
            return (
                "Quantize does not run in a streamed plan (weights= a checkpoint) yet: plan the sparsity "
                "there, apply it to the checkpoint, then quantize the pruned model"
            )
        if mode == ONNX and (self.dtype != INT8 or self.method != "rtn"):
            return (
                f"{self!r} runs on PyTorch models (ONNX input models take int8 with method='rtn'): "
                "quantize the PyTorch model, then export it"
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
        """The layers to quantize, and the skipped ones with the reason; a group size that does not
        divide an int4 layer's reduction dim is refused, naming the layer."""
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
            elif self.dtype in GROUPED and layer.layout == CONV:
                skipped[layer.weight] = f"{self.dtype} is for matmul weights (no 4-bit convolution kernels)"
            else:
                chosen.append(layer)
        if self.group_size is not None:
            for layer in chosen:
                reduction = state.weight_shape(layer)[layer.nm_axis]
                if reduction % self.group_size:
                    raise InputError(
                        f"Quantize({self.dtype!r}, group_size={self.group_size}): {layer.weight} reduces over "
                        f"{reduction} entries, which do not split into groups of {self.group_size}; choose a "
                        "group size that divides it, or skip the layer"
                    )
        return chosen, skipped

    def reads_calibration(self) -> bool:
        return self.method == "gptq" or self.dtype not in WEIGHT_ONLY

    def call(self, state: Frontend[Any]) -> PassResult:
        if self.dtype not in WEIGHT_ONLY:
            state.single_process_only(f"{self!r}'s calibration of activation ranges")
        layers, skipped = self.selected(state)
        calibration = state.calibration_data(repr(self)) if self.reads_calibration() else None
        for layer in layers:
            state.weight(layer)  # real weights, or refused before anything changes
        layers, folded = state.prepare_quantization(layers)
        details: dict[str, Any] = {"quantized layers": len(layers), "format": self.format_details()}
        carried = [QuantPlan(kind=self.dtype)]  # the plan the model carries, after each write
        if self.method == "gptq":
            with state.writing():
                layers, details["calibration"] = state.sequential(
                    layers, calibration, lambda part, data: carried.append(self._gptq(state, part, data)), skipped
                )
        else:
            carried.append(self.quantize_layers(state, layers, calibration))
        state.plans.append(carried[-1])
        if folded:
            details["folded BatchNorm"] = folded
        if skipped:
            details["float layers"] = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        return PassResult(state, bool(layers), details)

    def format_details(self) -> str:
        """The format and method, as the report shows them."""
        what = {"int8": "int8 weights and activations", "fp8": "fp8 E4M3 weights and activations"}
        grid = what.get(self.dtype, f"{self.dtype} weights in groups of {self.group_size}")
        return f"{grid}, {self.method}"

    def _plan(self, state: Frontend[Any], layers: list[WeightLayer], calibration: Any, **given: Any) -> QuantPlan:
        """The plan of ``layers``: activation ranges observed on ``calibration`` unless weight-only."""
        inputs, outputs = {}, {}
        if layers and self.dtype not in WEIGHT_ONLY:
            inputs, outputs = observe_ranges(state, layers, calibration, self.activations, self.percentile, self.dtype)
        return quant_plan(
            layers,
            given.get("weight", state.weight),
            inputs,
            outputs,
            bias=state.layer_bias,
            clipped_at_zero=state.clipped_at_zero,
            kind=self.dtype,
            group_size=self.group_size,
            scales=given.get("scales"),
        )

    def quantize_layers(
        self, state: Frontend[Any], layers: list[WeightLayer], calibration: Any, **given: Any
    ) -> QuantPlan:
        """Quantize ``layers``; returns the plan the model then carries."""
        return state.write_quantization(self._plan(state, layers, calibration, **given), given.get("values"))

    def round_layer(
        self, state: Frontend[Any], layer: WeightLayer, factors: list[InverseFactor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GPTQ on the layer's weight as the model has it now (its N:M mask kept), with the Hessian
        ``factors`` of its inputs: the new weight and its scales."""
        return quantize_layer(
            state.weight(layer),
            layer.layout,
            factors,
            self.dtype,
            group_size=self.group_size,
            keep=state.keep_mask(layer),
            block=self.block,
        )

    def _gptq(self, state: Frontend[Any], layers: list[WeightLayer], calibration: Any) -> QuantPlan:
        """GPTQ on one part of the model (its inputs from the model as quantized upstream): layers
        reading one activation share its Hessians; the part is quantized before the next is read."""
        values: dict[str, torch.Tensor] = {}
        scales: dict[str, torch.Tensor] = {}
        for group in by_input(layers):
            factors, _ = factored(
                lambda p, first=group[0]: layer_hessians(state, first, calibration, p),
                damp=self.damp,
                precision=self.precision,
            )
            for layer in group:
                values[layer.weight], scales[layer.weight] = self.round_layer(state, layer, factors)
        return self.quantize_layers(
            state, layers, calibration, weight=lambda layer: values[layer.weight], scales=scales, values=values
        )
