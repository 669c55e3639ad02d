"""Pass infrastructure: typed compression stages, pass contracts, the pass manager.

Modelled on ``onnx_ir.passes`` / ``torch.fx.passes.infra``: a pass has ``requires``,
``call`` and ``ensures``; ``call`` returns a :class:`PassResult`.  The compression stage is
typed (dense -> structured -> masked -> quantized) and every pass declares the stages it
accepts and the stage it produces, so the manager can refuse a wrong order *before running
anything*, with a message that says why.  It never reorders passes.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from graphprune.analysis import Analysis, analyze_captured
from graphprune.capture import CapturedGraph, run_outputs
from graphprune.errors import ContractError
from graphprune.macs import count_params, graph_macs
from graphprune.plan import Plan
from graphprune.report import Report, ReportRow
from graphprune.sparsity import check_patterns


class Stage(enum.IntEnum):
    DENSE = 0
    STRUCTURED = 1
    MASKED = 2
    QUANTIZED = 3

    def __str__(self) -> str:
        return self.name.lower()


@dataclass
class CompressionState:
    """What passes read and write: the working model, its graph, the stage and the plans so far."""

    model: nn.Module
    captured: CapturedGraph
    stage: Stage = Stage.DENSE
    calibration: Iterable[Any] | None = None
    plans: list[Plan] = field(default_factory=list)
    prunable_outputs: tuple[str, ...] = ()
    _analysis: Analysis | None = None

    def analysis(self) -> Analysis:
        """The channel analysis of the current model (computed once per model version)."""
        if self._analysis is None:
            self._analysis = analyze_captured(self.captured, type(self.model).__name__,
                                              prunable_outputs=self.prunable_outputs)
        return self._analysis

    def replace_model(self, model: nn.Module, captured: CapturedGraph) -> None:
        self.model, self.captured, self._analysis = model, captured, None


@dataclass
class PassResult:
    state: CompressionState
    modified: bool
    details: dict = field(default_factory=dict)


class Pass(abc.ABC):
    """Base class: subclasses set ``accepts``/``produces`` and implement :meth:`call`."""

    accepts: frozenset[Stage] = frozenset(Stage)
    produces: Stage | None = None  # None: the stage is unchanged

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, state: CompressionState) -> None:
        """Raise :class:`ContractError` if ``state`` is not something this pass can work on."""
        if state.stage not in self.accepts:
            raise ContractError(self.order_error(state.stage))

    def order_error(self, stage: Stage) -> str:
        allowed = ", ".join(str(s) for s in sorted(self.accepts))
        return f"{self.name} runs on a {allowed} model, but the pipeline reaches it at stage '{stage}'"

    @abc.abstractmethod
    def call(self, state: CompressionState) -> PassResult:
        """Transform ``state`` and say whether anything changed."""

    def ensures(self, state: CompressionState) -> None:
        """Raise :class:`ContractError` if the pass did not deliver what it promises."""
        if self.produces is not None and state.stage != self.produces:
            raise ContractError(f"{self.name} should leave the model at stage '{self.produces}', "
                                f"it is at '{state.stage}'")

    def __call__(self, state: CompressionState) -> PassResult:
        self.requires(state)
        result = self.call(state)
        self.ensures(result.state)
        return result


class PassManager:
    """Runs passes in the given order after checking the order against their declared stages."""

    def __init__(self, passes: Sequence[Pass]) -> None:
        for p in passes:
            if not isinstance(p, Pass):
                raise ContractError(f"{p!r} is not a graphprune pass (see graphprune.passes)")
        self.passes = list(passes)

    def check_order(self, stage: Stage) -> None:
        for p in self.passes:
            if stage not in p.accepts:
                raise ContractError(p.order_error(stage))
            stage = p.produces if p.produces is not None else stage

    def run(self, state: CompressionState, report: Report, reference: Any) -> CompressionState:
        self.check_order(state.stage)
        params, macs = count_params(state.model), graph_macs(state.captured.graph_module)
        for p in self.passes:
            start = time.perf_counter()
            result = p(state)
            state = result.state
            check_patterns(state.model, p.name)  # every N:M mask must survive every pass
            new_params, new_macs = count_params(state.model), graph_macs(state.captured.graph_module)
            report.rows.append(ReportRow(p.name, time.perf_counter() - start, params, new_params, macs, new_macs,
                                         output_error(state, reference), str(state.stage), result.details))
            params, macs = new_params, new_macs
        return state


def output_error(state: CompressionState, reference: list[torch.Tensor] | None) -> float | None:
    if reference is None:
        return None
    got = run_outputs(state.model, state.captured)
    worst = 0.0
    for a, b in zip(got, reference, strict=True):
        if a.shape != b.shape:
            continue  # an output the caller let shrink (prunable_outputs) has no element-wise error
        if a.is_floating_point():
            scale = b.abs().max().item() or 1.0
            worst = max(worst, (a.double() - b.double()).abs().max().item() / scale)
        elif not torch.equal(a, b):
            worst = max(worst, 1.0)
    return worst
