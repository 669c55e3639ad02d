"""The state passes work on for a torch model: the working module, its captured graph, the plans.

It answers the pass manager's questions (:class:`graphprune.core.pipeline.State`) for an
``nn.Module``; its stage travels with the model (:func:`detect_stage`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from graphprune.algorithms.quant import QuantPlan
from graphprune.core.groups import Analysis
from graphprune.core.pipeline import MODULE, STREAMED, Pass, PassResult, Stage
from graphprune.core.plan import Plan
from graphprune.core.report import max_relative_error
from graphprune.frontends.torch.analysis import analyze_captured
from graphprune.frontends.torch.capture import CapturedGraph, run_outputs
from graphprune.frontends.torch.fake_quant import is_quantized
from graphprune.frontends.torch.macs import count_params, graph_macs
from graphprune.frontends.torch.masks import check_patterns, masked_weights

if TYPE_CHECKING:
    from graphprune.frontends.torch.streaming import Stream


STAGE_ATTRIBUTE = "graphprune_stage"


def detect_stage(model: nn.Module) -> Stage:
    """The stage a model is at, read off the model itself (so it travels with it): quantized if a
    weight carries fake quantization, masked if one carries an N:M mask, else the stage the pass
    manager wrote on the root module (structured models look dense otherwise), else dense."""
    if is_quantized(model):
        return Stage.QUANTIZED
    if masked_weights(model):
        return Stage.MASKED
    return Stage(getattr(model, STAGE_ATTRIBUTE, Stage.DENSE))


@dataclass
class CompressionState:
    """What passes read and write: the working model, its graph, the stage and the plans so far."""

    model: nn.Module
    captured: CapturedGraph
    stage: Stage = Stage.DENSE
    calibration: Iterable[Any] | None = None
    plans: list[Plan | QuantPlan] = field(default_factory=list)
    prunable_outputs: tuple[str, ...] = ()
    experimental_order: bool = False  # passes may run on stages they accept only experimentally
    stream: Stream | None = None  # a streamed plan: weights in a checkpoint, model on meta (graphprune.core.plan)
    # tensors whose values a pass changed beyond slicing and masking (SparseGPT, compensation,
    # permutations): a plan file carries their new values, or re-applying it would lose them
    updated: set[str] = field(default_factory=set)
    _analysis: Analysis | None = None

    @property
    def mode(self) -> str:
        return MODULE if self.stream is None else STREAMED

    def analysis(self) -> Analysis:
        """The channel analysis of the current model (computed once per model version)."""
        if self._analysis is None:
            self._analysis = analyze_captured(
                self.captured, type(self.model).__name__, prunable_outputs=self.prunable_outputs
            )
        return self._analysis

    def replace_model(self, model: nn.Module, captured: CapturedGraph) -> None:
        self.model, self.captured, self._analysis = model, captured, None

    # What the pass manager asks of a state; the ONNX state answers the same questions.
    def dispatch(self, p: "Pass") -> "PassResult":
        return p.call(self)

    def param_count(self) -> int:
        return count_params(self.model)

    def macs(self) -> int:
        return graph_macs(self.captured.graph_module)

    def check_patterns(self, where: str) -> None:
        check_patterns(self.model, where)

    def output_error(self, reference: list[torch.Tensor] | None) -> float | None:
        """Worst max-relative output error against the dense reference (None without one)."""
        if reference is None:
            return None
        return max_relative_error(run_outputs(self.model, self.captured), reference)

    def mark_stage(self) -> None:
        setattr(self.model, STAGE_ATTRIBUTE, self.stage)
