"""Quantization plans: the parameters a quantized model carries, and how they are calibrated.

The number formats (int8, int4, fp8) and their arithmetic are :mod:`graphprune.algorithms.number_formats`'.
In PyTorch the quantized model runs with fake quantization
(:mod:`graphprune.frontends.torch.fake_quant`); :class:`QuantPlan` records the same numbers as
plain data for emitters and plan files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from graphprune.algorithms.number_formats import (
    FORMATS,
    FP8,
    GROUPED,
    INT8,
    WEIGHT_ONLY,
    activation_qparams,
    fp8_activation_scale,
    weight_scales,
)
from graphprune.core.layers import CONV, WeightLayer
from graphprune.errors import InputError

if TYPE_CHECKING:
    from graphprune.core.frontend import Frontend

L = TypeVar("L", bound=WeightLayer)


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


@dataclass(kw_only=True)
class LayerQuant:
    """One quantized layer: its weight's scales and, unless weight-only, its activations' parameters."""

    module: str  # the module whose input (and output) the activation parameters belong to
    axis: int  # the weight's output-channel axis
    weight_scale: list  # per channel, or per channel and group ([out][groups]) for grouped formats
    input: tuple[float, int] | None  # (scale, zero_point); None: activations stay float (weight-only)
    output: tuple[float, int] | None = None
    bias: str | None = None  # the int32-quantized bias tensor
    bias_scale: list[float] | None = None
    group_size: int | None = None  # grouped formats: reduction entries per scale

    def scale(self, device: torch.device | None = None) -> torch.Tensor:
        """The weight scales as a float32 tensor (``[out]`` or ``[out, groups]``)."""
        return torch.tensor(self.weight_scale, dtype=torch.float32, device=device)


@dataclass
class QuantPlan:
    """The quantization parameters of a model in one number format, by weight name (plain data,
    JSON round-trip)."""

    layers: dict[str, LayerQuant] = field(default_factory=dict)
    kind: str = INT8
    folded: dict[str, str] = field(default_factory=dict)  # convolution module -> the BatchNorm folded into it

    @property
    def weight_only(self) -> bool:
        return self.kind in WEIGHT_ONLY

    def to_json(self) -> str:
        layers = {k: asdict(v) for k, v in self.layers.items()}
        return json.dumps({"version": 2, "kind": self.kind, "layers": layers, "folded": self.folded})

    @classmethod
    def from_json(cls, text: str) -> "QuantPlan":
        """Version 2 (any format), or version 1 (int8, as graphprune wrote it before int4 and fp8)."""
        data = json.loads(text)
        version, kind = data.get("version"), data.get("kind")
        if not ((version == 1 and kind == INT8) or (version == 2 and kind in FORMATS)):
            raise InputError(f"not a quantization plan (version {version!r}, kind {kind!r})")
        layers = {}
        for name, layer in data["layers"].items():
            given, out = layer.get("input"), layer.get("output")
            layers[name] = LayerQuant(
                module=layer["module"],
                axis=layer["axis"],
                weight_scale=list(layer["weight_scale"]),
                input=tuple(given) if given is not None else None,
                output=tuple(out) if out is not None else None,
                bias=layer.get("bias"),
                bias_scale=layer.get("bias_scale"),
                group_size=layer.get("group_size"),
            )
        folded = data.get("folded", {})
        if not isinstance(folded, dict) or not all(isinstance(v, str) for v in folded.values()):
            raise InputError(f"a quantization plan's 'folded' maps convolutions to BatchNorms, got {folded!r}")
        return cls(layers, kind, folded)


def observe_ranges(
    state: Frontend[Any],
    layers: Sequence[WeightLayer],
    calibration: Any,
    method: str,
    percentile: float,
    kind: str = INT8,
) -> tuple[dict[str, RangeObserver], dict[str, RangeObserver]]:
    """Range observers, by weight name, of each layer's input and (int8) of each convolution's
    result, fed by the calibration runner of ``state``.  ``method="auto"``: for int8, min/max for
    convolutions (post-ReLU CNN activations are bounded, clipping them loses more than it gains) and
    the percentile for everything else (transformer activations carry rare large outliers that would
    waste most of the 8-bit range); for fp8 min/max everywhere (its exponent covers outliers, and
    clipping them loses more)."""
    inputs: dict[str, RangeObserver] = {}
    outputs: dict[str, RangeObserver] = {}
    for layer in layers:
        chosen = method
        if method == "auto":
            chosen = "minmax" if kind == FP8 or layer.layout == CONV else "percentile"
        inputs[layer.weight] = RangeObserver(chosen, percentile)
        if kind == INT8 and layer.layout == CONV:
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
    kind: str = INT8,
    group_size: int | None = None,
    scales: dict[str, torch.Tensor] | None = None,
) -> QuantPlan:
    """The parameters of each layer in format ``kind``, by weight name: the scales of ``weight(layer)``
    (per channel, or per group of ``group_size``); for formats that quantize activations, the
    input's range from :func:`observe_ranges`; for int8 also a convolution's result's, starting at 0
    where ``clipped_at_zero`` (a ReLU follows: the quantization clips exactly), and the layer's own
    ``bias`` as int32 with scale ``input_scale * weight_scale``.  ``scales``: weight scales an
    algorithm fixed (GPTQ's), by weight name, used as given."""
    plan = QuantPlan(kind=kind)
    for layer in layers:
        given = (scales or {}).get(layer.weight)
        scale = (
            given.float().cpu()
            if given is not None
            else weight_scales(weight(layer), layer.output_axis, kind, group_size)
        )
        quantized = LayerQuant(
            module=layer.owner,
            axis=layer.output_axis,
            weight_scale=scale.tolist(),
            input=None,
            group_size=group_size if kind in GROUPED else None,
        )
        if kind == FP8:
            quantized.input = (fp8_activation_scale(*inputs[layer.weight].range()), 0)
        elif kind == INT8:
            quantized.input = inputs[layer.weight].qparams()
            if layer.weight in outputs:
                low, high = outputs[layer.weight].range()
                quantized.output = activation_qparams(0.0 if clipped_at_zero(layer) else low, high)
            quantized.bias = bias(layer)
            if quantized.bias is not None:
                quantized.bias_scale = (quantized.input[0] * scale).tolist()
        plan.layers[layer.weight] = quantized
    return plan
