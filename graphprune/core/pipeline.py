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
from types import MappingProxyType
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from graphprune.frontends.torch.analysis import Analysis, analyze_captured
from graphprune.frontends.torch.capture import CapturedGraph, run_outputs
from graphprune.errors import ContractError, PostconditionError
from graphprune.frontends.torch.macs import count_params, graph_macs
from graphprune.core.plan import Plan
from graphprune.algorithms.quant import QuantPlan, is_quantized
from graphprune.core.report import Report, ReportRow
from graphprune.algorithms.nm import check_patterns, masked_weights

if TYPE_CHECKING:
    from graphprune.frontends.torch.streaming import Stream


class Stage(enum.IntEnum):
    DENSE = 0
    STRUCTURED = 1
    MASKED = 2
    QUANTIZED = 3

    def __str__(self) -> str:
        return self.name.lower()


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

    def analysis(self) -> Analysis:
        """The channel analysis of the current model (computed once per model version)."""
        if self._analysis is None:
            self._analysis = analyze_captured(self.captured, type(self.model).__name__,
                                              prunable_outputs=self.prunable_outputs)
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
        got = run_outputs(self.model, self.captured)
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

    def mark_stage(self) -> None:
        setattr(self.model, STAGE_ATTRIBUTE, self.stage)


@dataclass
class PassResult:
    state: CompressionState
    modified: bool
    details: dict = field(default_factory=dict)


class Pass(abc.ABC):
    """Base class: subclasses set ``accepts``/``produces`` and implement :meth:`call`.

    ``experimental`` maps stages a pass can technically run on but should not, to the reason;
    it runs there only when the pipeline is started with ``experimental_order=True``, and the
    report says so.  A pass never lowers the stage: the result is the later of the two.
    """

    accepts: frozenset[Stage] = frozenset(Stage)
    experimental: Mapping[Stage, str] = MappingProxyType({})  # read-only: no state shared between passes
    produces: Stage | None = None  # None: the stage is unchanged

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, state: CompressionState) -> None:
        """Raise :class:`ContractError` if ``state`` is not something this pass can work on."""
        if not self.runs_on(state.stage, state.experimental_order):
            raise ContractError(self.order_error(state.stage))

    def runs_on(self, stage: Stage, experimental_order: bool) -> bool:
        return stage in self.accepts or (experimental_order and stage in self.experimental)

    def next_stage(self, stage: Stage) -> Stage:
        return stage if self.produces is None else max(stage, self.produces)

    def order_error(self, stage: Stage) -> str:
        allowed = ", ".join(str(s) for s in sorted(self.accepts))
        message = f"{self.name} runs on a {allowed} model, but the pipeline reaches it at stage '{stage}'"
        if stage in self.experimental:
            message += (f": {self.experimental[stage]}. To run it anyway as an experiment, pass "
                        "experimental_order=True to gp.prune (in a recipe: experimental_order = true); "
                        "the report will record it")
        return message

    @abc.abstractmethod
    def call(self, state: CompressionState) -> PassResult:
        """Transform ``state`` and say whether anything changed."""

    def ensures(self, state: CompressionState) -> None:
        """Raise :class:`PostconditionError` if the pass did not deliver what it promises."""
        if self.produces is not None and state.stage < self.produces:
            raise PostconditionError(f"{self.name} should leave the model at stage '{self.produces}', "
                                f"it is at '{state.stage}'")

    def call_onnx(self, state: Any) -> PassResult:
        """Transform an ONNX model (:class:`graphprune.api.onnx.OnnxState`); passes that support
        ONNX models override this."""
        raise ContractError(f"{self.name} does not run on ONNX models")

    @property
    def supports_onnx(self) -> bool:
        return type(self).call_onnx is not Pass.call_onnx

    def __call__(self, state: CompressionState) -> PassResult:
        self.requires(state)
        result = state.dispatch(self)
        self.ensures(result.state)
        return result


class PassManager:
    """Runs passes in the given order after checking the order against their declared stages."""

    def __init__(self, passes: Sequence[Pass], *, experimental_order: bool = False) -> None:
        for p in passes:
            if not isinstance(p, Pass):
                raise ContractError(f"{p!r} is not a graphprune pass (see graphprune.passes)")
        self.passes = list(passes)
        self.experimental_order = experimental_order

    def check_order(self, stage: Stage) -> list[str]:
        """Raise :class:`ContractError` at the first pass that cannot run where it stands; returns a
        note for each pass that runs out of order experimentally."""
        notes = []
        for p in self.passes:
            if not p.runs_on(stage, self.experimental_order):
                raise ContractError(p.order_error(stage))
            if stage not in p.accepts:
                notes.append(f"EXPERIMENTAL ORDER: {p.name} ran on a {stage} model (experimental_order=True)")
            stage = p.next_stage(stage)
        return notes

    def run(self, state: CompressionState, report: Report, reference: Any) -> CompressionState:
        report.notes.extend(self.check_order(state.stage))
        state.experimental_order = self.experimental_order
        params, macs = state.param_count(), state.macs()
        for p in tqdm(self.passes, desc="passes", unit="pass", disable=None):
            start = time.perf_counter()
            before = state.stage
            result = p(state)
            if before not in p.accepts:
                result.details["experimental order"] = f"ran on a {before} model; normally refused: {p.experimental[before]}"
            state = result.state
            state.check_patterns(p.name)  # every N:M mask must survive every pass
            new_params, new_macs = state.param_count(), state.macs()
            report.rows.append(ReportRow(p.name, time.perf_counter() - start, params, new_params, macs, new_macs,
                                         state.output_error(reference), str(state.stage), result.details))
            params, macs = new_params, new_macs
        state.mark_stage()
        return state
