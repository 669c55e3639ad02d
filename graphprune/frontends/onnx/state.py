"""The state passes work on for an ONNX model: the working graph, its masks and plans.

It answers the pass manager's questions (:class:`graphprune.core.pipeline.State`) for an ONNX
graph; masks are exact zeros in the initializers, recorded per initializer so that every later
pass is checked against them, and the stage is written into the model's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from graphprune.algorithms.nm import NMPattern, nm_holds
from graphprune.core.pipeline import ONNX, Pass, PassResult, Stage
from graphprune.core.report import max_relative_error
from graphprune.emit.qdq import stored_integers
from graphprune.errors import PostconditionError
from graphprune.frontends.onnx.analysis import OnnxAnalysis, analyze_onnx_capture
from graphprune.frontends.onnx.capture import Feeds, OnnxCapture

STAGE_KEY = "graphprune.stage"  # ONNX metadata: the stage the model is at


NM_KEY = "graphprune.nm_sparsity"  # ONNX metadata: the N:M pattern of each masked initializer


@dataclass
class MaskedWeight:
    """An initializer that carries an N:M pattern, its groups running along ``axis`` (moved last)."""

    pattern: NMPattern
    axis: int
    mask: torch.Tensor | None = None  # bool, the initializer's shape (None: read from metadata, entries unknown)

    def holds(self, values: np.ndarray) -> bool:
        return nm_holds(values, self.axis, self.pattern)


@dataclass
class OnnxState:
    """What passes read and write when they run on an ONNX model."""

    capture: OnnxCapture
    stage: Stage = Stage.DENSE
    calibration: list[Feeds] | None = None
    plans: list[Any] = field(default_factory=list)
    masked: dict[str, MaskedWeight] = field(default_factory=dict)  # initializer -> its N:M pattern
    experimental_order: bool = False
    float_outputs: list[np.ndarray] | None = None  # outputs before Quantize (the int8 check's reference)
    _analysis: OnnxAnalysis | None = None

    @property
    def mode(self) -> str:
        return ONNX

    def analysis(self) -> OnnxAnalysis:
        if self._analysis is None:
            self._analysis = analyze_onnx_capture(self.capture, self.capture.graph.name or "ONNX model")
        return self._analysis

    def replace(self, capture: OnnxCapture) -> None:
        self.capture, self._analysis = capture, None

    def weights(self) -> dict[str, torch.Tensor]:
        return self.capture.weights()

    # The pass manager's questions (see graphprune.core.pipeline.CompressionState).
    def dispatch(self, p: Pass) -> PassResult:
        return p.call_onnx(self)

    def param_count(self) -> int:
        return self.analysis().planned_params({})

    def macs(self) -> int:
        return self.analysis().planned_macs({})

    def check_patterns(self, where: str) -> None:
        initializers = self.capture.graph.initializers
        for name, masked in self.masked.items():
            if name not in initializers or not masked.holds(stored_integers(initializers, name)[0]):
                raise PostconditionError(f"{where} broke the {masked.pattern} pattern of {name}")

    def output_error(self, reference: list[np.ndarray]) -> float:
        """:func:`graphprune.core.report.max_relative_error` of the outputs onnxruntime gives now;
        a non-numeric output counts 1 where it differs."""
        numeric = [i for i, want in enumerate(reference) if want.dtype.kind in "biufc"]
        worst = max_relative_error(
            [torch.from_numpy(np.ascontiguousarray(self.capture.outputs[i])) for i in numeric],
            [torch.from_numpy(np.ascontiguousarray(reference[i])) for i in numeric],
        )
        others = [i for i in range(len(reference)) if i not in numeric]
        if any(not np.array_equal(self.capture.outputs[i], reference[i]) for i in others):
            worst = max(worst, 1.0)
        return worst

    def mark_stage(self) -> None:
        self.capture.model.metadata_props[STAGE_KEY] = str(self.stage)
