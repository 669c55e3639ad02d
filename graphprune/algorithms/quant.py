"""Int8 quantization: the arithmetic and the recorded parameters, for every frontend.

Weights: symmetric, per output channel, zero-point 0, range [-127, 127].  Zero-point 0 maps an
exact zero to the integer 0 and back, so N:M masks survive quantization; the narrow range keeps
``q(-w) == -q(w)``.  Activations: static, per tensor, asymmetric int8 [-128, 127] (onnxruntime's
S8S8 QDQ default); the range always contains 0 so zero is exact.  Biases: int32 with scale
``input_scale * weight_scale[c]``, as integer kernels add them to the int32 accumulator
(onnxruntime fuses a Gemm with a float output into QGemm only with such a bias).

In PyTorch the quantized model runs with fake quantization
(:mod:`graphprune.frontends.torch.fake_quant`); :class:`QuantPlan` records the same numbers as
plain data for emitters.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from graphprune.algorithms.nm import CONV, CONV1D
from graphprune.core.layers import WeightLayer
from graphprune.errors import InputError

if TYPE_CHECKING:
    from graphprune.core.frontend import Frontend

L = TypeVar("L", bound=WeightLayer)

WEIGHT_QMIN, WEIGHT_QMAX = -127, 127
ACT_QMIN, ACT_QMAX = -128, 127
BIAS_QMIN, BIAS_QMAX = -(2**31), 2**31 - 1


def weight_axis(layout: str) -> int:
    """The output-channel axis of a weight: 0, except transformers' Conv1D ``[in, out]``."""
    return 1 if layout == CONV1D else 0


def weight_scales(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-channel symmetric scales ``max|w_c| / 127`` (1.0 for an all-zero channel)."""
    amax = weight.detach().abs().float().movedim(axis, 0).reshape(weight.shape[axis], -1).amax(1)
    return torch.where(amax > 0, amax / WEIGHT_QMAX, torch.ones_like(amax))


def activation_qparams(low: float, high: float) -> tuple[float, int]:
    """Scale and int8 zero-point for values in ``[low, high]`` (the range is widened to hold 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    if high == low:
        return 1.0, 0
    scale = (high - low) / (ACT_QMAX - ACT_QMIN)
    zero_point = int(round(ACT_QMIN - low / scale))
    return scale, max(ACT_QMIN, min(ACT_QMAX, zero_point))


def integer_weight(weight: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """The int8 values the fake-quantized ``weight`` stands for (``fake_quant(w) == q * scale``)."""
    shape = [-1 if d == axis else 1 for d in range(weight.dim())]
    fq = torch.fake_quantize_per_channel_affine(
        weight.detach().float(), scale, torch.zeros_like(scale, dtype=torch.int32), axis, WEIGHT_QMIN, WEIGHT_QMAX
    )
    return torch.round(fq / scale.reshape(shape)).to(torch.int8)


class RangeObserver:
    """Running range of a tensor over calibration batches.

    ``minmax`` keeps the extremes.  ``percentile`` keeps a histogram (``BINS`` bins over the range
    seen so far, always containing 0; re-binned when a batch widens it) and reads the
    ``percentile``-th percentile of each tail from it, so memory stays constant per layer.
    """

    BINS = 1 << 14

    def __init__(self, method: str, percentile: float) -> None:
        self.method, self.percentile = method, percentile
        self.low, self.high = 0.0, 0.0  # the range seen so far (with 0 in it)
        self.hist: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).double()
        if flat.numel() == 0:
            return
        low, high = min(self.low, flat.min().item()), max(self.high, flat.max().item())
        if self.method == "percentile" and high > low:
            if self.hist is not None and (low, high) != (self.low, self.high):
                width = (self.high - self.low) / self.BINS
                bins = torch.arange(self.BINS, dtype=torch.float64, device=self.hist.device)
                centers = self.low + (bins + 0.5) * width
                self.hist = self._binned(centers, low, high, self.hist)
            self.hist = self._binned(flat, low, high) + (self.hist if self.hist is not None else 0)
        self.low, self.high = low, high

    def _binned(
        self, values: torch.Tensor, low: float, high: float, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        index = ((values - low) * (self.BINS / (high - low))).long().clamp_(0, self.BINS - 1)
        return torch.bincount(index, weights, minlength=self.BINS).double()

    def range(self) -> tuple[float, float]:
        """The calibrated ``(low, high)``."""
        if self.method == "minmax" or self.hist is None:
            return self.low, self.high
        cumulative = self.hist.cumsum(0)
        total = cumulative[-1].item()
        tail = total * (1 - self.percentile / 100)
        width = (self.high - self.low) / self.BINS
        first = int(torch.searchsorted(cumulative, cumulative.new_tensor([tail]), right=True).item())
        last = int(torch.searchsorted(cumulative, cumulative.new_tensor([total - tail])).item())
        return self.low + first * width, self.low + (min(last, self.BINS - 1) + 1) * width

    def qparams(self) -> tuple[float, int]:
        return activation_qparams(*self.range())


@dataclass
class LayerQuant:
    """One quantized layer: its weight's per-channel scales and its activations' parameters."""

    module: str  # the module whose input (and output) the activation parameters belong to
    axis: int
    weight_scale: list[float]
    input: tuple[float, int]  # (scale, zero_point)
    output: tuple[float, int] | None = None
    bias: str | None = None  # the int32-quantized bias tensor
    bias_scale: list[float] | None = None


@dataclass
class QuantPlan:
    """The int8 parameters of a model, by weight name (plain data, JSON round-trip)."""

    layers: dict[str, LayerQuant] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"version": 1, "kind": "int8", "layers": {k: asdict(v) for k, v in self.layers.items()}})

    @classmethod
    def from_json(cls, text: str) -> "QuantPlan":
        data = json.loads(text)
        if data.get("version") != 1 or data.get("kind") != "int8":
            raise InputError(
                f"not an int8 quantization plan (version {data.get('version')!r}, kind {data.get('kind')!r})"
            )
        layers = {}
        for name, layer in data["layers"].items():
            out = layer.get("output")
            layers[name] = LayerQuant(
                module=layer["module"],
                axis=layer["axis"],
                weight_scale=list(layer["weight_scale"]),
                input=tuple(layer["input"]),
                output=tuple(out) if out is not None else None,
                bias=layer.get("bias"),
                bias_scale=layer.get("bias_scale"),
            )
        return cls(layers)


def observe_ranges(
    state: Frontend[Any], layers: Sequence[WeightLayer], calibration: Any, method: str, percentile: float
) -> tuple[dict[str, RangeObserver], dict[str, RangeObserver]]:
    """Range observers, by weight name, of each layer's input and of each convolution's result, fed
    by the calibration runner of ``state``.  ``method="auto"``: min/max for convolutions (post-ReLU
    CNN activations are bounded, clipping them loses more than it gains), the percentile for
    everything else (transformer activations carry rare large outliers)."""
    inputs: dict[str, RangeObserver] = {}
    outputs: dict[str, RangeObserver] = {}
    for layer in layers:
        chosen = method if method != "auto" else "minmax" if layer.layout == CONV else "percentile"
        inputs[layer.weight] = RangeObserver(chosen, percentile)
        if layer.layout == CONV:
            outputs[layer.weight] = RangeObserver(chosen, percentile)
    state.observe(
        calibration,
        {layer: inputs[layer.weight] for layer in layers},
        {layer: outputs[layer.weight] for layer in layers if layer.weight in outputs},
    )
    return inputs, outputs


def quant_plan(
    layers: Sequence[L],
    weight: Callable[[L], torch.Tensor],
    inputs: dict[str, RangeObserver],
    outputs: dict[str, RangeObserver],
    *,
    bias: Callable[[L], str | None],
    clipped_at_zero: Callable[[L], bool],
) -> QuantPlan:
    """The int8 parameters of each layer, by weight name: per-channel weight scales of ``weight(layer)``,
    the input's (and a convolution's result's) range from :func:`observe_ranges`, starting at 0 where
    ``clipped_at_zero`` (a ReLU follows: the quantization clips exactly), and the layer's own
    ``bias`` as int32 with scale ``input_scale * weight_scale``."""
    plan = QuantPlan()
    for layer in layers:
        scale = weight_scales(weight(layer), layer.output_axis)
        x_scale, x_zero = inputs[layer.weight].qparams()
        out = None
        if layer.weight in outputs:
            low, high = outputs[layer.weight].range()
            out = activation_qparams(0.0 if clipped_at_zero(layer) else low, high)
        bias_name = bias(layer)
        plan.layers[layer.weight] = LayerQuant(
            module=layer.owner,
            axis=layer.output_axis,
            weight_scale=scale.tolist(),
            input=(x_scale, x_zero),
            output=out,
            bias=bias_name,
            bias_scale=(x_scale * scale).tolist() if bias_name is not None else None,
        )
    return plan
